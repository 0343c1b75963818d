"""peer/pipeline/stalls.py: spans this process was stopped, and the driver's use of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import grpc
import pytest

from peer.pipeline.stalls import StallWatch
from peer.pipeline.unreachable import UnreachableLog


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_late_tick_is_a_stall_and_a_punctual_one_is_not() -> None:
    w = StallWatch(tick_s=0.25, stall_s=1.5, clock=Clock())
    w.note(10.0, 10.3)  # 50 ms late: a busy loop, not a stall
    assert w.stalled_during(0.0, 20.0) == 0.0
    w.note(10.3, 15.55)  # 5 s late: stopped from 10.55 to 15.55
    assert w.stalled_during(0.0, 20.0) == pytest.approx(5.0)
    assert w.stalled_during(12.0, 13.0) == pytest.approx(1.0)  # a call inside the stall
    assert w.stalled_during(15.6, 30.0) == 0.0  # a call after it
    assert w.stalled_during(9.0, 11.0) == pytest.approx(0.45)


def test_a_stall_counts_before_its_tick_has_woken() -> None:
    clock = Clock()
    w = StallWatch(tick_s=0.25, stall_s=1.5, clock=clock)
    w._asked_at = 100.0  # the tick went to sleep at 100 ...
    clock.t = 108.0  # ... and the process was stopped until now; the tick has not run yet
    assert w.stalled_during(99.0, 108.0) == pytest.approx(7.75)
    clock.t = 100.5  # not late enough to be a stall
    assert w.stalled_during(99.0, 100.5) == 0.0


def test_the_watch_sees_its_own_process_stopped() -> None:
    """A real SIGSTOP/SIGCONT of a child process running the watch."""
    code = (
        "import asyncio, sys, time\n"
        "from peer.pipeline.stalls import StallWatch\n"
        "async def main():\n"
        "    w = StallWatch(tick_s=0.05, stall_s=0.5)\n"
        "    task = asyncio.ensure_future(w.run())\n"
        "    t0 = time.monotonic()\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(2.5)\n"
        "    print(round(w.stalled_during(t0, time.monotonic()), 1), flush=True)\n"
        "    task.cancel()\n"
        "asyncio.run(main())\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(p.pid, signal.SIGCONT)
        stopped = float(p.stdout.readline())
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert stopped >= 1.0, stopped  # about 1.5 s; the bound only needs to tell it from 0


def test_a_timeout_across_a_stall_is_not_held_against_the_replica() -> None:
    import random

    from peer.pipeline.driver import Driver
    from peer.pipeline.router import Router

    class Err(grpc.aio.AioRpcError):
        def __init__(self) -> None:
            pass

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DEADLINE_EXCEEDED

    drv = Driver.__new__(Driver)
    drv.d = SimpleNamespace(unreachable=UnreachableLog())  # type: ignore[assignment]
    drv.router = Router(random.Random(0))
    drv.router.update_replicas(1, {"a": 10.0})
    drv.stalls = StallWatch()
    now = time.monotonic()
    drv.stalls.note(now - 10.0, now - 2.0)  # stopped for ~7.75 s, ended 2 s ago
    assert drv.router.choose(1, 4, now=now - 11.0) == "a"
    drv.hop_failed("a", 4, now - 11.0, Err())
    e = drv.router.estimate("a")
    assert not e.suspect and e.timeouts == 0 and e.outstanding == 0.0
    assert drv.router.choose(1, 4, now=now) == "a"
    drv.hop_failed("a", 4, time.monotonic(), Err())  # a timeout with no stall in it
    assert drv.router.estimate("a").suspect and drv.router.estimate("a").timeouts == 1
    assert drv.d.unreachable.take() == []  # slow is not dead: the coordinator is not told


def test_a_refused_hop_bans_the_replica_and_is_reported() -> None:
    import random

    from peer.pipeline.driver import Driver
    from peer.pipeline.router import NoReplicaAvailable, Router

    refused = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "Connection refused")
    drv = Driver.__new__(Driver)
    drv.d = SimpleNamespace(unreachable=UnreachableLog(),  # type: ignore[assignment]
                            spec=SimpleNamespace(membership=SimpleNamespace(lease_s=10.0)))
    drv.router = Router(random.Random(0))
    drv.router.update_replicas(1, {"a": 10.0})
    drv.stalls = StallWatch()
    assert drv.hop_failed("a", 4, time.monotonic(), refused)
    assert drv.d.unreachable.take() == ["a"]
    with pytest.raises(NoReplicaAvailable):
        drv.router.choose(1, 4, now=time.monotonic())
