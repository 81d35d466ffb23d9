"""Checking analytic gradients against central finite differences, shared by the engine and methods tests."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def check_directional_derivatives(loss_fn: Callable[[], torch.Tensor], trainable: Sequence[torch.Tensor],
                                  directions: int, eps: float = 1e-6, seed: int = 0) -> None:
    """After `loss_fn().backward()`: for `directions` random directions u, sum(grad * u) must equal
    (loss(p + eps u) - loss(p - eps u)) / (2 eps) (float64 parameters); the parameters end as they began."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        dirs = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in trainable]
        analytic = sum((p.grad * u).sum() for p, u in zip(trainable, dirs))
        with torch.no_grad():
            for p, u in zip(trainable, dirs):
                p += eps * u
            up = loss_fn()
            for p, u in zip(trainable, dirs):
                p -= 2 * eps * u
            down = loss_fn()
            for p, u in zip(trainable, dirs):
                p += eps * u
        torch.testing.assert_close((up - down) / (2 * eps), analytic, rtol=1e-5, atol=1e-8)
