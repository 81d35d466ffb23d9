"""The sweep: files that no live job needs, whatever left them (kill -9, a full disk, a crash).

- upload spools (`<data>/incoming/upload-*`) older than `min_age_s` (a live copy is rewritten
  continuously, so an old one belongs to a process that died mid-copy);
- `<data>/<tenant>/<job>/` datasets of jobs that are terminal, or unknown and older than `min_age_s`
  (a submit moves the dataset in just before it creates the record);
- `<work>/<tenant>/<job>/<attempt>/` folders of deliveries that are not the job's current claim;
- the local store's temp files (`~tmp~*`) older than `min_age_s`, and its trash.

It runs when a worker starts and then every `job_sweep_s`; every process on a store may run it.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from prompt_store.base import Store
from prompt_store.errors import JobNotFound, RecordCorrupt, StoreError
from prompt_store.ids import ID_PATTERN
from prompt_store.records import JobRecord

log = logging.getLogger(__name__)

INCOMING = "incoming"  # under the data dir: upload spools while a request is being handled


def _old(path: Path, min_age_s: float, now: float) -> bool:
    try:
        return now - path.stat().st_mtime >= min_age_s
    except FileNotFoundError:
        return False


def _dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and ID_PATTERN.fullmatch(p.name))
    except FileNotFoundError:
        return []


def _job(store: Store, tenant: str, job_id: str) -> JobRecord | None:
    try:
        return store.get_job(tenant, job_id)
    except (JobNotFound, RecordCorrupt):
        return None


def _remove(path: Path) -> int:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return 1


def sweep(store: Store, data_dir: Path, work_dir: Path | None, min_age_s: float = 60.0) -> int:
    """Remove what no live job needs (see the module docstring); returns how many entries went."""
    now, removed = time.time(), 0
    try:
        for spool in (data_dir / INCOMING).glob("upload-*"):
            if _old(spool, min_age_s, now):
                removed += _remove(spool)
        for tenant_dir in _dirs(data_dir):
            if tenant_dir.name == INCOMING:
                continue
            for job_dir in _dirs(tenant_dir):
                job = _job(store, tenant_dir.name, job_dir.name)
                if (job is None and _old(job_dir, min_age_s, now)) or (job is not None and job.terminal):
                    removed += _remove(job_dir)
        if work_dir is not None:
            removed += _sweep_work(store, work_dir, min_age_s, now)
        sweep_temp = getattr(store, "sweep_temp", None)
        if sweep_temp is not None:
            removed += sweep_temp(min_age_s)
    except StoreError as e:
        log.warning("sweep interrupted: %s", e)
    except OSError as e:
        log.warning("sweep interrupted: %s", e)
    if removed:
        log.info("sweep removed %d leftover file(s) or folder(s)", removed)
    return removed


def _sweep_work(store: Store, work_dir: Path, min_age_s: float, now: float) -> int:
    removed = 0
    for tenant_dir in _dirs(work_dir):
        for job_dir in _dirs(tenant_dir):
            job = _job(store, tenant_dir.name, job_dir.name)
            if job is None or job.terminal:
                if job is not None or _old(job_dir, min_age_s, now):
                    removed += _remove(job_dir)
                continue
            for attempt in _dirs(job_dir):
                if job.state != "running" or attempt.name != str(job.claim_token):
                    removed += _remove(attempt)
    return removed
