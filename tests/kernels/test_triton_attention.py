"""The prompt-fused Triton kernel against the float64 reference (Triton's interpreter on a CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.triton_attention as ta
from kernels import AttentionInputError, BackendUnavailable, attention, set_backend
from kernels.torch_attention import torch_attention
from kernels.triton_attention import triton_attention
from tests.kernels.cases import DEVICE, Case, make_inputs, max_err, reference

ROOT = Path(__file__).resolve().parents[2]
PLENS = (0, 1, 15, 16, 17, 20)  # 20 = P_max
CASES = [
    Case(1, 1, 1, 32, plens=(0, 17), slots=(1,)),
    Case(3, 2, 1, 64, plens=(1, 0, 16), slots=(0, 1, 0)),
    Case(1, 2, 1, 32),
    Case(3, 2, 17, 32, plens=PLENS, slots=(5, 1, 5), seq=(17, 9, 1)),
    Case(3, 1, 17, 64, plens=PLENS, slots=(0, 3, 4)),
    Case(3, 2, 17, 64, seq=(17, 5, 16)),
    Case(3, 2, 197, 64, plens=PLENS[:5] + (50,), slots=(2, 2, 5), seq=(197, 150, 17)),
    Case(1, 2, 197, 32, plens=(16,), slots=(0,)),
    Case(3, 1, 197, 32, plens=(0, 20), slots=(0, 0, 0)),
    Case(3, 2, 17, 64, plens=(3, 7), slots=(1, 0, 1), contiguous=True),
]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tolerance(inputs: dict, dtype: torch.dtype, ref_out: torch.Tensor) -> float:
    """The floor for the dtype, or twice the error of plain PyTorch at that dtype, whichever is larger."""
    torch_out = torch_attention(**inputs)
    return max(FLOOR[dtype], 2 * max_err(torch_out, ref_out, inputs["seq_len"]))


def check_against_reference(inputs: dict, dtype: torch.dtype, **kwargs: object) -> torch.Tensor:
    out, lse = triton_attention(**inputs, return_lse=True, **kwargs)
    ref_out, ref_lse = reference(inputs)
    assert out.shape == inputs["q"].shape and out.dtype == dtype and lse.dtype == torch.float32
    tol = tolerance(inputs, dtype, ref_out)
    seq = inputs["seq_len"]
    assert max_err(out, ref_out, seq) <= tol
    assert max_err(lse[..., None], ref_lse[..., None], seq) <= FLOOR[dtype] * max(1.0, ref_lse.abs().max() / 10)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case: Case, dtype: torch.dtype) -> None:
    check_against_reference(make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", [8, 16, 24, 48, 80, 128])
def test_head_dims_padded_by_masked_loads(D: int, dtype: torch.dtype) -> None:
    case = Case(3, 2, 17, D, plens=(5, 17), slots=(1, 0, 1), seq=(17, 3, 11))
    check_against_reference(make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [Case(1, 2, 197, 64, plens=(50,), slots=(0,), q_gain=20.0),
                                  Case(3, 2, 17, 32, plens=(0, 9), slots=(1, 0, 1), seq=(17, 2, 8), q_gain=30.0)],
                         ids=str)
def test_large_logits(case: Case, dtype: torch.dtype) -> None:
    inputs = make_inputs(case, dtype)
    _, ref_lse = reference(inputs)
    assert ref_lse.abs().max() > 50  # the online max really moves
    check_against_reference(inputs, dtype)


def test_head_dim_with_non_unit_stride() -> None:
    base = make_inputs(Case(2, 2, 17, 32, plens=(4, 9), slots=(1, 0), seq=(17, 6)), torch.float32)
    wide = torch.randn(3, 2, 2, 17, 64, device=DEVICE)  # every other element is the head dim
    inputs = {**base, "q": wide[0, ..., ::2], "k": wide[1, ..., ::2], "v": wide[2, ..., ::2]}
    assert inputs["q"].stride(-1) == 2
    check_against_reference(inputs, torch.float32)


@given(
    B=st.integers(1, 3), H=st.integers(1, 2), N=st.integers(1, 40), D=st.sampled_from([16, 32, 40, 64]),
    plens=st.lists(st.integers(0, 20), min_size=1, max_size=4), data=st.data(),
)
@settings(max_examples=20, deadline=None)
def test_random_shapes_fp32(B: int, H: int, N: int, D: int, plens: list[int], data: st.DataObject) -> None:
    slots = tuple(data.draw(st.lists(st.integers(0, len(plens) - 1), min_size=B, max_size=B)))
    seq = data.draw(st.none() | st.lists(st.integers(1, N), min_size=B, max_size=B).map(tuple))
    p_max = max(plens) + data.draw(st.integers(0, 3))
    case = Case(B, H, N, D, plens=tuple(plens), slots=slots, seq=seq, p_max=p_max)
    check_against_reference(make_inputs(case, torch.float32, seed=B * N + D), torch.float32)


def test_sorting_by_task_gives_the_same_bits() -> None:
    case = Case(3, 2, 197, 32, plens=(3, 20, 9), slots=(2, 0, 2), seq=(197, 120, 60))
    inputs = make_inputs(case, torch.float32)
    plain = triton_attention(**inputs)
    sorted_ = check_against_reference(inputs, torch.float32, sort_by_task=True)
    assert torch.equal(plain, sorted_)


def test_output_layout_makes_head_merge_free() -> None:
    inputs = make_inputs(Case(2, 2, 17, 32, plens=(4,), slots=(0, 0)), torch.float32)
    out = triton_attention(**inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 17, 32)
    assert out.transpose(1, 2).is_contiguous()  # (B, N, H, D) memory


def test_batches_past_the_grid_limit_launch_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_inputs(Case(3, 2, 17, 32, plens=(4, 11), slots=(1, 0, 1), seq=(17, 6, 12)), torch.float32)
    whole = triton_attention(**inputs)
    monkeypatch.setattr(ta, "_MAX_GRID_Y", 2)  # one sample (two heads) per launch
    chunked = triton_attention(**inputs, sort_by_task=True)
    assert torch.equal(whole, chunked)


def test_prompt_len_past_the_bank_is_clamped() -> None:
    inputs = make_inputs(Case(2, 1, 17, 32, plens=(6, 6), slots=(0, 1)), torch.float32)
    over = {**inputs, "prompt_len": inputs["prompt_len"] + 100}
    assert torch.equal(triton_attention(**inputs), triton_attention(**over, check=False))


def test_bank_without_prompt_rows_and_empty_batch() -> None:
    inputs = make_inputs(Case(2, 2, 17, 32, plens=(0,), slots=(0, 0), p_max=0), torch.float32)
    assert inputs["bank_k"].shape[2] == 0
    none = {**inputs, "bank_k": None, "bank_v": None, "slot": None, "prompt_len": None}
    assert torch.equal(triton_attention(**inputs), triton_attention(**none))
    empty = make_inputs(Case(0, 2, 17, 32), torch.float32)
    assert triton_attention(**empty).shape == (0, 2, 17, 32)


def test_entry_point_dispatches_to_the_kernel() -> None:
    inputs = make_inputs(Case(2, 2, 17, 32, plens=(4, 9), slots=(1, 0), seq=(17, 6)), torch.float32)
    direct = triton_attention(**inputs)
    via = attention(**inputs, backend="triton")
    assert torch.equal(via, direct) and via.transpose(1, 2).is_contiguous()
    set_backend("triton")
    try:
        assert torch.equal(attention(**inputs), direct)
    finally:
        set_backend("auto")
    torch_out = attention(**inputs, backend="torch")
    assert max_err(torch_out, direct, inputs["seq_len"]) < 1e-5
    if DEVICE.type == "cpu":  # only the interpreter refuses bf16: proof the kernel path ran
        bf16 = make_inputs(Case(1, 1, 17, 32), torch.bfloat16)
        assert attention(**bf16, backend="torch").dtype == torch.bfloat16
        set_backend("triton")
        try:
            with pytest.raises(BackendUnavailable, match="bf16"):
                attention(**bf16)
        finally:
            set_backend("auto")


def test_gradients_take_the_torch_path() -> None:
    inputs = make_inputs(Case(2, 1, 17, 32, plens=(4, 9), slots=(1, 0)), torch.float32)
    bank_k = inputs["bank_k"].clone().requires_grad_(True)
    with pytest.raises(BackendUnavailable, match="no backward"):
        attention(**{**inputs, "bank_k": bank_k}, backend="triton")
    set_backend("triton")
    try:
        out = attention(**{**inputs, "bank_k": bank_k})
    finally:
        set_backend("auto")
    out.sum().backward()
    assert bank_k.grad is not None and bank_k.grad.abs().sum() > 0


@pytest.mark.parametrize("change, error, match", [
    (lambda i: {**i, "q": i["q"].double(), "k": i["k"].double(), "v": i["v"].double(),
                "bank_k": i["bank_k"].double(), "bank_v": i["bank_v"].double()},
     AttentionInputError, "supports"),
    (lambda i: {**i, "slot": i["slot"].bool()}, AttentionInputError, "slot must hold integers"),
    (lambda i: {**i, "slot": None}, AttentionInputError, "slot"),
    (lambda i: {**i, "seq_len": i["slot"].float()}, AttentionInputError, "seq_len"),
], ids=["fp64", "bool-slot", "no-slot", "float-seq"])
def test_launcher_rejects_bad_inputs(change: object, error: type, match: str) -> None:
    inputs = make_inputs(Case(2, 1, 17, 32, plens=(4, 9), slots=(1, 0)), torch.float32)
    with pytest.raises(error, match=match):
        triton_attention(**change(inputs))
    with pytest.raises(error, match=match):
        triton_attention(**change(inputs), check=False)


def test_launcher_rejects_head_dims_past_128() -> None:
    inputs = make_inputs(Case(1, 1, 3, 160), torch.float32)
    with pytest.raises(AttentionInputError, match="head dims"):
        triton_attention(**inputs)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's bf16 limit applies to CPU tensors")
def test_bf16_on_the_interpreter_is_refused() -> None:
    assert ta.interpreting()
    inputs = make_inputs(Case(1, 1, 17, 32), torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bf16"):
        triton_attention(**inputs)


def test_autotune_candidates_depend_on_dtype_and_head_dim() -> None:
    full = ta._autotuned.configs
    assert len({ta._as_launch(c) for c in full}) == len(full)
    q32, q16 = torch.empty(1, dtype=torch.float32), torch.empty(1, dtype=torch.float16)
    for q, block_d, want in [(q16, 128, ta.GPU_CONFIGS), (q32, 64, ta.GPU_CONFIGS),
                             (q32, 128, ta.FP32_WIDE_CONFIGS)]:
        kept = ta._prune(full, {"Q": q}, BLOCK_D=block_d)
        assert sorted(map(ta._as_launch, kept), key=str) == sorted(want, key=str)


def test_cpu_tensors_without_the_interpreter_are_refused_clearly() -> None:
    code = (
        "import torch\n"
        "from kernels import BackendUnavailable, attention\n"
        "x = torch.randn(1, 1, 4, 16)\n"
        "try:\n"
        "    attention(x, x, x, None, None, None, None, None, 0.25, backend='triton')\n"
        "except BackendUnavailable as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout and "backend='torch'" in res.stdout
