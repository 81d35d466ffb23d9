"""What a prediction returns to the route that asked: per image its top-k, the version served, timings.

The engine's batcher makes these; the HTTP routes read them, in the same process or, in a front end,
rebuilt from the channel's answer (server/frontend/engine_client.py). Nothing here needs torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TopK:
    label: str
    index: int
    score: float


@dataclass
class Outcome:
    """One request's answer: per image its top-k, the version served, and timings in ms."""

    version: int
    results: list[list[TopK]]
    queue_ms: float
    forward_ms: float
    batch_images: int
