"""The one bounded poll the multi-process tests wait with: a bound only catches a hang, it is
never a timing assertion."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def poll_until(pred: Callable[[], object], timeout: float, interval: float = 0.25) -> object:
    """Call `pred` until it returns something true and return that; None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return None


async def until(pred: Callable[[], object], timeout: float = 30.0,
                interval: float = 0.02) -> object:
    """The event-loop form: `pred()` once it is true; fails the test after `timeout` s (a hang,
    not a timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"still false after {timeout} s: {pred}")
