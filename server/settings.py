"""Deployment settings: every `VPT_*` environment variable, in one place."""
from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k"


def settings_problems(error: Exception, flags: tuple[str, ...] = ()) -> str:
    """One line for a settings error: each bad field as its VPT_* variable (or --flag), and why."""
    if not hasattr(error, "errors"):  # pydantic-settings' own SettingsError
        return str(error).replace("\n", " ")
    parts = []
    for err in error.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "settings"
        where = f"--{name.replace('_', '-')} or " if name in flags else ""
        parts.append(f"{where}VPT_{name.upper()}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class Settings(BaseSettings):
    """Read from the environment with the `VPT_` prefix (e.g. `VPT_STORE=redis://redis:6379/0`)."""

    model_config = SettingsConfigDict(env_prefix="VPT_", env_file=None, extra="ignore")

    # backbone
    backbone: str = DEFAULT_BACKBONE
    backbone_weights: Path | None = None
    backbone_kwargs: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict)
    backbone_pretrained: bool = True
    backbone_seed: int | None = Field(None, ge=0, lt=2**63)  # random weights; default: from name and kwargs
    device: str = "auto"                      # auto: cuda when available, else cpu
    dtype: str = "auto"                       # auto: bfloat16 on cuda, float32 on cpu
    attention: Literal["auto", "triton", "torch"] = "auto"

    # store and jobs
    store: str = "./var"                      # file://PATH, a path, or redis://...
    data_dir: Path | None = None              # uploaded datasets; default <store>/uploads or ./var/uploads
    workers: int | None = None                # in-process training workers; default 1 (file store), 0 (redis)
    job_heartbeat_s: float = 10.0
    job_stale_s: float = Field(120.0, gt=0)   # a claimed job silent this long is recovered by another worker
    job_max_claims: int = Field(3, ge=1)      # a job claimed this often without finishing fails (worker_lost)
    shutdown_grace_s: float = Field(20.0, gt=0)  # on SIGINT/SIGTERM: time for training to stop and hand back
    job_sweep_s: float = Field(300.0, gt=0)   # how often a worker removes files no live job needs
    max_active_jobs_per_tenant: int = Field(16, ge=1)      # queued + running; more answers 429 too_many_jobs
    max_pending_bytes_per_tenant: int = Field(8 << 30, ge=1024)  # their uploads; 429 too_much_pending_data
    min_free_bytes: int = Field(256 << 20, ge=0)  # /readyz answers 503 (disk: low) below this free space

    # serving
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    queue_limit: int = Field(512, ge=1)       # images waiting for a batch; more answers 503
    bank_bytes: int = Field(1 << 30, ge=1 << 16)          # device tier: resident tasks' tensors
    host_cache_bytes: int = Field(4 << 30, ge=0)          # host tier behind it (page-locked on CUDA)
    training_share: float = Field(0.2, ge=0, lt=1)        # device time training may take while batches wait
    request_timeout_s: float = Field(30.0, gt=0)
    body_timeout_s: float = Field(900.0, gt=0)     # a request body must arrive within this (else 408)
    body_idle_timeout_s: float = Field(30.0, gt=0)  # ...with no gap between its chunks longer than this
    max_connections: int = Field(1000, ge=1)       # concurrent connections per process; more answers 503
    sse_keepalive_s: float = Field(15.0, gt=0)     # /jobs/{id}/events sends a comment this often
    sse_max_s: float = Field(3600.0, gt=0)         # and closes after this long (clients reconnect)

    # front-end processes and the engine process (docs/serving.md)
    frontend_workers: int | None = Field(None, ge=0, le=256)  # None: one per spare core (>= 1); 0: one process
    shm_slots: int = Field(64, ge=1, le=65536)               # shared-memory slots per front end (images in flight)
    shm_slot_bytes: int = Field(4 << 20, ge=1 << 16)         # one decoded image (H*W*3) or a (3, H, W) float32
    decode_threads: int = Field(2, ge=0, le=256)             # image-decoding threads per HTTP process; 0: inline
    decode_inline_bytes: int | None = Field(None, ge=0)      # requests with at most this many image bytes decode
                                                             # inline; None: 256 KiB in front ends, 0 in one process
    pin_memory: bool = True                                  # CUDA: stage uploads in pinned host memory
    cuda_graphs: bool = False                                # CUDA: the forward through graphs at batch buckets
    engine_start_timeout_s: float = Field(600.0, gt=0)       # the engine's backbone load, before front ends start

    # limits
    max_upload_bytes: int = Field(2 << 30, ge=1024)       # a training dataset
    max_image_bytes: int = Field(20 << 20, ge=1024)       # one image in a predict request
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_task_file_bytes: int = Field(256 << 20, ge=1024)  # an imported task file
    max_top_k: int = 100
    max_task_classes: int = Field(10_000, ge=2)           # a task's classes (heads are padded to the widest)
    max_task_prompts: int = Field(200, ge=1, le=1024)     # prompts per block (the paper searches up to 200)
    max_train_workers: int = Field(4, ge=0)               # DataLoader processes a training request may ask for

    # auth and network
    api_keys: str | None = None               # "tenant:key,tenant2:sha256:<hex>"
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = False       # bind beyond loopback without keys
    metrics_token: str | None = None          # bearer token for /metrics; without it, /metrics answers loopback only
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    @field_validator("backbone_kwargs", mode="before")
    @classmethod
    def _parse_kwargs(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as e:
                raise ValueError(f"not valid JSON ({e}); expected an object such as "
                                 '\'{"img_size": 224}\'') from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value

    @property
    def is_redis(self) -> bool:
        return self.store.startswith(("redis://", "rediss://", "unix://"))

    @property
    def store_redacted(self) -> str:
        """The store URL as logs may show it: a password in it replaced by `***`."""
        return re.sub(r"^([a-z]+://[^/@]*?:)[^/]+@", r"\1***@", self.store)

    @property
    def training_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 0 if self.is_redis else 1

    @property
    def frontends(self) -> int:
        if self.frontend_workers is not None:
            return self.frontend_workers
        return max(1, (os.cpu_count() or 1) - 1)

    def inline_decode_bytes(self, frontend: bool) -> int:
        """`decode_inline_bytes` resolved: by default a usual photo decodes on a front end's event loop,
        and the single process hands every request to its decoding pool."""
        if self.decode_inline_bytes is not None:
            return self.decode_inline_bytes
        return 256 << 10 if frontend else 0

    @property
    def uploads_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        if self.is_redis:
            return Path("./var/uploads")
        return Path(self.store.removeprefix("file://")) / "uploads"

    def bind_is_loopback(self) -> bool:
        if self.host in ("localhost", ""):
            return self.host == "localhost"
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
