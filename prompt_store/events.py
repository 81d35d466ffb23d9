"""Change-event fan-out shared by both backends.

A backend hands events to its `EventHub` from whatever thread learns of them (the writer itself, a
file poller, the Redis pub/sub listener). The hub queues them and one daemon thread runs the
subscribers' callbacks in order, so a slow or failing callback never blocks a writer and a callback
may call the store.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from prompt_store.records import ChangeEvent

log = logging.getLogger(__name__)

Callback = Callable[[ChangeEvent], None]


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

    def __enter__(self) -> Subscription:
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

    @property
    def active(self) -> bool:
        with self._lock:
            return bool(self._subs)

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
