"""Compile the kernel for a CUDA target without a GPU; run as a script, without TRITON_INTERPRET.

`python -m tests.kernels.aot_compile ARCH all|largest` prints one JSON line per compiled variant.
"""
from __future__ import annotations

import json
import os
import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# One head dim per compiled variant the launcher can produce: BLOCK_D in {16, 32, 64, 128},
# exact (no D mask) or padded (masked loads).
HEAD_DIMS = (16, 8, 32, 24, 64, 48, 128, 80)


def main(arch: int, which: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compiling needs the real Triton frontend"
    from kernels.triton_attention import block_d_for, compile_for_target, gpu_configs

    for name, dtype in DTYPES.items():
        for head_dim in HEAD_DIMS:
            configs = gpu_configs(dtype, block_d_for(head_dim))
            for c in configs if which == "all" else configs[:1]:  # the first one has the widest tiles
                k = compile_for_target(dtype, head_dim, c, arch)
                print(json.dumps({
                    "arch": arch, "dtype": name, "head_dim": head_dim, "config": list(c.__dict__.values()),
                    "shared": k.metadata.shared, "ptx_target": f"sm_{arch}" in k.asm["ptx"],
                    "cubin_bytes": len(k.asm["cubin"]),
                }), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
