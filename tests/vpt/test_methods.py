"""Every tuning method, alone and combined, in one mixed batch against an independent implementation."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load

from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.vpt.gradients import check_directional_derivatives
from tests.vpt.reference_methods import reference_logits
from vpt.backbone import Backbone, load_backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors, training_table
from vpt.task import TaskParams, TaskSpec, load_task_file, save_task_file

# (method, prompts, classes, options): every component, head and pooling, mixed widths and lengths.
TASKS = [
    ("linear", 0, 3, {}),
    ("vpt-shallow", 2, 4, {}),
    ("vpt-deep", 3, 5, {}),
    ("vpt-deep", 5, 2, {"prompt_layers": (1, 2), "pooling": "image_mean"}),
    ("vpt-deep", 4, 3, {"pooling": "prompt_mean"}),
    ("bias", 0, 6, {}),
    ("vpt-deep+bias", 6, 3, {"head": "mlp-3", "pooling": "all_mean"}),
    ("vpt-shallow+bias", 3, 2, {"pooling": "prompt_mean"}),
    ("adapter", 0, 4, {"adapter_reduction": 8}),
    ("adapter", 0, 7, {"adapter_reduction": 16, "head": "mlp-2"}),
    ("partial-1", 0, 3, {}),
    ("vpt-deep+adapter+partial-1", 2, 5, {"pooling": "all_mean", "adapter_reduction": 32}),
    ("linear", 0, 4, {"head": "mlp-3", "pooling": "image_mean"}),
]


@pytest.fixture(scope="module")
def bb64(one_thread: None) -> Backbone:
    torch.manual_seed(0)
    return load_backbone(TINY_NAME, pretrained=False, model_kwargs=TINY_KWARGS, dtype=torch.float64)


@pytest.fixture(scope="module")
def bb_reg() -> Backbone:
    """Register tokens, layer scale, position embedding without the prefix tokens."""
    torch.manual_seed(3)
    kwargs = {**TINY_KWARGS, "reg_tokens": 2, "init_values": 0.5, "no_embed_class": True}
    return load_backbone(TINY_NAME, pretrained=False, model_kwargs=kwargs, dtype=torch.float64)


def make_spec(method: str, p: int, classes: int, options: dict) -> TaskSpec:
    return TaskSpec(method=method, num_prompts=p, classes=tuple(f"c{i}" for i in range(classes)), **options)


def randomised(bb: Backbone, spec: TaskSpec, seed: int) -> TaskParams:
    """A task whose every tensor is far from its init, so a wrong path shows up clearly."""
    g = torch.Generator().manual_seed(seed)
    params = TaskParams.new(spec, bb, generator=g).double()
    with torch.no_grad():
        for name, t in params.named_parameters():
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * (1.0 if "prompts" in name else 0.2))
        for name, t in params.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0.0, 0.5, generator=g)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=g)
    # through the (float32) task file, so the engine and the reference read the same values
    return load_task_file(save_task_file(params, bb), bb).params.double()


def files_of(params: TaskParams, bb: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in st_load(save_task_file(params, bb)).items()}


@pytest.mark.parametrize("which", ["plain", "registers"])
def test_mixed_batch_of_all_methods_equals_reference_per_sample(which: str, bb64: Backbone,
                                                                 bb_reg: Backbone) -> None:
    bb = bb64 if which == "plain" else bb_reg
    tasks = [randomised(bb, make_spec(*t), seed=i) for i, t in enumerate(TASKS)]
    table = stack_slots(bb, [task_slot_tensors(bb, t) for t in tasks])
    n = len(tasks)
    slot = torch.tensor(list(range(n)) + [3, 0, 11, 6, 10, 8])
    images = torch.randn(len(slot), 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        logits = forward_logits(bb, images, table, slot)
        for b, s in enumerate(slot.tolist()):
            spec = tasks[s].spec
            ref = reference_logits(bb, images[b], spec, files_of(tasks[s], bb))
            torch.testing.assert_close(logits[b, :spec.num_classes], ref, rtol=0, atol=1e-10,
                                       msg=lambda m, spec=spec: f"{spec.method} ({spec.head}, {spec.pooling}): {m}")
            assert torch.isinf(logits[b, spec.num_classes:]).all()


def test_batch_invariance_across_methods(bb64: Backbone) -> None:
    tasks = [randomised(bb64, make_spec(*t), seed=20 + i) for i, t in enumerate(TASKS)]
    table = stack_slots(bb64, [task_slot_tensors(bb64, t) for t in tasks])
    n = len(tasks)
    images = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    slot = torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        base = forward_logits(bb64, images, table, slot)
        torch.testing.assert_close(forward_logits(bb64, images[perm], table, slot[perm]), base[perm],
                                   rtol=0, atol=1e-12)
        for i in range(n):   # each sample alone, in a one-slot table of its own task
            own = stack_slots(bb64, [task_slot_tensors(bb64, tasks[i])])
            alone = forward_logits(bb64, images[i:i + 1], own, torch.zeros(1, dtype=torch.long))
            c = tasks[i].spec.num_classes
            torch.testing.assert_close(alone[0, :c], base[i, :c], rtol=0, atol=1e-10)


def expected_trainable(spec: TaskSpec, bb: Backbone) -> set[str]:
    """The file tensors that must train: what each component declares, minus BatchNorm statistics."""
    names = {n for n, p in bb.model.named_parameters() if n.endswith("bias")}
    last = f"blocks.{bb.depth - 1}."
    partial = {n for n, _ in bb.model.named_parameters() if n.startswith((last, "norm."))}
    out = set()
    if spec.num_prompts:
        out.add("prompts")
    out |= {f"bias.{n}" for n in names} if "bias" in spec.components else set()
    out |= {f"partial.{n}" for n in partial} if "partial-1" in spec.components else set()
    if "adapter" in spec.components:
        out |= {f"adapter.{i}.{m}.{p}" for i in range(bb.depth) for m in ("down", "up") for p in ("weight", "bias")}
    k = 1 if spec.head == "linear" else int(spec.head.split("-")[1])
    if k == 1:
        return out | {"head.weight", "head.bias"}
    out |= {f"head.layers.{j}.{p}" for j in range(k) for p in ("weight", "bias")}
    return out | {f"head.norms.{j}.{p}" for j in range(k - 1) for p in ("weight", "bias")}


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t[0]}-{t[3].get('head', 'linear')}" if isinstance(t, tuple) else None)
def test_gradients_reach_exactly_the_methods_tensors(task: tuple, bb64: Backbone) -> None:
    spec = make_spec(*task)
    params = randomised(bb64, spec, seed=5).requires_grad_(True)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 1])

    def loss_fn() -> torch.Tensor:
        table, slot = training_table(bb64, params, 3, dropout=0.0, training=False)
        return torch.nn.functional.cross_entropy(forward_logits(bb64, images, table, slot), labels)

    loss_fn().backward()
    assert all(p.grad is None for p in bb64.model.parameters())
    files = dict(save_task_file(params, bb64) and st_load(save_task_file(params, bb64)))
    trainable = [p for p in params.parameters()]
    assert sum(p.numel() for p in trainable) == sum(files[n].numel() for n in expected_trainable(spec, bb64))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    check_directional_derivatives(loss_fn, trainable, directions=2)


def test_training_table_equals_bank_path(bb64: Backbone) -> None:
    """Eval-mode logits through the training table (from parameters) equal the bank's."""
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for i, t in enumerate(TASKS):
        params = randomised(bb64, make_spec(*t), seed=40 + i)
        with torch.inference_mode():
            table, slot = training_table(bb64, params, 2, dropout=0.0, training=False)
            ours = forward_logits(bb64, images, table, slot)
            bank = stack_slots(bb64, [task_slot_tensors(bb64, params)])
            served = forward_logits(bb64, images, bank, torch.zeros(2, dtype=torch.long))
        torch.testing.assert_close(ours, served, rtol=0, atol=1e-10)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t[0] if isinstance(t, tuple) else None)
def test_task_file_round_trip(task: tuple, bb64: Backbone) -> None:
    params = randomised(bb64, make_spec(*task), seed=7).float()
    blob = save_task_file(params, bb64)
    loaded = load_task_file(blob, bb64)
    assert loaded.spec == params.spec
    assert loaded.metadata["format"] == ("vpt-task/1" if params.spec.is_v1 else "vpt-task/2")
    ours, theirs = params.state_dict(), loaded.params.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=0)
