"""Response models (they document the API in OpenAPI) and their construction from store records."""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, Field

from prompt_store.records import JobRecord, TaskInfo, TaskVersion


class ErrorBody(BaseModel):
    code: str = Field(examples=["task_not_found"])
    message: str = Field(examples=["no task 'flowers' for this tenant"])
    details: Any = None
    request_id: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


class ReadyOut(BaseModel):
    status: str = Field(examples=["ready"])
    checks: dict[str, str] = Field(examples=[{"backbone": "ok", "batcher": "ok", "store": "ok", "disk": "ok"}])
    details: dict[str, Any] = Field(default_factory=dict, description="e.g. `unservable_tasks`, with a hint")


class VersionOut(BaseModel):
    version: int = Field(examples=[3])
    current: bool
    created_at: float
    method: str = Field(examples=["vpt-deep"])
    num_prompts: int = Field(examples=[10])
    classes: list[str] = Field(examples=[["daisy", "rose", "tulip"]])
    head: str = Field("linear", examples=["linear", "mlp-3"])
    pooling: str = Field("cls", examples=["cls"])
    trainable_parameters: int | None = Field(None, description="values the method trains (head included)")
    bank_bytes: int | None = Field(None, description="bytes this task takes in the serving bank")
    size_bytes: int
    metrics: dict[str, Any] | None = Field(
        None, description="training facts: val_accuracy, per_class_accuracy, confusion_matrix, epochs, ...; "
                          "`feature_map` only from `GET /tasks/{task_id}/versions/{n}`")
    training: dict[str, Any] | None = Field(None, description="the recipe: options as given and what they resolved to")


class TaskOut(BaseModel):
    task_id: str = Field(examples=["flowers"])
    current_version: int
    num_versions: int
    method: str = Field(examples=["vpt-deep"])
    num_prompts: int = Field(examples=[10])
    classes: list[str] = Field(examples=[["daisy", "rose", "tulip"]])
    backbone: str = Field(examples=["vit_base_patch16_224.orig_in21k"])
    backbone_fingerprint: str
    created_at: float
    updated_at: float
    head: str = Field("linear", examples=["linear", "mlp-3"])
    pooling: str = Field("cls", examples=["cls"])
    trainable_parameters: int | None = Field(None, description="values the method trains (head included)")
    bank_bytes: int | None = Field(None, description="bytes this task takes in the serving bank")
    size_bytes: int
    metrics: dict[str, Any] | None = None
    servable: bool = Field(True, description="false when this server's backbone cannot serve the current version")
    reason: str | None = Field(None, description="why the task is not servable (e.g. backbone_mismatch)")


class TaskSummary(BaseModel):
    """A task in `GET /tasks`: what is cheap to show for many; `GET /tasks/{task_id}` has the rest
    (class names, metrics)."""

    task_id: str = Field(examples=["flowers"])
    current_version: int
    num_versions: int
    method: str = Field(examples=["vpt-deep"])
    num_prompts: int = Field(examples=[10])
    num_classes: int = Field(examples=[5])
    head: str = Field("linear", examples=["linear", "mlp-3"])
    pooling: str = Field("cls", examples=["cls"])
    backbone: str = Field(examples=["vit_base_patch16_224.orig_in21k"])
    backbone_fingerprint: str
    created_at: float
    updated_at: float
    size_bytes: int
    bank_bytes: int | None = Field(None, description="bytes this task takes in the serving bank")
    val_accuracy: float | None = Field(None, description="the current version's validation accuracy, if known")
    servable: bool = Field(True, description="false when this server's backbone cannot serve the current version")
    reason: str | None = Field(None, description="why the task is not servable (e.g. backbone_mismatch)")


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last page")


class VersionList(BaseModel):
    versions: list[VersionOut]


class JobOut(BaseModel):
    job_id: str
    task_id: str
    state: str = Field(examples=["running"])
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    version: int | None = None
    worker: str | None = None
    cancel_requested: bool = False


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last page")


class TopKOut(BaseModel):
    label: str = Field(examples=["rose"])
    index: int = Field(examples=[1])
    score: float = Field(examples=[0.93])


class ImageResult(BaseModel):
    image: int
    filename: str | None = None
    top_k: list[TopKOut]


class PredictionOut(BaseModel):
    task_id: str
    version: int
    results: list[ImageResult]
    timings_ms: dict[str, float] = Field(examples=[{"decode": 2.1, "queue": 3.0, "forward": 41.0, "total": 47.5}])


class BackboneOut(BaseModel):
    name: str
    fingerprint: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: list[int]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float
    crop_mode: str | None = None
    device: str
    dtype: str


_SURROGATE = re.compile("[\ud800-\udfff]")


