"""A writer process killed (SIGKILL) in the middle of puts leaves the local store readable and writable."""
from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from prompt_store import LocalStore, TaskNotFound

WRITER = """
import hashlib, sys
from prompt_store import LocalStore, TaskNotFound
from tests.prompt_store._procs import blob_for
store = LocalStore(sys.argv[1])
i = 0
while True:
    blob = blob_for(i)
    store.put_task("t1", "task", blob, {"blob_sha": hashlib.sha256(blob).hexdigest()})
    i += 1
"""


def test_killed_writer_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=repo)
    store = LocalStore(root)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(TaskNotFound):  # not created yet
                if store.current_version("t1", "task") >= 5:
                    break
            time.sleep(0.02)
        time.sleep(0.013)  # land somewhere inside a put
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    record, blob = store.get_task("t1", "task")
    assert hashlib.sha256(blob).hexdigest() == record.metadata["blob_sha"]
    for version in store.list_versions("t1", "task"):
        _, blob = store.get_task("t1", "task", version=version.version)
        assert hashlib.sha256(blob).hexdigest() == version.sha256 == version.metadata["blob_sha"]
    # The dead writer's file lock died with it: the next put is not blocked, and numbers go on.
    after = store.put_task("t1", "task", b"after the crash", {})
    assert after.version > record.version
    assert store.get_task("t1", "task")[1] == b"after the crash"
    store.close()
