"""What both kinds of server process derive from the settings and the store (job queue, work folder,
dataset limits, the count of unservable tasks), without loading the model stack: the HTTP front ends
import this module, the engine process too (through server/state.py)."""
from __future__ import annotations

from pathlib import Path

from prompt_store.base import Store
from prompt_store.factory import open_queue
from prompt_store.queue import JobQueue
from server.settings import Settings
from vpt.data.limits import IngestLimits


def ingest_limits(settings: Settings) -> IngestLimits:
    """The dataset limits of this server: the same for the submit checks and the job's ingestion."""
    return IngestLimits(max_archive_bytes=settings.max_upload_bytes, max_image_pixels=settings.max_image_pixels,
                        max_classes=settings.max_task_classes)


def work_dir(settings: Settings) -> Path:
    """Where deliveries train: `<data>/../work/<tenant>/<job>/<attempt>/`."""
    return settings.uploads_dir.resolve().parent / "work"


def open_job_queue(settings: Settings, store: Store) -> JobQueue:
    return open_queue(store, stale_s=settings.job_stale_s, max_claims=settings.job_max_claims)


def count_unservable(store: Store, fingerprint: str) -> int:
    """Tasks (all tenants) whose current version was trained on another backbone."""
    return sum(info.current.metadata.get("backbone_fingerprint") != fingerprint
               for tenant in store.list_tenants() for info in store.list_tasks(tenant))
