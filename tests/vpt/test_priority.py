"""The serving-first gate: a waiting batch goes before the next training step; training still progresses."""
from __future__ import annotations

import threading
import time

import pytest

from vpt.backbone import Backbone
from vpt.priority import PriorityGate


def wait_until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the gate never reached the expected state"
        time.sleep(0.001)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_a_waiting_batch_runs_before_the_next_training_step(share: float) -> None:
    gate = PriorityGate(share)
    order: list[str] = []
    in_step, finish_step = threading.Event(), threading.Event()

    def trainer() -> None:
        with gate.training():
            order.append("step 1")
            in_step.set()
            finish_step.wait(30)
        with gate.training():
            order.append("step 2")

    def server() -> None:
        with gate.serving():
            order.append("batch")

    t = threading.Thread(target=trainer)
    t.start()
    assert in_step.wait(30)
    s = threading.Thread(target=server)
    s.start()
    wait_until(lambda: gate._serving_waiting == 1)   # the batch waits for the step in progress
    assert order == ["step 1"]
    finish_step.set()
    t.join(30)
    s.join(30)
    assert order == ["step 1", "batch", "step 2"]
    st = gate.stats()
    assert (st.serving_runs, st.training_steps) == (1, 2)


def test_training_runs_freely_while_serving_is_idle() -> None:
    gate = PriorityGate(0.0, busy_window_s=0.0)
    for _ in range(5):
        with gate.training():
            pass
    st = gate.stats()
    assert (st.training_steps, st.training_waits) == (5, 0)


def test_training_still_progresses_under_full_load() -> None:
    """Two serving threads keep a batch always waiting; training gets its share in turns, not never."""
    gate = PriorityGate(0.2)
    stop = threading.Event()
    order: list[str] = []

    def server() -> None:
        while not stop.is_set():
            with gate.serving():
                order.append("b")
                time.sleep(0.002)

    servers = [threading.Thread(target=server) for _ in range(2)]
    for s in servers:
        s.start()
    wait_until(lambda: gate.stats().serving_runs >= 2)
    for _ in range(5):
        with gate.training():
            order.append("t")
    stop.set()
    for s in servers:
        s.join(30)
    st = gate.stats()
    assert st.training_steps == 5 and st.training_waits >= 1
    first = order.index("t")
    assert "b" in order[:first]                      # serving went first while it had batches waiting
    assert "t" not in order[first + 1:first + 2] or st.credit_s > -1  # steps are interleaved with batches


def test_share_must_leave_room_for_serving() -> None:
    with pytest.raises(ValueError):
        PriorityGate(1.0)


def test_real_training_finishes_while_serving_never_stops(tiny_backbone: Backbone) -> None:
    """train_task with the gate as its step hook completes under continuous serving."""
    from tests.vpt.test_train import opts, sets
    from vpt.train import train_task

    gate = PriorityGate(0.2)
    stop = threading.Event()

    def server() -> None:
        while not stop.is_set():
            with gate.serving():
                time.sleep(0.002)

    servers = [threading.Thread(target=server) for _ in range(2)]
    for s in servers:
        s.start()
    try:
        train, val = sets(tiny_backbone)
        out = train_task(tiny_backbone, ("0", "1", "2"), train, val, opts(epochs=1), step_gate=gate.training)
    finally:
        stop.set()
        for s in servers:
            s.join(30)
    st = gate.stats()
    assert out.steps == st.training_steps == 3       # 24 images, batch 8: every step went through the gate
    assert st.serving_runs > st.training_steps
