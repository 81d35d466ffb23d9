"""A front-end process: `python -m server.frontend.main`, started by the supervisor (`vpt-serve serve`).

Serves HTTP on the listening socket it inherits from the supervisor (its own, on the port every front
end shares through SO_REUSEPORT; or the one socket all share where the platform lacks it) and talks
to the engine over the channel.
"""
from __future__ import annotations

import logging
import os
import socket
import sys

ENV_LISTEN_FD = "VPT_INTERNAL_LISTEN_FD"

log = logging.getLogger("vpt-serve.frontend")


def main() -> int:
    import uvicorn

    from server.cli import _settings_from_env, _setup_logging
    from server.frontend.app import create_app
    from server.frontend.fasthttp import protocol_for
    from server.frontend.state import FrontendState

    settings = _settings_from_env()
    _setup_logging(settings.log_level)
    sock = socket.socket(fileno=int(os.environ[ENV_LISTEN_FD]))
    state = FrontendState.from_env(settings)
    app = create_app(settings, frontend=state)
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=10,
                            http=protocol_for(app))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
