"""`kill -USR1` on a peer logs where each of its tasks and threads waits (peer/machine.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from peer import machine


async def _stuck_on_an_event(ev: asyncio.Event) -> None:
    await ev.wait()


def test_sigusr1_logs_every_task_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("shoal.test.taskdump")

    async def main() -> None:
        machine.dump_tasks_on_sigusr1(log)
        ev = asyncio.Event()
        task = asyncio.ensure_future(_stuck_on_an_event(ev))
        task.set_name("the-stuck-one")
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if "the-stuck-one" in caplog.text:
                break
        ev.set()
        await task
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)

    with caplog.at_level(logging.WARNING, logger="shoal.test.taskdump"):
        asyncio.run(main())
    assert "SIGUSR1: " in caplog.text
    assert "the-stuck-one" in caplog.text and "_stuck_on_an_event" in caplog.text
    assert "Thread MainThread:" in caplog.text
