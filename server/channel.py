"""The front end <-> engine protocol: a shared-memory slot ring for tensors, framed JSON on a Unix socket.

Shared memory: one file in /dev/shm (or the temp dir), mapped by every process, cut into one region
per front end of `slots` slots of `slot_bytes` each. A front end owns its region: it picks a free
slot, writes a decoded image (uint8 (H, W, 3)) or a preprocessed float32 (n, 3, H, W) tensor into
it, and sends the slot's number; the engine reads the slot in place (torch.frombuffer, no copy)
and answers; the front end frees the slot when the answer comes. No other process writes a
region, so a front end that crashes loses only its own region, which its replacement starts
afresh; the engine drops what the closed connection had queued.

Frames: 4-byte big-endian length, then a JSON object; a frame listing `inline` byte counts is
followed by that many raw byte frames (tensors too large for a slot, sent once over the socket,
never pickled).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the engine's side only: a front end writes numpy arrays and never imports torch
    import torch
    from torch import Tensor

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
RING_PREFIX = "vpt-ring-"
WORKDIR_PREFIX = "vpt-serve-"
MAX_FRAME = 1 << 31
DTYPES: dict[str, np.dtype] = {"uint8": np.dtype(np.uint8), "float32": np.dtype(np.float32)}  # what may cross
ENV_SHM = "VPT_INTERNAL_SHM"          # the ring's file, set by the supervisor for its children
ENV_SOCKET = "VPT_INTERNAL_SOCKET"    # the engine's Unix socket
ENV_INDEX = "VPT_INTERNAL_FRONTEND"   # this front end's region


@dataclass(frozen=True)
class RingLayout:
    frontends: int
    slots: int
    slot_bytes: int

    @property
    def total(self) -> int:
        return self.frontends * self.slots * self.slot_bytes

    def offset(self, frontend: int, slot: int) -> int:
        if not (0 <= frontend < self.frontends and 0 <= slot < self.slots):
            raise ValueError(f"no slot {frontend}/{slot} in a ring of {self.frontends} x {self.slots}")
        return (frontend * self.slots + slot) * self.slot_bytes


def ring_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def sweep_stale_rings(base: Path | None = None) -> list[Path]:
    """Remove ring files whose owner is gone (a SIGKILLed supervisor cannot remove its own)."""
    return sweep_stale(base or ring_dir(), RING_PREFIX, "shared-memory ring file(s)")


def sweep_stale_workdirs(base: Path | None = None) -> list[Path]:
    """Remove supervisors' work folders (engine socket, metrics files) whose owner is gone."""
    return sweep_stale(base or Path(tempfile.gettempdir()), WORKDIR_PREFIX, "work folder(s)")


def owned_workdir() -> tuple[Path, int]:
    """A new `<WORKDIR_PREFIX><pid>-...` folder in the temp dir and the descriptor holding its lock
    (closing it releases the folder to `sweep_stale_workdirs` once this process is gone)."""
    path = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    return path, lock_owned(path)


def lock_owned(path: Path) -> int:
    """An exclusive `flock` on `path` (a file or a folder), held for as long as the returned descriptor
    is open; the descriptor is close-on-exec, so children never hold it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sweep_stale(base: Path, prefix: str, what: str) -> list[Path]:
    """Remove `<prefix><pid>-...` files or folders under `base` whose owner is gone.

    The owner holds an exclusive `flock` on its path for as long as it lives; the kernel drops it
    when the process dies, however it dies. A path is removed only when both say its owner is gone:
    its lock can be taken (immune to pid reuse) and the pid in its name is not running (so the path
    of an older server that took no lock, or one just created and not yet locked, is never removed
    under it). Returns the removed paths."""
    removed = []
    for path in sorted(base.glob(prefix + "*")):
        if _pid_alive(_owner_pid(path.name, prefix)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner is alive
            continue
        else:  # still under our lock: no owner can have taken it meanwhile
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d %s left by dead servers: %s", len(removed), what, ", ".join(p.name for p in removed))
    return removed


def _owner_pid(name: str, prefix: str) -> int | None:
    """The pid in `<prefix><pid>-<rest>`; None (never removed) for any other name."""
    pid, sep, _ = name.removeprefix(prefix).partition("-")
    return int(pid) if sep and pid.isdigit() else None


def _pid_alive(pid: int | None) -> bool:
    """True when `pid` runs (or cannot be checked: then the file is kept)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


