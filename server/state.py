"""What the app holds for its lifetime: backbone, store, bank, batcher, jobs, workers, metrics."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor

import kernels
from prompt_store.bank import PromptBank
from prompt_store.base import Store
from prompt_store.factory import open_store
from prompt_store.queue import JobQueue
from server.answers import Outcome
from server.engine.batcher import Batcher
from server.frontend.auth import KeyRing, load_keyring
from server.frontend.images import ImageDecoder
from server.jobs import JobService, TrainingWorker
from server.metrics import Metrics
from server.settings import Settings
from server.shared import count_unservable, ingest_limits, open_job_queue, work_dir
from server.task_checks import servable_metadata
from vpt.backbone import Backbone, load_backbone
from vpt.priority import PriorityGate

log = logging.getLogger(__name__)
# decoded images are read-only arrays (PIL's bytes) that preprocessing only reads: torch's warning
# about wrapping them says nothing useful (the engine process wraps ring slots the same way)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def resolve_device(settings: Settings) -> tuple[str, str]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_offline_if_unreachable(settings: Settings, timeout_s: float = 3.0) -> bool:
    """Before a hub download, try one connection to the hub. If it fails, put huggingface_hub in
    offline mode: cached weights then load at once and missing ones fail at once, instead of
    a minute of retries. True when offline mode was switched on."""
    if not settings.backbone_pretrained or settings.backbone_weights is not None:
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or any(
            os.environ.get(v) for v in _PROXY_VARS):
        return False  # already offline, or a proxy the hub client knows how to use
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s).close()
        return False
    except OSError as e:
        import huggingface_hub.constants

        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        log.warning("the model hub %s cannot be reached (%s): using locally cached weights only", url.hostname, e)
        return True


def build_backbone(settings: Settings) -> Backbone:
    hub_offline_if_unreachable(settings)
    device, dtype = resolve_device(settings)
    return load_backbone(settings.backbone, weights=settings.backbone_weights,
                         pretrained=settings.backbone_pretrained, model_kwargs=settings.backbone_kwargs,
                         device=device, dtype=dtype, seed=settings.backbone_seed)


def build_worker(settings: Settings, store: Store, queue: JobQueue, backbone: Backbone,
                 name: str | None = None, gate: PriorityGate | None = None) -> TrainingWorker:
    """A training worker with the settings' limits (in-process or `vpt-serve worker`).

    In-process workers share the batcher's `gate` (serving first); a worker of its own gets one
    that only puts its steps on a low-priority CUDA stream.
    """
    return TrainingWorker(store, queue, backbone, work_dir=work_dir(settings), limits=ingest_limits(settings),
                          heartbeat_s=settings.job_heartbeat_s, stale_s=settings.job_stale_s, name=name,
                          max_deliveries=settings.job_max_claims, uploads_dir=settings.uploads_dir.resolve(),
                          sweep_s=settings.job_sweep_s,
                          gate=gate or PriorityGate(settings.training_share, device=backbone.device))


def exit_code_after_close(clean: bool) -> int:
    """0 once `AppState.close()` returned. A training thread that did not stop within the grace period
    already had its job handed back, so the process leaves at once (0) instead of joining it."""
    if not clean:
        logging.shutdown()
        os._exit(0)
    return 0


@dataclass
class AppState:
    settings: Settings
    keyring: KeyRing
    backbone: Backbone
    store: Store
    queue: JobQueue
    bank: PromptBank
    batcher: Batcher
    decoder: ImageDecoder
    jobs: JobService
    metrics: Metrics
    gate: PriorityGate
    workers: list[TrainingWorker] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    _unservable: tuple[float, int] | None = None

    @classmethod
    def start(cls, settings: Settings) -> AppState:
        kernels.set_backend(settings.attention)
        keyring = load_keyring(settings.api_keys, settings.api_keys_file)
        backbone = build_backbone(settings)
        store = open_store(settings.store)
        queue = open_job_queue(settings, store)
        metrics = Metrics()
        bank = PromptBank(backbone, store, settings.bank_bytes, host_capacity_bytes=settings.host_cache_bytes)
        gate = PriorityGate(settings.training_share, device=backbone.device)
        batcher = Batcher(backbone, bank, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                          queue_limit=settings.queue_limit, metrics=metrics, gate=gate, pin_memory=settings.pin_memory,
                          cuda_graphs=settings.cuda_graphs)
        decoder = ImageDecoder(settings.max_image_pixels, batcher.preprocess.min_side, threads=settings.decode_threads,
                               inline_bytes=settings.inline_decode_bytes(frontend=False), account=metrics.decode)
        uploads = settings.uploads_dir.resolve()
        uploads.mkdir(parents=True, exist_ok=True)
        jobs = JobService(store, queue, uploads, work_dir(settings), settings.max_active_jobs_per_tenant,
                          settings.max_pending_bytes_per_tenant)
        state = cls(settings=settings, keyring=keyring, backbone=backbone, store=store, queue=queue, bank=bank,
                    batcher=batcher, decoder=decoder, jobs=jobs, metrics=metrics, gate=gate)
        metrics.attach(bank, state.job_counts)
        batcher.start()
        if settings.training_workers > 0:  # recovery is by heartbeat (JobQueue.reap), never at startup
            state.start_workers(settings.training_workers)
        return state

    def start_workers(self, n: int) -> None:
        for _ in range(n):
            w = build_worker(self.settings, self.store, self.queue, self.backbone, gate=self.gate)
            t = threading.Thread(target=w.run_forever, name=f"trainer-{w.name}", daemon=True)
            t.start()
            self.workers.append(w)
            self.threads.append(t)

    def unservable_tasks(self, max_age_s: float = 10.0) -> int:
        """How many tasks (all tenants) have a current version this backbone cannot serve; recounted
        at most every `max_age_s` seconds, since it reads every task's record."""
        now = time.monotonic()
        if self._unservable is None or now - self._unservable[0] > max_age_s:
            self._unservable = (now, count_unservable(self.store, self.backbone.fingerprint))
        return self._unservable[1]

    async def predict(self, tenant: str, task: str, images: list[np.ndarray] | list[Tensor] | np.ndarray | Tensor,
                      top_k: int) -> Outcome:
        """Decoded uint8 (H, W, 3) images or a preprocessed (n, 3, H, W) batch -> the task's answer."""
        if isinstance(images, list):
            images = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in images]
        elif isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        outcome = await self.batcher.predict(tenant, task, images, top_k)
        self.metrics.predictions.labels(tenant, task).inc(len(images))
        return outcome

    async def check_task(self, blob: bytes) -> dict[str, str]:
        """A task file's metadata when this backbone can serve it (server/task_checks.py); 422 otherwise."""
        return await asyncio.to_thread(servable_metadata, blob, self.backbone, self.settings)

    def ready_checks(self, details: bool = False) -> dict[str, str]:
        """Backbone loaded, batcher running, store reachable, enough disk: each "ok" or why not."""
        from server.frontend.routes.system import readiness

        return readiness(self, details)

    async def ready(self, details: bool = False) -> dict[str, str]:
        return await asyncio.to_thread(self.ready_checks, details)

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    def job_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.store.list_all_jobs():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    def close(self) -> bool:
        """Stop everything; True if every worker thread ended within the grace period. A worker
        still training by then has its job handed back to the queue here (and the caller must not
        wait for that thread: the process should exit)."""
        for w in self.workers:
            w.stop()
        self.batcher.stop()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        clean = True
        for w, t in zip(self.workers, self.threads):
            if t.is_alive():
                clean = False
                w.abandon()
        self.decoder.close()
        self.bank.close()
        self.queue.close()
        self.store.close()
        return clean

