"""Shared fixtures live in tests/fixtures/, one module per concern."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The client package of this checkout, not whichever copy is installed (e.g. editable from another tree).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))

# Triton reads TRITON_INTERPRET when it is imported: without CUDA, kernels run in its interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the client's tests run without torch too
    pass

pytest_plugins = [
    "tests.fixtures.vit",
    "tests.fixtures.redis_server",
    "tests.fixtures.digits",
    "tests.fixtures.live_server",
]
