"""GPU-only checks: bf16 (the interpreter's bf16 dots are wrong), ViT-B sizes, the autotuner."""
from __future__ import annotations

import pytest
import torch

import kernels.triton_attention as ta
from kernels import attention
from kernels.triton_attention import triton_attention
from tests.kernels.cases import Case, make_inputs, max_err, reference
from tests.kernels.test_triton_attention import FLOOR, check_against_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

VIT_B = Case(8, 12, 197, 64, plens=(0, 10, 50, 200), slots=(0, 1, 2, 3, 3, 2, 1, 0),
             seq=(197, 197, 200, 197, 180, 197, 197, 150))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case", [VIT_B, Case(4, 16, 257, 80, plens=(7, 31), slots=(1, 0, 1, 1)),
                                  Case(3, 6, 197, 128, plens=(5, 1), slots=(0, 1, 1))], ids=str)
def test_vit_sizes_match_reference(case: Case, dtype: torch.dtype) -> None:
    check_against_reference(make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_sorted_and_auto_dispatch_agree(dtype: torch.dtype) -> None:
    inputs = make_inputs(VIT_B, dtype)
    plain = triton_attention(**inputs)
    assert torch.equal(plain, triton_attention(**inputs, sort_by_task=True))
    assert torch.equal(plain, attention(**inputs))  # auto picks the kernel for CUDA tensors


def test_autotuner_caches_one_config_per_key() -> None:
    inputs = make_inputs(VIT_B, torch.float16)
    first = triton_attention(**inputs)
    assert len(ta._autotuned.cache) >= 1
    assert torch.equal(first, triton_attention(**inputs))


def test_large_bf16_logits() -> None:
    case = Case(2, 12, 197, 64, plens=(50, 3), slots=(0, 1), q_gain=20.0)
    inputs = make_inputs(case, torch.bfloat16)
    out = triton_attention(**inputs)
    ref, _ = reference(inputs)
    torch_err = max_err(attention(**inputs, backend="torch"), ref, None)
    assert max_err(out, ref, None) <= max(FLOOR[torch.bfloat16], 2 * torch_err)
