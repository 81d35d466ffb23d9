"""The engine process: `python -m server.engine.main`, started by the supervisor (`vpt-serve serve`).

Loads the backbone, store, bank, batcher and (embedded mode) the training workers, then answers
front ends on the channel's Unix socket until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

from server.channel import ENV_SHM, ENV_SOCKET, SlotRing
from server.engine.service import EngineService
from server.state import AppState, exit_code_after_close

log = logging.getLogger("vpt-serve.engine")


async def serve(state: AppState, ring: SlotRing, path: str) -> None:
    server = await EngineService(state, ring).serve(path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("engine ready on %s", path)
    await stop.wait()
    server.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn's `standard` extra brings it; front ends run on it too): less CPU
    per channel message than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    from server.cli import _settings_from_env, _setup_logging, _start_state

    settings = _settings_from_env()
    _setup_logging(settings.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards what matters as SIGTERM
    ring = SlotRing.attach(os.environ[ENV_SHM])
    state = _start_state(settings)
    if state is None:
        return 2
    clean = False
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(state, ring, os.environ[ENV_SOCKET]))
    finally:
        clean = state.close()  # workers stop at their next step and hand their jobs back
        ring.close()
    return exit_code_after_close(clean)


if __name__ == "__main__":
    sys.exit(main())
