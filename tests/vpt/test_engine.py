"""The mixed-task engine against an independent per-sample implementation of the official formulation."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.vpt.gradients import check_directional_derivatives
from vpt.backbone import Backbone, load_backbone
from vpt.engine import (
    HEAD_ONLY,
    allocate_table,
    forward_features,
    forward_logits,
    merge_dims,
    pack_slots,
    stack_slots,
    task_slot_tensors,
    training_table,
    write_slot,
)
from vpt.task import TaskParams, TaskSpec


@pytest.fixture(scope="module")
def bb64(tiny_vit_file) -> Backbone:
    return load_backbone(TINY_NAME, weights=tiny_vit_file, model_kwargs=TINY_KWARGS, dtype=torch.float64)


@pytest.fixture(scope="module")
def bb_reg() -> Backbone:
    """Register tokens, layer scale, qkv bias, position embedding without the prefix tokens."""
    torch.manual_seed(3)
    kwargs = {**TINY_KWARGS, "reg_tokens": 2, "init_values": 0.5, "qkv_bias": True, "no_embed_class": True}
    return load_backbone(TINY_NAME, pretrained=False, model_kwargs=kwargs, dtype=torch.float64)


def make_task(bb: Backbone, method: str, p: int, classes: int, seed: int) -> TaskParams:
    g = torch.Generator().manual_seed(seed)
    spec = TaskSpec(method=method, num_prompts=p, classes=tuple(f"c{i}" for i in range(classes)))
    params = TaskParams.new(spec, bb, generator=g)
    with torch.no_grad():  # larger than the init so that a wrong prompt path shows up clearly
        if params.prompts is not None:
            params.prompts.normal_(0.0, 1.0, generator=g)
        params.head.bias.normal_(0.0, 1.0, generator=g)
    return params


def official(bb: Backbone, image: torch.Tensor, params: TaskParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The official VPT forward for one image: [CLS(+regs), P, patches], deep slice replacement, timm blocks."""
    m = bb.model
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(image[None]))))  # (1, N0, d)
    npre, spec = m.num_prefix_tokens, params.spec
    prompts = params.prompts.to(x.dtype) if params.prompts is not None else None
    p = spec.num_prompts
    if prompts is not None:
        x = torch.cat([x[:, :npre], prompts[0][None], x[:, npre:]], dim=1)
    for layer, blk in enumerate(m.blocks):
        if spec.method == "vpt-deep" and layer >= 1:
            x = torch.cat([x[:, :npre], prompts[layer][None], x[:, npre + p:]], dim=1)
        x = blk(x)
    cls = m.norm(x)[0, 0]
    return cls, params.head.to(x.dtype)(cls)


TASKS = [("vpt-deep", 1, 3), ("vpt-deep", 10, 5), ("vpt-deep", 50, 2), ("vpt-shallow", 5, 7),
         ("vpt-shallow", 20, 4), ("linear", 0, 6)]


