"""Concurrent writers and readers (threads and processes) and change events between replicas."""
from __future__ import annotations

import hashlib
import multiprocessing
import random
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from prompt_store import ChangeEvent, TaskNotFound, VersionNotFound
from tests.prompt_store import _procs
from tests.prompt_store.conftest import Backend


def _check_pair(record, blob: bytes) -> None:
    digest = hashlib.sha256(blob).hexdigest()
    assert digest == record.sha256 == record.metadata["blob_sha"], f"torn read at v{record.version}"
    assert len(blob) == record.size_bytes


def test_threads_never_see_a_partial_version(backend: Backend) -> None:
    store = backend.open()
    store.put_task("t1", "task", _procs.blob_for(-1), {"blob_sha": hashlib.sha256(_procs.blob_for(-1)).hexdigest()})
    stop = threading.Event()
    problems: list[BaseException] = []
    reads = [0]

    def writer(base: int) -> None:
        rng = random.Random(base)
        try:
            for i in range(12):
                blob = _procs.blob_for(base + i)
                v = store.put_task("t1", "task", blob, {"blob_sha": hashlib.sha256(blob).hexdigest()})
                if rng.random() < 0.3:
                    store.activate("t1", "task", rng.randint(1, v.version))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            problems.append(exc)

    def reader(explicit: bool) -> None:
        rng = random.Random(explicit)
        while not stop.is_set():
            try:
                if explicit:
                    record, blob = store.get_task("t1", "task", version=rng.randint(1, 20))
                else:
                    record, blob = store.get_task("t1", "task")
                _check_pair(record, blob)
                reads[0] += 1
            except VersionNotFound:
                continue
            except BaseException as exc:  # noqa: BLE001
                problems.append(exc)
                return

    readers = [threading.Thread(target=reader, args=(e,)) for e in (False, True)]
    writers = [threading.Thread(target=writer, args=(base,)) for base in (100, 200)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert problems == []
    assert reads[0] > 0
    assert [v.version for v in store.list_versions("t1", "task")] == list(range(1, 26))


def test_processes_never_see_a_partial_version(backend: Backend) -> None:
    ctx = multiprocessing.get_context("spawn")
    args = (backend.url, backend.options, "t1", "task")
    with ProcessPoolExecutor(max_workers=3, mp_context=ctx) as pool:
        readers = [pool.submit(_procs.read_until, *args, 4.0) for _ in range(2)]
        time.sleep(0.5)  # let the readers start before the writes
        writer = pool.submit(_procs.write_versions, *args, list(range(30)))
        versions = writer.result(timeout=120)
        results = [r.result(timeout=120) for r in readers]
    assert versions == list(range(1, 31))
    for reads, problems in results:
        assert problems == []
        assert reads > 0
    store = backend.open()
    for record in store.list_versions("t1", "task"):
        _, blob = store.get_task("t1", "task", version=record.version)
        _check_pair(record, blob)


def test_readers_see_whole_task_or_nothing_across_delete(backend: Backend) -> None:
    store = backend.open()
    stop = threading.Event()
    problems: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                _check_pair(*store.get_task("t1", "task"))
            except TaskNotFound:
                continue
            except BaseException as exc:  # noqa: BLE001
                problems.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    for i in range(10):
        blob = _procs.blob_for(i)
        store.put_task("t1", "task", blob, {"blob_sha": hashlib.sha256(blob).hexdigest()})
        store.delete_task("t1", "task")
    stop.set()
    t.join()
    assert problems == []


def test_replica_sees_each_publish_within_100ms_p99(backend: Backend) -> None:
    writer, replica = backend.open(), backend.open()
    seen: dict[int, float] = {}
    arrived = threading.Condition()

    def on_event(event: ChangeEvent) -> None:
        with arrived:
            if event.kind == "put" and event.task_id == "hot":
                seen[event.version] = time.perf_counter()
                arrived.notify_all()

    sub = replica.subscribe(on_event)
    sent: dict[int, float] = {}
    for i in range(200):
        t0 = time.perf_counter()
        version = writer.put_task("t1", "hot", i.to_bytes(4, "little") * 64, {}).version
        sent[version] = t0
        with arrived:
            assert arrived.wait_for(lambda v=version: v in seen, timeout=5), f"event for v{version} never arrived"
    sub.close()
    latencies = sorted(seen[v] - sent[v] for v in sent)
    p99 = latencies[int(0.99 * len(latencies)) - 1]
    assert len(latencies) == 200
    assert p99 < 0.100, f"p99 publish->replica latency {p99 * 1000:.1f} ms"


def test_events_cross_processes(backend: Backend) -> None:
    store = backend.open()
    events: list[ChangeEvent] = []
    got_all = threading.Event()

    def on_event(event: ChangeEvent) -> None:
        if event.task_id == "remote":
            events.append(event)
            if event.kind == "delete":
                got_all.set()

    store.subscribe(on_event)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        pool.submit(_procs.put_then_change, backend.url, backend.options, "t9", "remote").result(timeout=60)
    assert got_all.wait(timeout=10), f"only saw {events}"
    assert [(e.kind, e.version) for e in events] == [("put", 1), ("put", 2), ("put", 3), ("activate", 1),
                                                     ("delete", None)]
    assert all(e.tenant == "t9" for e in events)


def test_unsubscribed_callbacks_stop_and_failing_callbacks_do_not_stop_others(backend: Backend) -> None:
    store = backend.open()
    calls: list[str] = []
    done = threading.Event()

    def boom(event: ChangeEvent) -> None:
        raise RuntimeError("subscriber bug")

    def good(event: ChangeEvent) -> None:
        calls.append(event.task_id)
        if event.task_id == "last":
            done.set()

    store.subscribe(boom)
    closed = store.subscribe(lambda e: calls.append("closed-" + e.task_id))
    closed.close()
    store.subscribe(good)
    store.put_task("t1", "first", b"x", {})
    store.put_task("t1", "last", b"y", {})
    assert done.wait(timeout=5)
    assert calls == ["first", "last"]


@pytest.mark.parametrize("kind", ["put", "activate", "delete"])
def test_event_kinds_carry_versions(backend: Backend, kind: str) -> None:
    store = backend.open()
    store.put_task("t1", "task", b"a", {})
    store.put_task("t1", "task", b"b", {})
    got: list[ChangeEvent] = []
    flag = threading.Event()
    store.subscribe(lambda e: (got.append(e), flag.set()))
    {"put": lambda: store.put_task("t1", "task", b"c", {}), "activate": lambda: store.activate("t1", "task", 1),
     "delete": lambda: store.delete_task("t1", "task")}[kind]()
    assert flag.wait(timeout=5)
    assert got[0] == ChangeEvent("t1", "task", {"put": 3, "activate": 1, "delete": None}[kind], kind)
