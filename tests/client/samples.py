"""JSON objects shaped as docs/api.md describes them, with an extra field each (the SDK must keep it)."""
from __future__ import annotations

from typing import Any

TASK: dict[str, Any] = {
    "task_id": "digits", "current_version": 2, "num_versions": 2, "method": "vpt-deep", "num_prompts": 10,
    "classes": ["0", "1", "2"], "backbone": "vit_tiny_patch16_224", "backbone_fingerprint": "sha256:ab12",
    "created_at": "2026-01-02T03:04:05Z", "updated_at": "2026-01-02T03:05:06+00:00", "size_bytes": 123456,
    "metrics": {"val_acc": 0.97}, "tenant_note": "extra",
}

VERSION: dict[str, Any] = {
    "version": 1, "current": False, "created_at": "2026-01-02T03:04:05Z", "method": "vpt-shallow",
    "num_prompts": 5, "classes": ["0", "1"], "size_bytes": 2048, "metrics": None, "sha": "x",
}

BACKBONE: dict[str, Any] = {
    "name": "vit_tiny_patch16_224", "fingerprint": "sha256:ab12", "embed_dim": 64, "depth": 4,
    "num_heads": 2, "patch_size": 8, "input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.9, "device": "cpu",
    "dtype": "float32", "params": 12345,
}


def job(state: str = "running", epoch: int | None = 1, epochs: int = 4, version: int | None = None,
        error: dict[str, str] | None = None, job_id: str = "j-1") -> dict[str, Any]:
    progress = None if epoch is None else {
        "epoch": epoch, "epochs": epochs, "step": epoch * 10, "steps": epochs * 10, "loss": 0.5 / (epoch + 1),
        "lr": 0.01, "images_per_s": 250.0, "eta_s": 12.5, "val_acc": 0.5 + 0.1 * epoch, "fraction": epoch / epochs,
    }
    done = state in ("succeeded", "failed", "cancelled")
    return {
        "job_id": job_id, "task_id": "digits", "state": state, "created_at": "2026-01-02T03:04:05Z",
        "updated_at": "2026-01-02T03:04:06Z", "started_at": None if state == "queued" else "2026-01-02T03:04:06Z",
        "finished_at": "2026-01-02T03:09:00Z" if done else None,
        "options": {"method": "vpt-deep", "num_prompts": 10}, "progress": progress,
        "metrics": {"val_acc": 0.93} if state == "succeeded" else None, "error": error,
        "version": version, "worker": "w-1",
    }


PREDICTION: dict[str, Any] = {
    "task_id": "digits", "version": 2,
    "results": [
        {"image": 0, "filename": "a.png", "top_k": [{"label": "7", "index": 7, "score": 0.9},
                                                    {"label": "1", "index": 1, "score": 0.05}]},
        {"image": 1, "filename": None, "top_k": [{"label": "3", "index": 3, "score": 0.8}]},
    ],
    "timings_ms": {"decode": 1.5, "queue": 0.2, "forward": 3.0, "total": 5.1},
}
