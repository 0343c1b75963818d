"""The authorization policy at run time: peer/authz.py's rules applied to the current call
against the peer's current view, with one view refresh before a denial the view could explain
by lagging becomes final, and refusals logged at most once a second.

One `Policy` per peer context, shared by its Stage, Sync and State services (`Policy.of`).
Split out of peer/authz.py, which keeps the rules and `decide`, pure functions of the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import ClassVar

from peer.authz import (
    LAG_EXTRA_S,
    LAG_HEARTBEATS,
    MIN_REFRESH_S,
    REFRESH_TIMEOUT_S,
    Denied,
    Receiver,
    StepRate,
    attested_swarm_step,
    decide,
    method_of,
    short_id,
)
from protocols import auth
from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.authz")


class Refresher:
    """Refreshes the peer's view for the policy: one refresh at a time (callers that arrive
    meanwhile wait for it), and none within MIN_REFRESH_S of the last one."""

    def __init__(self, refresh: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._refresh = refresh
        self._clock = clock
        self._last = -1e18
        self._task: asyncio.Task | None = None
        self.count = 0

    async def __call__(self) -> bool:
        """Refresh unless one ran within MIN_REFRESH_S; returns whether the view may be new."""
        if self._task is None or self._task.done():
            if self._clock() - self._last < MIN_REFRESH_S:
                return False
            self._last = self._clock()
            self.count += 1
            self._task = asyncio.ensure_future(self._run())
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)
        return True

    async def _run(self) -> None:
        try:
            await asyncio.wait_for(self._refresh(), REFRESH_TIMEOUT_S)
        except Exception as exc:  # the old view stays; the caller is judged on it
            log.info("view refresh for an authorization check failed: %s", exc)


class Policy:
    """The policy of one peer (one per peer context, shared by its three services)."""

    _of: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.refresh = Refresher(ctx.refresh_view)
        self.denied = 0
        self._logged_at, self._logged_count = -1e18, 0
        self.rate = StepRate()

    @classmethod
    def of(cls, ctx) -> Policy:
        """The policy of `ctx` (made on first use)."""
        policy = cls._of.get(ctx)
        if policy is None:
            policy = cls._of[ctx] = cls(ctx)
        return policy

    def receiver(self) -> Receiver:
        host = self.ctx.host
        spec = getattr(self.ctx, "spec", None)
        lag_s = LAG_HEARTBEATS * (spec.membership.heartbeat_s if spec is not None else 2.0) \
            + LAG_EXTRA_S
        return Receiver(host.stage if host is not None else None,
                        host.step if host is not None else None, self.ctx.view,
                        math.ceil(self.rate.per_s() * lag_s))

    async def authorize(self, service_method: str, *, header: pb.CallHeader | None = None,
                        step_end: pb.StepEnd | None = None) -> str:
        """`decide` for the current call, with one view refresh before a stale denial becomes
        final. Returns the caller's peer id; raises Denied."""
        rule = method_of(service_method, header)
        caller = auth.current_caller()
        try:
            return decide(rule, caller, self.receiver(), header=header, step_end=step_end)
        except Denied as exc:
            if not exc.stale or self.ctx.client is None:
                self._log(rule, caller, exc)
                raise
        if await self.refresh():  # a fresh view: a sample of the attested step's pace
            self.rate.note(attested_swarm_step(self.ctx.view), time.monotonic())
        try:
            return decide(rule, caller, self.receiver(), header=header, step_end=step_end)
        except Denied as exc:
            self._log(rule, caller, exc)
            raise

    def _log(self, rule: str, caller: auth.Caller | None, exc: Denied) -> None:
        """One log line per second at most (a flood of refused calls must not flood the log);
        the lines say how many refusals they stand for."""
        self.denied += 1
        now = time.monotonic()
        if now - self._logged_at < 1.0:
            return
        more = self.denied - self._logged_count - 1
        self._logged_at, self._logged_count = now, self.denied
        log.info("refused %s from %s: %s %s%s", rule,
                 short_id(caller.peer_id) if caller else "?", exc.code.name, exc.message,
                 f" (and {more} more refusals since the last line)" if more > 0 else "")
