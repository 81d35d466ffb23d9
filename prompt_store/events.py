"""Change-event fan-out shared by both backends, and the local backend's cross-process event log.

A backend hands events to its `EventHub` from whatever thread learns of them (the writer itself, a
file poller, the Redis pub/sub listener). The hub queues them and one daemon thread runs the
subscribers' callbacks in order, so a slow or failing callback never blocks a writer and a callback
may call the store.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Self

from prompt_store.errors import RecordCorrupt
from prompt_store.records import ChangeEvent

log = logging.getLogger(__name__)

Callback = Callable[[ChangeEvent], None]
PROCESS_TOKEN = uuid.uuid4().hex  # this process's own events reach its subscribers directly, not via files
EVENT_LOG_MAX_BYTES = 256 * 1024
EVENT_LOG_KEEP_LINES = 500


class Subscription:
    """Handle returned by `Store.subscribe`; `close()` stops deliveries to its callback."""

    def __init__(self, hub: EventHub, callback: Callback) -> None:
        self._hub = hub
        self.callback = callback
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub._remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Callbacks plus one dispatcher thread, started with the first subscription."""

    def __init__(self, name: str = "store-events") -> None:
        self._name = name
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[ChangeEvent | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def subscribe(self, callback: Callback) -> Subscription:
        if not callable(callback):
            raise TypeError("callback must be callable")
        sub = Subscription(self, callback)
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._subs.append(sub)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def emit(self, event: ChangeEvent) -> None:
        """Queue `event` for every current subscriber (cheap; never blocks on callbacks)."""
        if self._thread is not None and not self._closed:
            self._queue.put(event)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            with self._lock:
                subs = list(self._subs)
            for sub in subs:
                if sub.closed:
                    continue
                try:
                    sub.callback(event)
                except Exception:  # a subscriber's bug must not stop the others
                    log.exception("change-event callback %r failed on %s", sub.callback, event)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._subs.clear()
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join(timeout=5)


class FileEventLog:
    """Events as JSON lines appended to one file, followed by a thread that polls it.

    Writers append under the store's write lock; past EVENT_LOG_MAX_BYTES the file is replaced by
    its last EVENT_LOG_KEEP_LINES lines (atomically), and followers notice the new inode and dedupe
    the kept lines by event id. Lines written by this process are skipped: they were delivered
    in-process already. A line still being written (no newline yet) waits for the next poll.
    """

    def __init__(self, path: Path, hub: EventHub, poll_interval: float = 0.05) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._hub = hub
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def append(self, event: ChangeEvent) -> None:
        record = {**event.to_dict(), "id": uuid.uuid4().hex, "origin": PROCESS_TOKEN}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        try:
            with open(self.path, "ab") as f:
                f.write(line)
                size = f.tell()
            if size > EVENT_LOG_MAX_BYTES:
                tail = self.path.read_bytes().splitlines(keepends=True)[-EVENT_LOG_KEEP_LINES:]
                tmp = self.path.with_name(f"~tmp~{uuid.uuid4().hex}")
                tmp.write_bytes(b"".join(tail))
                os.replace(tmp, self.path)
        except OSError:
            log.warning("cannot append to the event log %s; other processes miss %s", self.path, event,
                        exc_info=True)

    def follow(self) -> None:
        """Start the follower thread (once), from the log's current end."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._poll, args=(self._position(),),
                                                name="store-event-log", daemon=True)
                self._thread.start()

    def _position(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
            return st.st_ino, st.st_size
        except FileNotFoundError:
            return -1, 0

    def _poll(self, position: tuple[int, int]) -> None:
        inode, offset = position
        seen: deque[str] = deque(maxlen=4 * EVENT_LOG_KEEP_LINES)
        while not self._stop.wait(self.poll_interval):
            try:
                st = os.stat(self.path)
                if st.st_ino != inode:
                    inode, offset = st.st_ino, 0
                if st.st_size <= offset:
                    continue
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            for line in complete.splitlines():
                self._deliver(line, seen)

    def _deliver(self, line: bytes, seen: deque[str]) -> None:
        try:
            data = json.loads(line)
            event = ChangeEvent.from_dict(data)
        except (ValueError, RecordCorrupt):
            log.warning("skipping an unreadable event log line: %r", line[:200])
            return
        if data.get("origin") == PROCESS_TOKEN or data.get("id") in seen:
            return
        seen.append(data.get("id"))
        self._hub.emit(event)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
