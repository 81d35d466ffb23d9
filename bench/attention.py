"""Prompt-fused attention against its alternatives, and whole-model images/s.

    python bench/attention.py [--part attention|model|all]

Attention (ViT-B/16 shapes: H = 12, N = 197, D = 64): the fused Triton kernel, gather + cat + SDPA
(unmasked when every sample has the same prompt count, masked otherwise), FlexAttention over the
gathered keys with a block mask rebuilt for the batch's task mix, and prompts-as-tokens (the official
formulation: prompt rows are queries too). Useful TFLOP/s counts 4 * B * H * N * (N + mean p) * D
for every method. Model: images/s at batch 256 in bf16 for the engine with the kernel, the engine
with the torch path, and the prompt-free timm ViT.

Prints one JSON line per case, each with the device name and the ratios measured in that run. Without
CUDA it runs the torch paths only, at small sizes, and says so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import set_backend
from kernels.torch_attention import torch_attention

H, N, D = 12, 197, 64
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if GPU else f"cpu ({torch.get_num_threads()} threads)"
MODE = "gpu" if GPU else "cpu: torch paths only, small sizes (no CUDA device)"


def emit(record: dict) -> None:
    print(json.dumps({"device": DEVICE_NAME, "mode": MODE, **record}), flush=True)


def _once_ms(fn: Callable[[], object]) -> float:
    if GPU:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_all(fns: dict[str, Callable[[], object]], reps: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median milliseconds per method, the methods run round-robin so that drift hits all alike.

    A method that fails (e.g. a baseline this torch cannot compile) is reported in the errors instead.
    """
    errors: dict[str, str] = {}
    live = {}
    for name, fn in fns.items():
        try:
            fn()  # warm-up: compilation, autotuning, allocator
            if GPU:
                torch.cuda.synchronize()
            live[name] = fn
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(reps):
        for name, fn in live.items():
            times[name].append(_once_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}, errors


