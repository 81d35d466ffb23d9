"""Prompt-fused attention in Triton: one online-softmax pass over own keys, then prompt keys.

Grid `(cdiv(N, BLOCK_M), B * H)`. Each program owns `BLOCK_M` query rows of one (sample, head).
Segment 1 walks the sample's first `seq_len[b]` own keys; segment 2 loads `t = slot[b]` and walks
the first `prompt_len[t]` rows of bank slot `t`, read in place through the bank's strides (a
per-layer view of a 5-D bank works as is). Nothing is gathered or concatenated. Accumulation is
fp32 (FlashAttention-2 online softmax in base 2); probabilities are cast to `v`'s dtype before the
PV product. Head dims that are not a power of two are padded up to `BLOCK_D` by masked loads.

On a GPU the launch configuration is autotuned; under Triton's interpreter (TRITON_INTERPRET=1,
CPU tensors) a fixed configuration runs, since the autotuner needs a GPU driver. fp32 dots use
`input_precision="ieee"` so fp32 results match a float64 reference to 1e-5 (TF32 would not);
serving runs fp16/bf16, where the precision flag has no effect.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from kernels.dispatch import check_inputs
from kernels.errors import AttentionInputError, BackendUnavailable

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
_MAX_GRID_Y = 65535  # CUDA limit on grid axis 1


@triton.jit
def _segment(
    acc, l_i, m_i, q, K, V,
    stride_kn, stride_kd, stride_vn, stride_vd,
    n_keys, D, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys [0, n_keys) of one (sample, head) into the running (acc, l_i, m_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_keys, BLOCK_N):
        cols = start + offs_n  # (BLOCK_N,)
        col_ok = cols < n_keys
        kt_ptrs = K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BLOCK_D, BLOCK_N)
        v_ptrs = V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
        if EVEN_D:
            kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            d_ok = offs_d < D
            kt = tl.load(kt_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)  # (BLOCK_M,)
        p = tl.exp2(s - m_use[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prompt_attention_fwd(
    Q, K, V, O, LSE, SEQ, SLOT, PLEN, BK, BV, ORDER,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bks, stride_bkh, stride_bkp, stride_bkd,
    stride_bvs, stride_bvh, stride_bvp, stride_bvd,
    H, N, D, P_MAX, B_START, qk_scale, N_BUCKET,
    HAS_SEQ: tl.constexpr, HAS_BANK: tl.constexpr, HAS_PLEN: tl.constexpr, HAS_ORDER: tl.constexpr,
    RETURN_LSE: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = (pid_bh % H).to(tl.int64)
    b = B_START + pid_bh // H
    if HAS_ORDER:  # programs run in task order; each still reads and writes its own sample
        b = tl.load(ORDER + b)
    b = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = offs_m < N
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_own = N
    if HAS_SEQ:
        n_own = tl.minimum(tl.load(SEQ + b), N)
    acc, l_i, m_i = _segment(
        acc, l_i, m_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd, n_own, D, qk_scale,
        BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION,
    )
    if HAS_BANK:
        t = tl.load(SLOT + b).to(tl.int64)
        n_prompt = P_MAX
        if HAS_PLEN:
            n_prompt = tl.minimum(tl.load(PLEN + t), P_MAX)
        acc, l_i, m_i = _segment(
            acc, l_i, m_i, q, BK + t * stride_bks + h * stride_bkh, BV + t * stride_bvs + h * stride_bvh,
            stride_bkp, stride_bkd, stride_bvp, stride_bvd, n_prompt, D, qk_scale,
            BLOCK_N, BLOCK_D, EVEN_D, DOT_PRECISION,
        )

    out = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)
    if RETURN_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
        tl.store(LSE + (b * H + h) * N + offs_m, lse, mask=row_ok)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The interpreter runs one program at a time in numpy: large tiles mean fewer, cheaper programs.
INTERPRETER_CONFIG = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=1)
GPU_CONFIGS = (  # fp16/bf16, and fp32 up to BLOCK_D = 64
    LaunchConfig(128, 64, 8, 3),
    LaunchConfig(128, 32, 4, 3),
    LaunchConfig(64, 64, 4, 3),
    LaunchConfig(64, 32, 4, 2),
)
# fp32 dots at BLOCK_D = 128 run on FMA units (input_precision="ieee"): the (BLOCK_M, BLOCK_D) q
# tile and accumulator live in registers, so wide tiles spill (and take ptxas half a minute).
FP32_WIDE_CONFIGS = (
    LaunchConfig(64, 32, 8, 2),
    LaunchConfig(64, 32, 4, 2),
    LaunchConfig(32, 32, 4, 2),
)


def gpu_configs(dtype: torch.dtype, block_d: int) -> list[LaunchConfig]:
    """The configurations the autotuner tries for this dtype and padded head dim, widest tiles first."""
    if dtype == torch.float32 and block_d >= 128:
        return list(FP32_WIDE_CONFIGS)
    return list(GPU_CONFIGS)


def _as_launch(c: triton.Config) -> LaunchConfig:
    return LaunchConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    allowed = gpu_configs(named_args["Q"].dtype, kwargs["BLOCK_D"])
    return [c for c in configs if _as_launch(c) in allowed]


_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                           num_stages=c.num_stages) for c in dict.fromkeys((*GPU_CONFIGS, *FP32_WIDE_CONFIGS))],
    key=["N_BUCKET", "HAS_BANK", "EVEN_D", "BLOCK_D"],
    prune_configs_by={"early_config_prune": _prune},
)(_prompt_attention_fwd)


def block_d_for(head_dim: int) -> int:
    """Padded head dim: the next power of two, at least 16 (`tl.dot` needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def interpreting() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels run in numpy on the CPU)."""
    return isinstance(_prompt_attention_fwd, InterpretedFunction)


def _check_index(name: str, t: Tensor | None, device: torch.device) -> None:
    if t is None:
        return
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise AttentionInputError(f"{name} must hold integers, got {t.dtype}")
    if t.device != device:
        raise AttentionInputError(f"{name} is on {t.device} but q is on {device}")


def _check_launch(q: Tensor, seq_len: Tensor | None, slot: Tensor | None, prompt_len: Tensor | None) -> None:
    """What the Triton path needs beyond the shared input checks."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise AttentionInputError(f"Triton attention supports {SUPPORTED_DTYPES}, got {q.dtype}")
    D = q.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise AttentionInputError(f"Triton attention supports head dims 1..{MAX_HEAD_DIM}, got {D}")
    for name, t in (("seq_len", seq_len), ("slot", slot), ("prompt_len", prompt_len)):
        _check_index(name, t, q.device)
    if q.is_cuda:
        return
    if not interpreting():
        raise BackendUnavailable(
            "the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"to run on {q.device}; use backend='torch' instead")
    if q.dtype == torch.bfloat16:
        raise BackendUnavailable("Triton's interpreter computes bf16 dots wrongly; use fp16/fp32 on CPU")


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor,
    seq_len: Tensor | None,
    bank_k: Tensor | None, bank_v: Tensor | None,
    slot: Tensor | None, prompt_len: Tensor | None,
    scale: float,
    *,
    return_lse: bool = False,
    sort_by_task: bool = False,
    check: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """(B, H, N, D) attention over [own valid keys ; task's valid prompt keys], optionally with LSE.

    The output is a (B, H, N, D) view of (B, N, H, D) memory, so merging heads afterwards
    (`out.transpose(1, 2).reshape(B, N, H * D)`) is free. The LSE is (B, H, N) fp32, natural log.
    `sort_by_task` runs the programs of one task's samples together, so its prompt rows stay in L2.
    `check=False` skips the shape checks shared with the torch path (dtype, head dim, device checks
    of this launcher always run). Slot indices must lie in [0, slots): they are not checked on the device.
    """
    if check:
        check_inputs(q, k, v, seq_len, bank_k, bank_v, slot, prompt_len)
    _check_launch(q, seq_len, slot, prompt_len)
    B, H, N, D = q.shape
    out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)  # (B, H, N, D)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if return_lse else None
    if B == 0 or N == 0:
        return (out, lse) if return_lse else out

    has_bank = bank_k is not None and bank_k.shape[2] > 0
    if has_bank and slot is None:
        raise AttentionInputError("slot must be given with a bank")
    bk, bv = (bank_k, bank_v) if has_bank else (q, q)
    order = torch.argsort(slot, stable=True) if (sort_by_task and has_bank) else None  # (B,)
    block_d = block_d_for(D)
    dummy = out  # stands in for absent pointers; never dereferenced
    args = [
        q, k, v, out, lse if lse is not None else dummy,
        seq_len if seq_len is not None else dummy, slot if has_bank else dummy,
        prompt_len if (has_bank and prompt_len is not None) else dummy, bk, bv,
        order if order is not None else dummy,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *(bk.stride() if has_bank else (0, 0, 0, 0)), *(bv.stride() if has_bank else (0, 0, 0, 0)),
    ]
    meta = {
        "HAS_SEQ": seq_len is not None, "HAS_BANK": has_bank, "HAS_PLEN": has_bank and prompt_len is not None,
        "HAS_ORDER": order is not None, "RETURN_LSE": return_lse, "EVEN_D": D == block_d,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32", "BLOCK_D": block_d,
    }
    p_max = bk.shape[2] if has_bank else 0
    qk_scale = float(scale) * 1.4426950408889634  # fold log2(e) in: the kernel works in base 2
    per_launch = max(1, _MAX_GRID_Y // H)
    for b0 in range(0, B, per_launch):
        nb = min(per_launch, B - b0)
        scalars = (H, N, D, p_max, b0, qk_scale, triton.next_power_of_2(N))
        _launch(args, scalars, meta, nb * H, N, q.is_cuda)
    return (out, lse) if return_lse else out


def _launch(args: list, scalars: tuple, meta: dict, programs_bh: int, N: int, on_gpu: bool) -> None:
    if on_gpu and not interpreting():
        def grid(m: dict) -> tuple[int, int]:
            return triton.cdiv(N, m["BLOCK_M"]), programs_bh

        _autotuned[grid](*args, *scalars, **meta)
        return
    c = INTERPRETER_CONFIG
    grid = (triton.cdiv(N, c.block_m), programs_bh)
    _prompt_attention_fwd[grid](*args, *scalars, **meta, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                                num_warps=c.num_warps, num_stages=c.num_stages)


_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TENSOR_ARGS = ("Q", "K", "V", "O", "BK", "BV")


def compile_for_target(dtype: torch.dtype, head_dim: int, config: LaunchConfig, arch: int) -> object:
    """Compile the kernel ahead of time for CUDA compute capability `arch` (e.g. 80, 90): no GPU needed.

    Every optional input is present and unit strides are specialised, as in a real launch. Returns
    Triton's compiled kernel (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared` bytes per program).
    Must run in a process where triton was imported without TRITON_INTERPRET.
    """
    from triton.backends.compiler import GPUTarget

    block_d = block_d_for(head_dim)
    const: dict[str, object] = {
        "HAS_SEQ": True, "HAS_BANK": True, "HAS_PLEN": True, "HAS_ORDER": True, "RETURN_LSE": True,
        "EVEN_D": head_dim == block_d, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_D": block_d,
    }
    signature: dict[str, str] = {}
    for name in _prompt_attention_fwd.arg_names:
        if name in _TENSOR_ARGS:
            signature[name] = f"*{_TL_DTYPE[dtype]}"
        elif name == "LSE":
            signature[name] = "*fp32"
        elif name in ("SEQ", "SLOT", "PLEN", "ORDER"):
            signature[name] = "*i64"
        elif name.startswith("stride_") and name.endswith("d"):
            const[name] = 1  # what Triton does with a stride of 1 at launch
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if name in const:
            signature[name] = "constexpr"
    names = _prompt_attention_fwd.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*_TENSOR_ARGS, "LSE")}
    src = triton.compiler.ASTSource(fn=_prompt_attention_fwd, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})
