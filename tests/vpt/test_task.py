"""Task specs, official initialisation, parameter accounting, and the task file."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save as st_save

from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from vpt.backbone import Backbone, load_backbone
from vpt.errors import TaskFileError, TaskSpecError
from vpt.task import HEAD_BIAS_INIT, TaskParams, TaskSpec, load_task_file, read_metadata, save_task_file


def spec(method: str = "vpt-deep", p: int = 4, classes: int = 3) -> TaskSpec:
    return TaskSpec(method=method, num_prompts=p, classes=tuple(f"class {i}" for i in range(classes)))


@pytest.fixture(scope="module")
def vit_b16() -> Backbone:
    """timm's ViT-B/16 with random weights (shapes are all that counting needs)."""
    return load_backbone("vit_base_patch16_224", pretrained=False)


def test_parameter_accounting_vit_b16(vit_b16: Backbone) -> None:
    def count(method: str, p: int = 0, classes: int = 10, **kw) -> dict[str, int]:
        return TaskParams(TaskSpec(method, p, tuple(f"c{i}" for i in range(classes)), **kw), vit_b16).num_trainable()

    head = 768 * 10 + 10
    assert count("vpt-deep", 50)["prompts"] == 460_800
    assert count("vpt-shallow", 50)["prompts"] == 38_400
    linear = count("linear")
    assert linear["prompts"] == 0 and linear["head"] == head and linear["total"] == head
    # the official demo's count: deep p=100 on ViT-B plus a 6-class head
    assert count("vpt-deep", 100, classes=6)["total"] == 926_214
    # every backbone parameter ending in `bias`: patch embedding, 12 x (norm1, qkv, proj, norm2, fc1, fc2), norm
    assert count("bias")["bias"] == 768 + 12 * (768 + 2304 + 768 + 768 + 3072 + 768) + 768 == 102_912
    # counted independently from timm's own parameter names (the model has no head: num_classes=0)
    named = {n: p.numel() for n, p in vit_b16.model.named_parameters() if n.endswith("bias")}
    assert len(named) == 1 + 12 * 6 + 1 and sum(named.values()) == 102_912
    # the tuning-methods issue's 112,128 is 9,216 = 12 x 768 more: one 768-wide bias per block that ViT-B/16
    # does not have (a block holds 6 biases: 11 x 768 values, qkv 3 x 768 and fc1 4 x 768 included)
    assert 112_128 - 102_912 == 12 * 768 and 12 * (768 + 2304 + 768 + 768 + 3072 + 768) == 12 * 11 * 768
    assert count("adapter", adapter_reduction=64)["adapter"] == 230_544
    assert count("adapter", adapter_reduction=8)["adapter"] == 12 * (2 * 96 * 768 + 96 + 768)
    assert count("linear", head="mlp-3")["head"] == 1_184_256 + head   # 2 x (Linear 768x768 + BatchNorm)
    assert count("partial-1")["partial"] == 7_089_408
    both = count("vpt-deep+bias", 10)
    assert both["total"] == 12 * 10 * 768 + 102_912 + head


def test_official_initialisation(tiny_backbone: Backbone) -> None:
    torch.manual_seed(0)
    params = TaskParams.new(spec("vpt-deep", 50, 40), tiny_backbone)
    bound = math.sqrt(6 / (3 * 8 * 8 + 64))
    assert tiny_backbone.prompt_init_bound == pytest.approx(bound)
    assert params.prompts.abs().max() <= bound and params.prompts.abs().max() > 0.9 * bound
    assert params.prompts.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.all(params.head.bias == HEAD_BIAS_INIT) and HEAD_BIAS_INIT == pytest.approx(-4.59512, abs=1e-5)
    assert params.head.weight.std().item() == pytest.approx(math.sqrt(2 / 40), rel=0.1)
    vitb = Backbone.__new__(Backbone)
    object.__setattr__(vitb, "patch_size", (16, 16))
    object.__setattr__(vitb, "embed_dim", 768)
    assert vitb.prompt_init_bound == pytest.approx(0.0625)


@pytest.mark.parametrize("kwargs", [
    {"method": "prompt-tuning", "num_prompts": 4, "classes": ("a", "b")},
    {"method": "vpt-deep", "num_prompts": 0, "classes": ("a", "b")},
    {"method": "vpt-shallow", "num_prompts": 5, "classes": ()},
    {"method": "vpt-deep", "num_prompts": 5, "classes": ("a", "a")},
    {"method": "vpt-deep", "num_prompts": 5, "classes": ("a", "b"), "prompt_dropout": 1.5},
])
def test_invalid_specs_are_refused(kwargs: dict) -> None:
    with pytest.raises(TaskSpecError):
        TaskSpec(**kwargs)