def safe_text(value: Any) -> Any:
    """Stored text as JSON-safe text: lone surrogates (undecodable names) become U+FFFD, in nested values too."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {safe_text(k): safe_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [safe_text(v) for v in value]
    return value


def _json_field(meta: dict[str, str], key: str, default: Any) -> Any:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        return safe_text(json.loads(raw))
    except (TypeError, ValueError, RecursionError):
        return default


def _dict_field(meta: dict[str, str], key: str) -> dict[str, Any] | None:
    value = _json_field(meta, key, None)
    return value if isinstance(value, dict) else None


# Metrics entries too large for listings: only `GET /tasks/{id}/versions/{n}` returns them.
DETAIL_METRICS = ("feature_map",)


def summary(metrics: Any) -> dict[str, Any] | None:
    """`metrics` without the entries only the version route returns (None unless a dict)."""
    return {k: v for k, v in metrics.items() if k not in DETAIL_METRICS} if isinstance(metrics, dict) else None


def _summary_metrics(meta: dict[str, str], full: bool = False) -> dict[str, Any] | None:
    metrics = _json_field(meta, "metrics", None)
    if not isinstance(metrics, dict):
        return None
    return metrics if full else summary(metrics)


def _int_field(meta: dict[str, str], key: str) -> int | None:
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return None


def method_fields(meta: dict[str, str], element_size: int) -> dict[str, Any]:
    """Head, pooling, trainable parameters and bank bytes (at the serving dtype) of a task file's metadata."""
    values = _int_field(meta, "bank_values")
    return {"head": meta.get("head", "linear"), "pooling": meta.get("pooling", "cls"),
            "trainable_parameters": _int_field(meta, "trainable_parameters"),
            "bank_bytes": values * element_size if values is not None else None}


def version_out(v: TaskVersion, current: int, full: bool = False, element_size: int = 4) -> VersionOut:
    """A version; `full` keeps every metrics entry (the feature map too)."""
    m = v.metadata
    return VersionOut(version=v.version, current=v.version == current, created_at=v.created_at,
                      **method_fields(m, element_size),
                      method=m.get("method", "unknown"), num_prompts=int(m.get("num_prompts", "0") or 0),
                      classes=_json_field(m, "classes", []), size_bytes=v.size_bytes,
                      metrics=_summary_metrics(m, full), training=_dict_field(m, "training"))


def unservable_reason(meta: dict[str, str], backbone_name: str, fingerprint: str) -> str | None:
    """Why a version with this metadata cannot be served by the running backbone, or None."""
    theirs = meta.get("backbone_fingerprint", "")
    if theirs == fingerprint:
        return None
    return (f"backbone_mismatch: trained on {safe_text(meta.get('backbone', '?'))!r} (fingerprint {theirs[:12]}), "
            f"this server runs {backbone_name!r} (fingerprint {fingerprint[:12]}); serve it with the backbone "
            "it was trained on, or train it again")


def task_out(info: TaskInfo, element_size: int = 4, backbone: tuple[str, str] | None = None) -> TaskOut:
    """`backbone` (name, fingerprint) of the running backbone marks a task it cannot serve."""
    m = info.current.metadata
    reason = unservable_reason(m, *backbone) if backbone is not None else None
    return TaskOut(task_id=info.task_id, current_version=info.current_version, num_versions=info.num_versions,
                   **method_fields(m, element_size),
                   method=m.get("method", "unknown"), num_prompts=int(m.get("num_prompts", "0") or 0),
                   classes=_json_field(m, "classes", []), backbone=m.get("backbone", ""),
                   backbone_fingerprint=m.get("backbone_fingerprint", ""), created_at=info.created_at,
                   updated_at=info.updated_at, size_bytes=info.current.size_bytes, metrics=_summary_metrics(m),
                   servable=reason is None, reason=reason)


def task_summary(info: TaskInfo, element_size: int = 4, backbone: tuple[str, str] | None = None) -> TaskSummary:
    """The listing's view of a task: no class names, no metrics but the validation accuracy."""
    m = info.current.metadata
    reason = unservable_reason(m, *backbone) if backbone is not None else None
    metrics = _json_field(m, "metrics", None)
    accuracy = metrics.get("val_accuracy") if isinstance(metrics, dict) else None
    fields = method_fields(m, element_size)
    return TaskSummary(task_id=info.task_id, current_version=info.current_version, num_versions=info.num_versions,
                       method=m.get("method", "unknown"), num_prompts=int(m.get("num_prompts", "0") or 0),
                       num_classes=len(_json_field(m, "classes", [])), head=fields["head"],
                       pooling=fields["pooling"], backbone=m.get("backbone", ""),
                       backbone_fingerprint=m.get("backbone_fingerprint", ""), created_at=info.created_at,
                       updated_at=info.updated_at, size_bytes=info.current.size_bytes,
                       bank_bytes=fields["bank_bytes"],
                       val_accuracy=accuracy if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)
                       else None, servable=reason is None, reason=reason)


def job_out(job: JobRecord) -> JobOut:
    return JobOut(job_id=job.job_id, task_id=job.task_id, state=job.state, created_at=job.created_at,
                  updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at,
                  options=safe_text(job.options), progress=safe_text(job.progress),
                  metrics=summary(safe_text(job.metrics)), error=safe_text(job.error),
                  version=job.version, worker=job.worker, cancel_requested=job.cancel_requested)
