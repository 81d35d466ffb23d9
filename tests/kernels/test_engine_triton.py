"""The whole prompted engine with the Triton kernel in every block equals the torch path."""
from __future__ import annotations

import pytest
import torch

from kernels import set_backend
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME, save_tiny_vit
from tests.kernels.cases import DEVICE
from vpt.backbone import Backbone, load_backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors, training_table
from vpt.task import TaskParams, TaskSpec

TASKS = [("vpt-deep", 5, 3), ("vpt-shallow", 3, 4), ("linear", 0, 2)]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """The tiny ViT with random weights: equality of two attention paths needs no pretraining."""
    path = save_tiny_vit(tmp_path_factory.mktemp("vit") / "random_tiny_vit.safetensors")
    return load_backbone(TINY_NAME, weights=path, model_kwargs=TINY_KWARGS, device=DEVICE)


@pytest.fixture
def backend():
    """Set the process-wide backend for one test, and put `auto` back afterwards."""
    yield set_backend
    set_backend("auto")


def make_task(bb: Backbone, method: str, p: int, classes: int, seed: int) -> TaskParams:
    g = torch.Generator().manual_seed(seed)
    spec = TaskSpec(method=method, num_prompts=p, classes=tuple(f"c{i}" for i in range(classes)))
    params = TaskParams.new(spec, bb, generator=g)
    with torch.no_grad():  # unit-scale prompts so that a wrong prompt path changes the logits clearly
        if params.prompts is not None:
            params.prompts.normal_(0.0, 1.0, generator=g)
    return params


def test_mixed_batch_triton_equals_torch(backbone: Backbone, backend) -> None:
    tasks = [make_task(backbone, m, p, c, seed=i) for i, (m, p, c) in enumerate(TASKS)]
    table = stack_slots(backbone, [task_slot_tensors(backbone, t) for t in tasks])
    slot = torch.tensor([0, 1, 2], device=DEVICE)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with torch.inference_mode():
        backend("torch")
        want = forward_logits(backbone, images, table, slot)
        backend("triton")
        got = forward_logits(backbone, images, table, slot)
        table.tensors['deep_len'].zero_()  # same heads, no deep prompts
        no_deep = forward_logits(backbone, images, table, slot)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert (want[finite] - got[finite]).abs().max() <= 1e-5
    assert (want[0, :3] - no_deep[0, :3]).abs().max() > 1e-2  # the deep prompts do move the logits


def test_training_under_the_triton_setting_falls_back_to_torch(backbone: Backbone, backend) -> None:
    params = make_task(backbone, "vpt-deep", 3, 4, seed=5).to(DEVICE)
    images = torch.randn(2, 3, 32, 32).to(DEVICE)
    backend("triton")
    table, slot = training_table(backbone, params, 2, dropout=0.0, training=True)
    loss = forward_logits(backbone, images, table, slot).logsumexp(-1).sum()
    loss.backward()
    assert params.prompts.grad is not None and params.prompts.grad.abs().sum() > 0
