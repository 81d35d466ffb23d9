"""What the app holds for its lifetime: backbone, store, bank, batcher, jobs, workers, metrics."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

import kernels
from prompt_store.bank import PromptBank
from prompt_store.base import Store
from prompt_store.factory import open_queue, open_store
from prompt_store.queue import JobQueue
from server.frontend.auth import KeyRing, load_keyring
from server.engine.batcher import Batcher
from server.frontend.images import ImageDecoder
from server.jobs import JobService, TrainingWorker, fail_interrupted
from server.metrics import Metrics
from server.settings import Settings
from vpt.backbone import Backbone, load_backbone
from vpt.data.limits import IngestLimits
from vpt.transforms import eval_transform

log = logging.getLogger(__name__)


def resolve_device(settings: Settings) -> tuple[str, str]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def build_backbone(settings: Settings) -> Backbone:
    device, dtype = resolve_device(settings)
    return load_backbone(settings.backbone, weights=settings.backbone_weights,
                         pretrained=settings.backbone_pretrained, model_kwargs=settings.backbone_kwargs,
                         device=device, dtype=dtype)


def build_worker(settings: Settings, store: Store, queue: JobQueue, backbone: Backbone,
                 name: str | None = None) -> TrainingWorker:
    """A training worker with the settings' limits (in-process or `vpt-serve worker`)."""
    limits = IngestLimits(max_archive_bytes=settings.max_upload_bytes, max_image_pixels=settings.max_image_pixels,
                          max_classes=settings.max_task_classes)
    return TrainingWorker(store, queue, backbone, work_dir=settings.uploads_dir.resolve().parent / "work",
                          limits=limits, heartbeat_s=settings.job_heartbeat_s, stale_s=settings.job_stale_s,
                          name=name)


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
    workers: list[TrainingWorker] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def start(cls, settings: Settings) -> AppState:
        kernels.set_backend(settings.attention)
        keyring = load_keyring(settings.api_keys, settings.api_keys_file)
        backbone = build_backbone(settings)
        store = open_store(settings.store)
        queue = open_queue(store)
        metrics = Metrics()
        bank = PromptBank(backbone, store, settings.bank_bytes)
        batcher = Batcher(backbone, bank, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                          queue_limit=settings.queue_limit, metrics=metrics)
        decoder = ImageDecoder(eval_transform(backbone.data_config), settings.max_image_pixels)
        uploads = settings.uploads_dir.resolve()
        uploads.mkdir(parents=True, exist_ok=True)
        state = cls(settings=settings, keyring=keyring, backbone=backbone, store=store, queue=queue, bank=bank,
                    batcher=batcher, decoder=decoder, jobs=JobService(store, queue, uploads), metrics=metrics)
        metrics.attach(bank, state.job_counts)
        batcher.start()
        if settings.training_workers > 0:
            if not settings.is_redis:
                n = fail_interrupted(store)
                if n:
                    log.warning("%d job(s) interrupted by the last shutdown were marked failed", n)
            state.start_workers(settings.training_workers)
        return state

    def start_workers(self, n: int) -> None:
        for _ in range(n):
            w = build_worker(self.settings, self.store, self.queue, self.backbone)
            t = threading.Thread(target=w.run_forever, name=f"trainer-{w.name}", daemon=True)
            t.start()
            self.workers.append(w)
            self.threads.append(t)

    def job_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.store.list_all_jobs():
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.batcher.stop()
        for t in self.threads:
            t.join(timeout=10)
        self.decoder.close()
        self.bank.close()
        self.queue.close()
        self.store.close()