@pytest.mark.parametrize("method,p", [("vpt-deep", 4), ("vpt-shallow", 7), ("linear", 0)])
def test_task_file_round_trip(tiny_backbone: Backbone, method: str, p: int) -> None:
    params = TaskParams.new(spec(method, p, 5), tiny_backbone)
    blob = save_task_file(params, tiny_backbone, extra={"metrics": {"val_acc": 0.9}})
    meta = read_metadata(blob)
    assert meta["format"] == "vpt-task/1" and meta["method"] == method
    assert json.loads(meta["classes"]) == [f"class {i}" for i in range(5)]
    assert json.loads(meta["metrics"]) == {"val_acc": 0.9}
    loaded = load_task_file(blob, tiny_backbone)
    assert loaded.spec == params.spec
    torch.testing.assert_close(loaded.params.head.weight, params.head.weight, rtol=0, atol=0)
    if p:
        torch.testing.assert_close(loaded.params.prompts, params.prompts, rtol=0, atol=0)
        assert loaded.params.prompts.shape[0] == (tiny_backbone.depth if method == "vpt-deep" else 1)


def _blob_with(tensors: dict, meta: dict) -> bytes:
    return st_save(tensors, metadata=meta)


def _good(tiny_backbone: Backbone) -> tuple[dict, dict]:
    params = TaskParams.new(spec("vpt-deep", 4, 3), tiny_backbone)
    blob = save_task_file(params, tiny_backbone)
    from safetensors.torch import load

    return load(blob), read_metadata(blob)


def test_corrupt_truncated_and_mismatched_files(tiny_backbone: Backbone) -> None:
    tensors, meta = _good(tiny_backbone)
    blob = _blob_with(tensors, meta)
    cases = {
        "random bytes": b"\x00\x13garbage" * 10,
        "empty": b"",
        "truncated tail": blob[:-10],
        "truncated header": blob[:40],
        "wrong format": _blob_with(tensors, {**meta, "format": "vpt-task/9"}),
        "classes vs head": _blob_with(tensors, {**meta, "classes": json.dumps(["a", "b"])}),
        "prompt count": _blob_with(tensors, {**meta, "num_prompts": "5"}),
        "missing head": _blob_with({"prompts": tensors["prompts"]}, meta),
        "extra tensor": _blob_with({**tensors, "x": torch.zeros(1)}, meta),
        "nan": _blob_with({**tensors, "head.bias": torch.full((3,), float("nan"))}, meta),
        "wrong depth": _blob_with({**tensors, "prompts": tensors["prompts"][:2].contiguous()}, meta),
        "wrong width": _blob_with({**tensors, "head.weight": torch.zeros(3, 32)}, meta),
        "bad method": _blob_with(tensors, {**meta, "method": "lora"}),
        "classes not json": _blob_with(tensors, {**meta, "classes": "[oops"}),
    }
    for name, bad in cases.items():
        with pytest.raises(TaskFileError) as err:
            load_task_file(bad, tiny_backbone)
        assert err.value.code == "task_file_invalid", name
        assert str(err.value), name
    other = _blob_with(tensors, {**meta, "backbone_fingerprint": "0" * 64})
    with pytest.raises(TaskFileError) as err:
        load_task_file(other, tiny_backbone)
    assert err.value.code == "backbone_mismatch" and "fingerprint" in str(err.value)
    assert "server" not in str(err.value)  # `vpt-serve eval` meets this error offline too


def test_file_from_a_different_backbone_is_refused(tiny_vit_file) -> None:
    wide = load_backbone(TINY_NAME, pretrained=False, model_kwargs={**TINY_KWARGS, "embed_dim": 96, "num_heads": 3})
    narrow = load_backbone(TINY_NAME, weights=tiny_vit_file, model_kwargs=TINY_KWARGS)
    blob = save_task_file(TaskParams.new(spec(), wide), wide)
    with pytest.raises(TaskFileError) as err:
        load_task_file(blob, narrow)
    assert err.value.code == "backbone_mismatch"
    with pytest.raises(TaskFileError) as err:  # even when told to ignore fingerprints, shapes are checked
        load_task_file(blob, narrow, check_fingerprint=False)
    assert "shape" in str(err.value)
