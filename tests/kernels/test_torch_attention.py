"""The torch path (gather + cat + SDPA) against the float64 reference, and the entry point's checks."""
from __future__ import annotations

import pytest
import torch

from kernels import (
    AttentionInputError,
    attention,
    attention_reference,
    get_backend,
    resolve_backend,
    set_backend,
)
from kernels.torch_attention import _key_mask, torch_attention
from tests.kernels.cases import Case, make_inputs, max_err

CASES = [
    Case(3, 2, 17, 32, plens=(5, 5), slots=(0, 1, 1)),                            # equal lengths: no mask
    Case(3, 2, 17, 32, plens=(0, 1, 15, 16, 17, 20), slots=(5, 1, 5), seq=(17, 9, 1)),
    Case(3, 1, 197, 64, plens=(0, 50), slots=(0, 1, 0), seq=(197, 150, 17)),
    Case(1, 2, 1, 32, plens=(0, 17), slots=(1,)),
    Case(3, 2, 17, 64, seq=(17, 5, 16)),
    Case(2, 2, 17, 32),
    Case(2, 2, 17, 32, plens=(0, 0), slots=(0, 1), p_max=3),                      # bank rows, none valid
    Case(3, 2, 17, 32, plens=(4, 9), slots=(1, 0, 1), contiguous=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_float64_equals_reference(case: Case) -> None:
    inputs = make_inputs(case, torch.float64, device=torch.device("cpu"))
    out = torch_attention(**inputs)
    ref, _ = attention_reference(**inputs)
    assert out.shape == inputs["q"].shape
    assert max_err(out, ref, inputs["seq_len"]) <= 1e-10


@pytest.mark.parametrize("case", CASES[1:3], ids=str)
def test_float32_close_to_reference(case: Case) -> None:
    inputs = make_inputs(case, torch.float32, device=torch.device("cpu"))
    ref, _ = attention_reference(**inputs)
    assert max_err(torch_attention(**inputs), ref, inputs["seq_len"]) <= 1e-5


def test_mask_only_when_lengths_differ() -> None:
    assert _key_mask(17, 5, torch.tensor([17, 17]), torch.tensor([5, 5]), torch.device("cpu")) is None
    assert _key_mask(17, 0, None, None, torch.device("cpu")) is None
    mask = _key_mask(4, 3, torch.tensor([4, 2]), torch.tensor([3, 1]), torch.device("cpu"))
    assert mask.shape == (2, 1, 1, 7)
    assert mask[:, 0, 0].tolist() == [[True] * 7, [True, True, False, False, True, False, False]]


def test_backend_selection() -> None:
    q = torch.zeros(1, 1, 2, 16)
    assert get_backend() == "auto" and resolve_backend(q) == "torch"
    assert resolve_backend(q, "triton") == "triton"
    assert resolve_backend(q, needs_grad=True) == "torch"
    with pytest.raises(AttentionInputError, match="unknown attention backend"):
        set_backend("cuda")
    with pytest.raises(AttentionInputError, match="unknown attention backend"):
        attention(q, q, q, None, None, None, None, None, 1.0, backend="flash")
    assert get_backend() == "auto"


def _base() -> dict:
    return make_inputs(Case(2, 2, 5, 16, plens=(3, 4), slots=(0, 1)), torch.float32, device=torch.device("cpu"))


BAD = [
    ("q-3d", lambda i: {**i, "q": i["q"][0]}, "q must be"),
    ("k-shape", lambda i: {**i, "k": i["k"][:, :, :3]}, "shapes differ"),
    ("v-dtype", lambda i: {**i, "v": i["v"].double()}, "dtypes differ"),
    ("k-device", lambda i: {**i, "k": i["k"].to("meta")}, "one device"),
    ("seq-shape", lambda i: {**i, "seq_len": torch.tensor([5])}, "seq_len"),
    ("seq-float", lambda i: {**i, "seq_len": torch.tensor([5.0, 5.0])}, "seq_len"),
    ("bank-half", lambda i: {**i, "bank_v": None}, "both"),
    ("bank-heads", lambda i: {**i, "bank_k": i["bank_k"][:, :1], "bank_v": i["bank_v"][:, :1]}, "bank must be"),
    ("bank-v-shape", lambda i: {**i, "bank_v": i["bank_v"][:, :, :2]}, "differ"),
    ("bank-dtype", lambda i: {**i, "bank_k": i["bank_k"].half(), "bank_v": i["bank_v"].half()}, "bank dtype"),
    ("bank-device", lambda i: {**i, "bank_k": i["bank_k"].to("meta"), "bank_v": i["bank_v"].to("meta")},
     "one device"),
    ("no-slot", lambda i: {**i, "slot": None}, "slot must be"),
    ("slot-float", lambda i: {**i, "slot": torch.tensor([0.0, 1.0])}, "slot must be"),
    ("plen-shape", lambda i: {**i, "prompt_len": torch.tensor([3])}, "prompt_len"),
]


@pytest.mark.parametrize("name, change, match", BAD, ids=[b[0] for b in BAD])
def test_entry_point_rejects_mismatched_inputs(name: str, change: object, match: str) -> None:
    with pytest.raises(AttentionInputError, match=match):
        attention(**change(_base()))


def test_entry_point_accepts_the_good_inputs() -> None:
    inputs = _base()
    ref, _ = attention_reference(**inputs)
    assert max_err(attention(**inputs), ref, None) <= 1e-5