@pytest.mark.parametrize("which", ["plain", "registers"])
def test_mixed_batch_equals_official_per_sample(which: str, bb64: Backbone, bb_reg: Backbone) -> None:
    bb = bb64 if which == "plain" else bb_reg
    tasks = [make_task(bb, m, p, c, seed=i) for i, (m, p, c) in enumerate(TASKS)]
    table = stack_slots(bb, [task_slot_tensors(bb, t) for t in tasks])
    slot = torch.tensor([0, 1, 2, 3, 4, 5, 3, 0, 5, 2])
    images = torch.randn(len(slot), 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        logits = forward_logits(bb, images, table, slot)
        for b, s in enumerate(slot.tolist()):
            _, ref = official(bb, images[b], tasks[s])
            c = tasks[s].spec.num_classes
            torch.testing.assert_close(logits[b, :c], ref, rtol=0, atol=1e-10)
            assert torch.isinf(logits[b, c:]).all() and (logits[b, c:] < 0).all()


def test_linear_features_equal_timm_forward_features(bb64: Backbone) -> None:
    t = make_task(bb64, "linear", 0, 3, seed=1)
    table = stack_slots(bb64, [task_slot_tensors(bb64, t)])
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        ours = forward_features(bb64, images, table, torch.zeros(4, dtype=torch.long))
        timm_cls = bb64.model.forward_features(images)[:, 0]
    torch.testing.assert_close(ours, timm_cls, rtol=0, atol=1e-12)


def test_batch_invariance(bb64: Backbone) -> None:
    tasks = [make_task(bb64, m, p, c, seed=10 + i) for i, (m, p, c) in enumerate(TASKS)]
    table = stack_slots(bb64, [task_slot_tensors(bb64, t) for t in tasks])
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    slot = torch.tensor([0, 1, 2, 3, 4, 5])
    perm = torch.tensor([4, 2, 5, 0, 3, 1])
    with torch.inference_mode():
        base = forward_logits(bb64, images, table, slot)
        permuted = forward_logits(bb64, images[perm], table, slot[perm])
        torch.testing.assert_close(permuted, base[perm], rtol=0, atol=1e-12)
        # new batch-mates: sample 0 alongside different tasks and images
        mates = torch.cat([images[:1], torch.randn(3, 3, 32, 32, dtype=torch.float64)])
        alone = forward_logits(bb64, mates, table, torch.tensor([0, 3, 3, 4]))
        torch.testing.assert_close(alone[0], base[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow", "linear"])
def test_gradients_reach_prompts_and_head_only_and_match_finite_differences(method: str, bb64: Backbone) -> None:
    params = make_task(bb64, method, 3, 4, seed=5).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])

    def loss_fn() -> torch.Tensor:
        table, slot = training_table(bb64, params, 3, dropout=0.0, training=True)
        return torch.nn.functional.cross_entropy(forward_logits(bb64, images, table, slot), labels)

    loss = loss_fn()
    loss.backward()
    assert all(p.grad is None for p in bb64.model.parameters())
    trainable = [p for p in params.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    check_directional_derivatives(loss_fn, trainable, directions=3)


def test_per_sample_prompt_dropout_in_training(bb64: Backbone) -> None:
    params = make_task(bb64, "vpt-deep", 4, 3, seed=2).double()
    table, slot = training_table(bb64, params, 5, dropout=0.5, training=True)
    deep_k = table.tensors["deep_k"]                                   # (S, L, H, p, hd)
    assert deep_k.shape[0] == 5 and slot.tolist() == [0, 1, 2, 3, 4]
    assert not torch.equal(deep_k[0], deep_k[1])  # each sample its own mask
    table_eval, slot_eval = training_table(bb64, params, 5, dropout=0.5, training=False)
    assert table_eval.tensors["deep_k"].shape[0] == 1 and slot_eval.tolist() == [0] * 5


def test_training_table_equals_bank_tensors(bb64: Backbone) -> None:
    params = make_task(bb64, "vpt-deep", 6, 3, seed=4)
    table, _ = training_table(bb64, params.double(), 1, dropout=0.0, training=False)
    bank = task_slot_tensors(bb64, params)
    for name in ("deep_k", "deep_v"):
        torch.testing.assert_close(table.tensors[name][0].detach(), bank.tensors[name], rtol=0, atol=1e-12)


def test_float32_engine_close_to_float64(tiny_backbone: Backbone, bb64: Backbone) -> None:
    tasks = [make_task(bb64, m, p, c, seed=20 + i) for i, (m, p, c) in enumerate(TASKS)]
    slot = torch.tensor([0, 1, 2, 3, 4, 5])
    images = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        t32 = stack_slots(tiny_backbone, [task_slot_tensors(tiny_backbone, t) for t in tasks])
        t64 = stack_slots(bb64, [task_slot_tensors(bb64, t) for t in tasks])
        out32 = forward_logits(tiny_backbone, images, t32, slot)
        out64 = forward_logits(bb64, images.double(), t64, slot)
    finite = torch.isfinite(out64)
    torch.testing.assert_close(out32[finite].double(), out64[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skip_heads", [False, True])
def test_a_table_of_equal_shaped_slots_is_stacked_exactly_as_the_padded_path_writes_it(bb64: Backbone,
                                                                                    skip_heads: bool) -> None:
    """Slots whose fields have one shape (the usual batch: tasks of one kind) are stacked in one op per
    field; the table equals the one `allocate_table` + `write_slot` build (values, dtypes, lengths)."""
    slots = [task_slot_tensors(bb64, make_task(bb64, "vpt-deep", 10, 5, seed)) for seed in range(4)]
    skip = HEAD_ONLY if skip_heads else frozenset()
    table = pack_slots(bb64, slots) if skip_heads else stack_slots(bb64, slots)
    dims: dict = {}
    for s in slots:
        dims = merge_dims(dims, {k: v for k, v in s.dims().items() if k not in skip})
    padded = allocate_table(bb64, len(slots), dims)
    for i, s in enumerate(slots):
        write_slot(padded, i, s)
    assert table.tensors.keys() == padded.tensors.keys() and table.lengths.keys() == padded.lengths.keys()
    for name in table.tensors:
        assert table.tensors[name].dtype == padded.tensors[name].dtype
        assert torch.equal(table.tensors[name], padded.tensors[name]), name
    for name in table.lengths:
        assert torch.equal(table.lengths[name], padded.lengths[name]), name
    # one slot of another shape: the padded path, and each slot still keeps its own length
    mixed = stack_slots(bb64, [*slots, task_slot_tensors(bb64, make_task(bb64, "vpt-deep", 3, 7, 9))])
    assert mixed.num_classes.tolist() == [5, 5, 5, 5, 7]
