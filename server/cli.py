"""`vpt-serve`: serve the API, run training workers, train or evaluate a task offline."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

from pydantic import ValidationError

log = logging.getLogger("vpt-serve")


def _settings(args: argparse.Namespace):
    from pydantic_settings import SettingsError

    from server.settings import Settings, settings_problems

    overrides = {k: v for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None)))
                 if v is not None}
    try:
        return Settings(**overrides)
    except (ValidationError, SettingsError) as e:
        sys.exit(f"error: invalid_settings: {settings_problems(e)}")


OFFLINE_HINT = ("hint: the backbone is downloaded from the Hugging Face hub on first start. Offline: "
                "`vpt-serve demo` builds a demo backbone and prints the settings that serve it (README, "
                "\"Offline\"); or set VPT_BACKBONE_WEIGHTS to a local checkpoint; or "
                "VPT_BACKBONE_PRETRAINED=false for seeded random weights")


def _startup_code(e: Exception) -> str:
    from vpt.errors import BackboneError

    return getattr(e, "code", None) or ("backbone_unavailable" if isinstance(e, BackboneError) else "startup_failed")


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 600 else text[:597] + "..."


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.log_level)
    if not _bind_allowed(settings):
        return 2
    try:  # the port first: a process that cannot serve loads nothing, touches no job, starts no worker
        sock = bind_socket(settings.host, settings.port, reuse_port=settings.frontends > 1)
    except OSError as e:
        print(f"error: address_unavailable: cannot bind {settings.host}:{settings.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    if settings.frontends > 0:  # front-end processes and one engine process (docs/serving.md)
        from server.supervisor import Supervisor

        return Supervisor(settings, port_group(sock, settings.frontends)).run()
    state = _start_state(settings)
    if state is None:
        sock.close()
        return 2
    import uvicorn

    from server.frontend.app import create_app
    from server.frontend.fasthttp import protocol_for
    from server.state import exit_code_after_close

    app = create_app(settings, state=state)
    config = uvicorn.Config(app, log_level=settings.log_level, http=protocol_for(app),
                            timeout_graceful_shutdown=10, limit_concurrency=settings.max_connections,
                            access_log=False)  # the app logs each request once, with its id (vpt.access)
    for signum in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it handled on its
        signal.signal(signum, lambda *_: None)        # way out: shut down here instead, exit 0
    clean = False
    try:
        uvicorn.Server(config).run(sockets=[sock])  # returns on SIGINT/SIGTERM once requests drained
    finally:
        clean = state.close()  # workers stop at their next step and hand their jobs back
        sock.close()
    return exit_code_after_close(clean)


def _settings_from_env():
    """Settings of a child process of the supervisor (the environment only)."""
    from server.settings import Settings

    try:
        return Settings()
    except ValidationError as e:
        sys.exit(f"error: invalid_settings: {e}")


def _bind_allowed(settings) -> bool:
    from server.frontend.auth import AuthConfigError, load_keyring

    try:
        keyring = load_keyring(settings.api_keys, settings.api_keys_file)
    except AuthConfigError as e:
        print(f"error: invalid_api_keys: {e}", file=sys.stderr)
        return False
    if not keyring.enabled and not settings.bind_is_loopback() and not settings.allow_unauthenticated:
        print(f"error: refusing to bind {settings.host} without API keys: set VPT_API_KEYS (or "
              "VPT_API_KEYS_FILE), bind 127.0.0.1, or set VPT_ALLOW_UNAUTHENTICATED=1", file=sys.stderr)
        return False
    return True


def _start_state(settings):
    """Load before serving, so a missing backbone or store is one clear line, not a traceback."""
    from prompt_store.errors import StoreError
    from server.state import AppState
    from vpt.errors import BackboneError, VPTError

    try:
        return AppState.start(settings)
    except (VPTError, StoreError) as e:
        print(f"error: {_startup_code(e)}: {_one_line(e)}", file=sys.stderr)
        if isinstance(e, BackboneError) and settings.backbone_pretrained and settings.backbone_weights is None:
            print(OFFLINE_HINT, file=sys.stderr)
        return None


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (OSError if taken), handed to uvicorn.

    The bind itself is exclusive: another server on the port, with SO_REUSEPORT or not, makes it
    fail. `reuse_port` then sets SO_REUSEPORT before listening (where the platform has it), so that
    `port_group` can add sockets of this process on the same port and nobody else's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            except OSError:  # not supported here: `port_group` falls back to one shared socket
                pass
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def port_group(first: socket.socket, n: int) -> list[socket.socket]:
    """`n` listening sockets on `first`'s address, one per front end: with SO_REUSEPORT the kernel
    spreads new connections across them evenly (by a hash of each connection's addresses). A single
    socket shared by every front end is the fallback: then whichever process wakes first accepts, and
    one of them can end up holding most of a client's keep-alive connections."""
    if n <= 1 or not hasattr(socket, "SO_REUSEPORT") or \
            not first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return [first]
    group = [first]
    try:
        for _ in range(n - 1):
            sock = socket.socket(first.family, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(first.getsockname())
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError as e:
        log.warning("cannot open one listening socket per front end (%s); they share one", e)
        for sock in group[1:]:
            sock.close()
        return [first]
    return group


def cmd_worker(args: argparse.Namespace) -> int:
    """A training worker on the shared store's durable queue (distributed mode)."""
    from prompt_store.factory import open_store
    from server.state import build_backbone, build_worker, open_job_queue

    settings = _settings(args)
    _setup_logging(settings.log_level)
    backbone = build_backbone(settings)
    store = open_store(settings.store)
    queue = open_job_queue(settings, store)
    worker = build_worker(settings, store, queue, backbone, name=args.name)
    def _stop(*_: object) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run_forever()
    finally:
        queue.close()
        store.close()
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    from server.frontend.auth import hash_key

    print(hash_key(args.key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vpt-serve", description="Multi-tenant Visual Prompt Tuning server")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API (settings from VPT_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run a training worker on the shared Redis queue")
    worker.add_argument("--name", help="worker name (default: host-pid-random)")
    worker.set_defaults(func=cmd_worker)
    hk = sub.add_parser("hash-key", help="print the sha256:<hex> form of an API key for VPT_API_KEYS")
    hk.add_argument("key")
    hk.set_defaults(func=cmd_hash_key)
    try:
        from server.cli_train import add_train_commands
    except ImportError:  # pragma: no cover - the training CLI ships with the package
        pass
    else:
        add_train_commands(sub)
    from server.cli_demo import add_demo_command

    add_demo_command(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
