"""The shared-memory ring and the channel: bytes cross intact, slots are reused, nothing leaks, and a
front end that drops its connection wedges nothing. A real engine (tiny ViT) answers on a real socket."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from server.channel import RingLayout, SlotPool, SlotRing, sweep_stale_rings
from server.engine.service import EngineService
from server.errors import ApiError
from server.frontend.engine_client import EngineClient
from server.frontend.state import BackboneInfo
from server.settings import Settings
from server.state import AppState
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.server.helpers import backbone_for, constant_task, ring_owner
from vpt.backbone import load_backbone
from vpt.task import read_metadata


def test_ring_bytes_written_by_another_process_arrive_intact(tmp_path: Path) -> None:
    ring = SlotRing.create(RingLayout(frontends=2, slots=4, slot_bytes=1 << 16))
    try:
        code = (f"import torch; from server.channel import SlotRing; r = SlotRing.attach({ring.describe()!r}); "
                "g = torch.Generator().manual_seed(7); "
                "img = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=g); "
                "x = torch.randn((3, 16, 16), generator=g); "
                "r.write(1, 3, memoryview(img.numpy()).cast('B')); r.write(0, 2, memoryview(x.numpy()).cast('B'))")
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
        g = torch.Generator().manual_seed(7)
        img = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=g)
        x = torch.randn((3, 16, 16), generator=g)
        assert torch.equal(ring.tensor(1, 3, torch.uint8, (40, 50, 3)), img)
        assert torch.equal(ring.tensor(0, 2, torch.float32, (3, 16, 16)), x)
        with pytest.raises(ValueError):
            ring.tensor(2, 0, torch.uint8, (1, 1, 3))  # no third front end
        with pytest.raises(ValueError):
            ring.write(0, 0, b"x" * ((1 << 16) + 1))
    finally:
        ring.close()
    assert not ring.path.exists()


def test_slot_pool_hands_out_each_slot_once() -> None:
    pool = SlotPool(4)
    a = pool.take(3)
    assert a is not None and len(set(a)) == 3 and pool.take(2) is None
    pool.give(a)
    assert sorted(pool.take(4) or []) == [0, 1, 2, 3] and pool.in_use == 4


@pytest.fixture
def engine_state(tmp_path: Path, tiny_vit_file: Path):
    settings = Settings(backbone=TINY_NAME, backbone_weights=tiny_vit_file, backbone_kwargs=TINY_KWARGS,
                        store=str(tmp_path / "store"), workers=0, attention="torch", max_wait_ms=2)
    state = AppState.start(settings)
    bb = backbone_for(str(tiny_vit_file))
    blob = constant_task(bb, ["zero", "one", "two"], winner=2)
    state.store.put_task("default", "t", blob, read_metadata(blob))
    yield state
    state.close()


def _images(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3), dtype=np.uint8)
            for _ in range(n)]


async def _run_handoff(state: AppState, tmp_path: Path) -> None:
    ring = SlotRing.create(RingLayout(frontends=2, slots=24, slot_bytes=16 << 10))
    path = str(tmp_path / "engine.sock")
    server = await EngineService(state, ring).serve(path)
    rng = np.random.default_rng(0)
    try:
        client = EngineClient(path, ring, 0)
        hello = await client.connect()
        assert hello["backbone"]["fingerprint"] == state.backbone.fingerprint
        seen: set[int] = set()

        async def one(i: int) -> None:
            imgs = _images(rng, 1 + i % 3)
            out = await client.predict("default", "t", imgs, top_k=2)
            assert len(out.results) == len(imgs) and all(r[0].label == "two" for r in out.results)

        for start in range(0, 240, 8):  # 240 requests (~480 images), 8 at a time, through 24 slots
            wave = [asyncio.create_task(one(i)) for i in range(start, start + 8)]
            await asyncio.sleep(0)  # each has taken its slots and sent its request
            seen.update(s for s in range(24) if s not in client.pool.free)
            await asyncio.gather(*wave)
        assert client.pool.in_use == 0          # every slot came back, and was reused ~20 times
        assert 2 <= len(seen) <= 24
        big = [rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)]  # 36 kB > a 16 kB slot: inline
        assert (await client.predict("default", "t", big, top_k=1)).results[0][0].label == "two"
        pre = np.zeros((2, 3, 32, 32), np.float32)  # already preprocessed inputs (a front end holds numpy)
        assert [r[0].label for r in (await client.predict("default", "t", pre, top_k=1)).results] == ["two"] * 2
        with pytest.raises(ApiError) as err:  # a bad task fails alone, its slots come back
            await client.predict("default", "missing", _images(rng, 2), top_k=1)
        assert err.value.status == 404 and client.pool.in_use == 0

        # a front end that vanishes mid-request: the engine drops its work and keeps serving
        gone = EngineClient(path, ring, 1)
        await gone.connect()
        pending = [asyncio.create_task(gone.predict("default", "t", _images(rng, 3), top_k=1)) for _ in range(4)]
        await asyncio.sleep(0)
        await gone.close()
        await asyncio.gather(*pending, return_exceptions=True)
        again = EngineClient(path, ring, 1)  # its replacement takes the same region
        await again.connect()
        out = await asyncio.gather(*(again.predict("default", "t", _images(rng, 2), top_k=1) for _ in range(10)))
        assert all(o.results[0][0].label == "two" for o in out) and again.pool.in_use == 0
        assert (await client.predict("default", "t", _images(rng, 1), top_k=1)).results[0][0].label == "two"
        await again.close()
        await client.close()
    finally:
        server.close()
        state.batcher.stop()  # nothing reads the ring once it is unmapped (as the engine process stops)
        ring.close()


def test_engine_handoff_reuses_slots_and_survives_a_dropped_front_end(engine_state: AppState, tmp_path: Path) -> None:
    asyncio.run(_run_handoff(engine_state, tmp_path))


async def _run_timeout(state: AppState, tmp_path: Path) -> None:
    ring = SlotRing.create(RingLayout(frontends=1, slots=4, slot_bytes=16 << 10))
    path = str(tmp_path / "engine.sock")
    server = await EngineService(state, ring).serve(path)
    try:
        client = EngineClient(path, ring, 0)
        await client.connect()
        state.batcher.max_wait_s = 1.0  # the batch waits: the caller gives up first
        with pytest.raises(TimeoutError):
            small = [np.full((30, 40, 3), i, dtype=np.uint8) for i in range(3)]  # 3.6 kB each: in slots
            await asyncio.wait_for(client.predict("default", "t", small, 1), 0.05)
        assert client.pool.in_use == 3  # kept until the engine answers: it may still read them
        for _ in range(600):
            if client.pool.in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert client.pool.in_use == 0
        await client.close()
    finally:
        server.close()
        state.batcher.stop()
        ring.close()


def test_abandoned_requests_keep_their_slots_until_the_engine_answers(engine_state: AppState,
                                                                      tmp_path: Path) -> None:
    asyncio.run(_run_timeout(engine_state, tmp_path))


def test_rings_of_sigkilled_owners_are_swept_and_live_ones_kept() -> None:
    root = Path(__file__).resolve().parents[2]
    (dead, dead_path), (alive, alive_path) = ring_owner(root), ring_owner(root)
    mine = SlotRing.create(RingLayout(1, 2, 4096))
    unlocked = mine.path.with_name(f"vpt-ring-{alive.pid}-0ld5erve")  # an older server's ring: no lock, pid alive
    unlocked.write_bytes(b"\0" * 64)
    try:
        assert dead_path.name.startswith(f"vpt-ring-{dead.pid}-") and dead_path.exists()
        dead.send_signal(signal.SIGKILL)
        assert dead.wait(30) == -signal.SIGKILL
        assert dead_path.exists()  # nobody removed it: the owner had no chance
        removed = sweep_stale_rings()
        assert not dead_path.exists()  # (another server starting meanwhile may have swept it first)
        assert alive_path.exists() and mine.path.exists()  # their owners hold their locks
        assert alive_path not in removed and mine.path not in removed
        assert unlocked.exists()  # unlocked, but its pid runs: kept
    finally:
        alive.kill()
        alive.wait(30)
        mine.close()
    assert not mine.path.exists()
    sweep_stale_rings()
    assert not alive_path.exists() and not unlocked.exists()  # killed too: the next sweep takes both


def test_an_outbox_writes_one_turns_frames_together_and_in_order() -> None:
    """Frames sent in one event-loop turn leave in one `writelines` (one system call, one wake-up of
    the peer); the peer reads every message, in order; nothing is written once the writer closes."""
    import asyncio
    import socket

    from server.channel import Outbox, encode_frame, read_frame

    async def go() -> None:
        a, b = socket.socketpair()
        reader, a_writer = await asyncio.open_connection(sock=a)  # both ends kept: a dropped writer closes
        _b_reader, writer = await asyncio.open_connection(sock=b)
        calls = []
        plain = writer.writelines
        writer.writelines = lambda parts: (calls.append(len(parts)), plain(parts))[1]
        out = Outbox(writer)
        for i in range(5):
            out.send(encode_frame({"id": i}, [bytes([i]) * (i + 1)] if i % 2 else []))
        assert calls == []  # nothing before the turn ends
        got = [await read_frame(reader) for _ in range(5)]
        assert len(calls) == 1
        assert [m["id"] for m, _ in got] == list(range(5))
        assert [blobs for _, blobs in got] == [[], [b"\x01" * 2], [], [b"\x03" * 4], []]
        out.send(encode_frame({"id": 5}))
        await asyncio.sleep(0)
        out.send(encode_frame({"id": 6}))  # a later turn: a write of its own
        assert [m["id"] for m, _ in [await read_frame(reader), await read_frame(reader)]] == [5, 6]
        assert calls == [9, 1, 1]  # 5 messages and 2 blobs (a header and the bytes each): 9 buffers
        writer.close()
        out.send(encode_frame({"id": 7}))
        await asyncio.sleep(0)
        assert len(calls) == 3
        a_writer.close()

    asyncio.run(go())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_a_front_end_knows_the_bank_value_size_from_the_engine_facts(tiny_vit_file: Path, dtype: str) -> None:
    """Task records show bank bytes = values x element size: a front end, which has only the engine's
    `describe()` facts (no torch dtype), must get the same size as the engine's backbone."""
    bb = load_backbone(TINY_NAME, weights=tiny_vit_file, model_kwargs=TINY_KWARGS, dtype=dtype)
    assert bb.element_size == getattr(torch, dtype).itemsize
    assert BackboneInfo(bb.describe()).element_size == bb.element_size
