"""Typed views of the server's JSON objects (docs/api.md). Unknown fields are kept, never refused."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vpt_client._constants import JOB_TERMINAL_STATES

__all__ = [
    "Backbone", "Health", "Job", "JobError", "JobProgress", "Prediction", "PredictionResult",
    "Readiness", "Task", "Timings", "TopK", "Version",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Task(_Model):
    task_id: str
    current_version: int | None = None
    num_versions: int = 0
    method: str | None = None
    num_prompts: int | None = None
    head: str | None = None
    pooling: str | None = None
    trainable_parameters: int | None = None
    bank_bytes: int | None = None
    classes: list[str] = Field(default_factory=list)
    backbone: str | None = None
    backbone_fingerprint: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    size_bytes: int | None = None
    metrics: dict[str, Any] | None = None
    num_classes: int | None = None       # the listing gives this instead of `classes`
    val_accuracy: float | None = None    # the listing's one metric
    servable: bool = True
    reason: str | None = None

    @property
    def class_count(self) -> int:
        """The number of classes, from a listing (`num_classes`) or a full task (`classes`)."""
        return self.num_classes if self.num_classes is not None else len(self.classes)


class Version(_Model):
    version: int
    current: bool = False
    created_at: datetime | None = None
    method: str | None = None
    num_prompts: int | None = None
    head: str | None = None
    pooling: str | None = None
    trainable_parameters: int | None = None
    bank_bytes: int | None = None
    classes: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    metrics: dict[str, Any] | None = None


class JobProgress(_Model):
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    val_acc: float | None = None
    fraction: float | None = None
    run: int | None = None          # a sweep's run, 1-based, of `runs`
    runs: int | None = None
    base_lr: float | None = None    # this run's values
    weight_decay: float | None = None
    method: str | None = None
    leaderboard: list[dict[str, Any]] | None = None


class JobError(_Model):
    code: str = "error"
    message: str = ""
    details: Any = None  # e.g. the dataset entries that made the job fail


class Job(_Model):
    job_id: str
    task_id: str | None = None
    state: str
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    progress: JobProgress | None = None
    metrics: dict[str, Any] | None = None
    error: JobError | None = None
    version: int | None = None

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in JOB_TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"


class TopK(_Model):
    label: str
    index: int
    score: float


class PredictionResult(_Model):
    image: int
    filename: str | None = None
    top_k: list[TopK] = Field(default_factory=list)

    @property
    def label(self) -> str | None:
        """The best label, or None when the answer holds no candidates."""
        return self.top_k[0].label if self.top_k else None

    @property
    def score(self) -> float | None:
        return self.top_k[0].score if self.top_k else None


class Timings(_Model):
    decode: float | None = None
    queue: float | None = None
    forward: float | None = None
    total: float | None = None


class Prediction(_Model):
    task_id: str
    version: int | None = None
    results: list[PredictionResult] = Field(default_factory=list)
    timings_ms: Timings | None = None

    @property
    def labels(self) -> list[str | None]:
        """The best label of every image, in the order they were sent."""
        return [r.label for r in self.results]


class Backbone(_Model):
    name: str
    fingerprint: str | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | list[int] | None = None  # an int or [h, w]
    input_size: list[int] = Field(default_factory=list)
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)
    interpolation: str | None = None
    crop_pct: float | None = None
    device: str | None = None
    dtype: str | None = None


class Health(_Model):
    status: str


class Readiness(_Model):
    """GET /readyz: `ready` is False when the server answered 503 `not_ready`."""

    status: str
    checks: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"