def make_batch(B: int, p_spec: str, tasks: str, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """q, k, v as views of one fused projection; deep-prompt bank (S, H, P, D) as a per-layer view."""
    S = 1 if tasks == "one" else B
    if p_spec == "mixed":
        plens = torch.tensor([10, 50, 200])[torch.arange(S) % 3]  # (S,)
    else:
        plens = torch.full((S,), int(p_spec))
    P = int(plens.max())
    qkv = torch.randn(B, N, 3, H, D, generator=gen).to(DEVICE, dtype)  # (B, N, 3, H, D)
    qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    bank = torch.randn(2, 2, S, H, P, D, generator=gen).to(DEVICE, dtype)  # (kv, L, S, H, P, D)
    slot = torch.randperm(B, generator=gen).to(DEVICE) % S  # (B,)
    q, k, v = qkv.unbind(0)
    return {"q": q, "k": k, "v": v, "seq_len": None, "bank_k": bank[0, 1], "bank_v": bank[1, 1], "slot": slot,
            "prompt_len": plens.to(DEVICE), "scale": D ** -0.5}


def prompts_as_tokens(x: dict) -> Callable[[], torch.Tensor]:
    """The official formulation: sequences [tokens ; prompts] prebuilt, queries for every row."""
    plen = x["prompt_len"].index_select(0, x["slot"])  # (B,)
    P = int(plen.max())
    pk = x["bank_k"].index_select(0, x["slot"])  # (B, H, P, D)
    pv = x["bank_v"].index_select(0, x["slot"])
    q = torch.cat([x["q"], pk], dim=2)  # (B, H, N + P, D); prompt rows stand in for their queries
    k = torch.cat([x["k"], pk], dim=2)
    v = torch.cat([x["v"], pv], dim=2)
    mask = None
    if bool((plen != P).any()):
        keep = torch.arange(N + P, device=DEVICE)[None, :] < (N + plen)[:, None]  # (B, N + P)
        mask = keep[:, None, None, :]  # (B, 1, 1, N + P)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=x["scale"])


def flex(x: dict) -> Callable[[], torch.Tensor]:
    """FlexAttention over gathered keys; the block mask depends on the task mix, so it is rebuilt per call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    slot, prompt_len, B = x["slot"], x["prompt_len"], x["q"].shape[0]

    def run() -> torch.Tensor:
        plen = prompt_len.index_select(0, slot)  # (B,)
        P = x["bank_k"].shape[2]
        k = torch.cat([x["k"], x["bank_k"].index_select(0, slot)], dim=2)  # (B, H, N + P, D)
        v = torch.cat([x["v"], x["bank_v"].index_select(0, slot)], dim=2)
        def valid_key(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            return ki < N + plen[b]

        block_mask = create_block_mask(valid_key, B, None, N, N + P, device=DEVICE)
        return compiled(x["q"], k, v, block_mask=block_mask, scale=x["scale"])

    return run


def bench_attention() -> None:
    from itertools import product

    dtype = torch.bfloat16 if GPU else torch.float32
    sizes, reps = ((64, 256), 20) if GPU else ((4, 16), 3)
    gen = torch.Generator().manual_seed(0)
    for B, p_spec, tasks in product(sizes, ("10", "50", "200", "mixed"), ("one", "distinct")):
        if p_spec == "mixed" and tasks == "one":
            continue
        x = make_batch(B, p_spec, tasks, dtype, gen)
        mean_p = float(x["prompt_len"].index_select(0, x["slot"]).float().mean())
        flop = 4 * B * H * N * (N + mean_p) * D
        methods: dict[str, Callable[[], object]] = {
            "sdpa_gather_cat": lambda x=x: torch_attention(**x),
            "prompts_as_tokens": prompts_as_tokens(x),
            "sdpa_no_prompts": lambda x=x: F.scaled_dot_product_attention(
                x["q"], x["k"], x["v"], scale=x["scale"]),
        }
        if GPU:
            from kernels.triton_attention import triton_attention

            methods = {"fused": lambda x=x, s=tasks != "one": triton_attention(**x, sort_by_task=s),
                       "flex": flex(x), **methods}
        record: dict = {"case": "attention", "B": B, "H": H, "N": N, "D": D, "p": p_spec, "tasks": tasks,
                        "mean_p": mean_p, "dtype": str(dtype).removeprefix("torch."),
                        "useful_gflop": round(flop / 1e9, 3)}
        times, errors = time_all(methods, reps)
        for name, ms in times.items():
            record[f"{name}_ms"] = round(ms, 4)
            record[f"{name}_tflops"] = round(flop / ms / 1e9, 3)
        record.update({f"{name}_error": err for name, err in errors.items()})
        base = "fused" if GPU else "sdpa_gather_cat"  # ratios: time of each method / time of the base
        for name in methods:
            if name != base and f"{name}_ms" in record and f"{base}_ms" in record:
                record[f"{name}_time_vs_{base}"] = round(record[f"{name}_ms"] / record[f"{base}_ms"], 3)
        emit(record)


def _engine(bb: object, images: torch.Tensor, table: object, slot: torch.Tensor,
            backend: str) -> Callable[[], object]:
    from vpt.engine import forward_logits

    def run() -> object:
        set_backend(backend)
        try:
            return forward_logits(bb, images, table, slot)
        finally:
            set_backend("auto")

    return run


def bench_model() -> None:
    from vpt.backbone import load_backbone
    from vpt.engine import stack_slots, task_slot_tensors
    from vpt.task import TaskParams, TaskSpec

    model_name, B, dtype, reps = (("vit_base_patch16_224", 256, torch.bfloat16, 10) if GPU
                                  else ("vit_small_patch16_224", 8, torch.float32, 3))
    bb = load_backbone(model_name, pretrained=False, device=DEVICE, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for p in (10, 50, 200):
        spec = TaskSpec(method="vpt-deep", num_prompts=p, classes=tuple(f"c{j}" for j in range(10)))
        table = stack_slots(bb, [task_slot_tensors(bb, TaskParams.new(spec, bb, generator=gen)) for _ in range(16)])
        slot = (torch.arange(B) % 16).to(DEVICE)  # (B,) all 16 tasks in every batch
        images = torch.randn(B, 3, 224, 224, generator=gen).to(DEVICE, dtype)  # (B, 3, 224, 224)
        runs = {"timm_prompt_free": lambda images=images: bb.model.forward_features(images),
                "engine_torch": _engine(bb, images, table, slot, "torch")}
        if GPU:
            runs["engine_triton"] = _engine(bb, images, table, slot, "triton")
        with torch.inference_mode():
            times, errors = time_all(runs, reps)
        record: dict = {"case": "model", "backbone": model_name, "batch": B, "p": p, "tasks": 16,
                        "dtype": str(dtype).removeprefix("torch.")}
        record.update({f"{k}_error": err for k, err in errors.items()})
        record.update({f"{k}_img_s": round(B / ms * 1e3, 1) for k, ms in times.items()})
        if "timm_prompt_free" in times:
            for k in sorted(times.keys() - {"timm_prompt_free"}):
                record[f"{k}_speed_vs_prompt_free"] = round(times["timm_prompt_free"] / times[k], 3)
        if "engine_triton" in times and "engine_torch" in times:
            record["engine_triton_speed_vs_engine_torch"] = round(times["engine_torch"] / times["engine_triton"], 3)
        emit(record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("attention", "model", "all"), default="all")
    args = ap.parse_args()
    if not GPU:
        emit({"note": "no CUDA device: the fused kernel, FlexAttention and bf16 are skipped; "
                      "sizes are reduced (attention B in {4, 16}; model vit_small, batch 8, fp32)"})
    if args.part in ("attention", "all"):
        bench_attention()
    if args.part in ("model", "all"):
        bench_model()


if __name__ == "__main__":
    main()