class SlotRing:
    """The mapped ring (see the module docstring). `create` makes the file; `attach` maps it."""

    def __init__(self, path: Path, layout: RingLayout, owner: bool, lock_fd: int | None = None) -> None:
        self.path, self.layout, self.owner = path, layout, owner
        self._lock_fd = lock_fd  # the owner's: held open (and flock-ed) while the ring lives
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, layout.total)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, layout: RingLayout) -> SlotRing:
        """A new ring file, locked by this process until `close` (see `sweep_stale_rings`)."""
        name = f"{RING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path, tmp = ring_dir() / name, ring_dir() / f".{name}.new"  # locked before a sweep can see its name
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # close-on-exec: children hold no lock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
            os.ftruncate(fd, layout.total)  # sparse: pages exist once written
            os.rename(tmp, path)
            return cls(path, layout, owner=True, lock_fd=fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def attach(cls, spec: str) -> SlotRing:
        """`spec` is `describe()`'s string: path:frontends:slots:slot_bytes."""
        path, f, s, b = spec.rsplit(":", 3)
        return cls(Path(path), RingLayout(int(f), int(s), int(b)), owner=False)

    def describe(self) -> str:
        lay = self.layout
        return f"{self.path}:{lay.frontends}:{lay.slots}:{lay.slot_bytes}"

    def write(self, frontend: int, slot: int, data: memoryview | bytes) -> None:
        """Copy `data` (at most slot_bytes) into a slot: the one copy an image makes."""
        n = len(data)
        if n > self.layout.slot_bytes:
            raise ValueError(f"{n} bytes do not fit a {self.layout.slot_bytes}-byte slot")
        off = self.layout.offset(frontend, slot)
        self.map[off:off + n] = data

    def tensor(self, frontend: int, slot: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        """A tensor aliasing the slot (no copy); valid until the front end frees the slot (engine side)."""
        import torch

        count = 1
        for s in shape:
            count *= s
        nbytes = count * dtype.itemsize
        if nbytes > self.layout.slot_bytes or count <= 0:
            raise ValueError(f"a {dtype} {shape} tensor does not fit a slot")
        off = self.layout.offset(frontend, slot)
        return torch.frombuffer(self.map, dtype=dtype, count=count, offset=off).view(shape)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # tensors still alias it: the mapping goes with the process
            pass
        if self.owner:
            self.path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class SlotPool:
    """A front end's free slots in its own region (single event loop: no lock needed)."""

    def __init__(self, slots: int) -> None:
        self.free = list(range(slots - 1, -1, -1))
        self.size = slots

    def take(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        return [self.free.pop() for _ in range(n)]

    def give(self, slots: list[int]) -> None:
        self.free.extend(slots)

    @property
    def in_use(self) -> int:
        return self.size - len(self.free)


def array_item(arr: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    """A uint8/float32 array -> its description and its bytes (no copy when already contiguous)."""
    name = next((k for k, v in DTYPES.items() if v == arr.dtype), None)
    if name is None:
        raise ValueError(f"dtype {arr.dtype} cannot cross the channel")
    arr = np.ascontiguousarray(arr)
    return {"dtype": name, "shape": list(arr.shape)}, memoryview(arr).cast("B")


def item_shape(item: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """Validated dtype name (a key of DTYPES) and shape of an item description (the engine trusts
    nothing it receives)."""
    name, shape = str(item.get("dtype")), item.get("shape")
    if name not in DTYPES or not isinstance(shape, list) or not 1 <= len(shape) <= 4 \
            or not all(isinstance(s, int) and 0 < s < (1 << 20) for s in shape):
        raise ValueError(f"bad tensor item {item!r:.200}")
    return name, tuple(shape)


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[bytes]]:
    """One message and its inline byte frames; IncompleteReadError when the peer closed."""
    (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    msg = json.loads(await reader.readexactly(n))
    blobs = []
    for size in msg.get("inline", []):
        (m,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if m != size:
            raise ValueError("inline frame size mismatch")
        blobs.append(await reader.readexactly(m))
    return msg, blobs


def encode_frame(msg: dict[str, Any], blobs: list[memoryview | bytes] = ()) -> list[bytes | memoryview]:
    """The buffers to write for `msg` (its `inline` field is set from `blobs`)."""
    if blobs:
        msg = {**msg, "inline": [len(b) for b in blobs]}
    body = json.dumps(msg, separators=(",", ":")).encode()
    parts: list[bytes | memoryview] = [HEADER.pack(len(body)) + body]
    for b in blobs:
        parts += [HEADER.pack(len(b)), b]
    return parts


class Outbox:
    """A writer's frames, written together once per event-loop turn.

    Answers of one batch (engine side) or requests decoded in one turn (front-end side) leave in one
    `writelines`: one system call and one wake-up of the peer instead of one per message. The order
    of frames is kept; nothing is written once the writer is closing."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._parts: list[bytes | memoryview] = []
        self._scheduled = False

    def send(self, parts: list[bytes | memoryview]) -> None:
        if self.writer.is_closing():
            return
        self._parts += parts
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        parts, self._parts = self._parts, []
        if parts and not self.writer.is_closing():
            self.writer.writelines(parts)

