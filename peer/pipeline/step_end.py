"""The end of a step, seen from a stage-0 driver: EndStep to every live block replica while this
replica syncs its own stage, and how long to wait for their answers.

A mixin of `Driver` (peer/pipeline/driver.py; SPSA's driver uses it too), split out of it by
responsibility: it uses the driver's `d` (the peer, as a DriverContext), `links` (each
EndStep's round trip is a measurement), `_answers` (the measured deadline) and `_late` (calls
answered after the step went on).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING

import grpc

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg

if TYPE_CHECKING:
    from peer.pipeline.context import DriverContext
    from peer.pipeline.deadline import MeasuredDeadline
    from peer.pipeline.links import LinkEstimates

log = logging.getLogger("shoal.driver")


class StepClosing:
    """`block_replicas` and `close_step` (see the module docstring)."""

    d: DriverContext
    links: LinkEstimates
    _answers: MeasuredDeadline
    _late: set[asyncio.Future]

    def block_replicas(self) -> dict[int, list[str]]:
        """The live replicas of every block stage, by stage: who gets this step's EndStep."""
        return {s: self.d.live_replicas(s) for s in range(1, self.d.spec.pipeline.stages + 1)}

    async def close_step(self, step: int, replicas: dict[int, list[str]],
                         request_for: Callable[[str, int], pb.StepEnd],
                         own: Awaitable[pb.StepDone],
                         on_send: Callable[[str, pb.StepEnd], None] | None = None,
                         bypassed: Collection[int] = (),
                         ) -> dict[str, pb.StepDone | None]:
        """End `step`: EndStep (`request_for(peer, stage)`) to every replica in `replicas`, at
        the same time as this replica's own sync (`own`); returns each replica's answer (None
        when it failed, or did not come in time). `on_send` sees each request as it goes out
        (SPSA counts its bytes).

        After its own sync, the driver waits for every answer for a measured deadline
        (peer/pipeline/deadline.py: a few times the usual spread of the answers), then only
        until each block stage has one replica that stepped (up to the call's timeout): a frozen
        or cut-off replica must not hold every step of the swarm, and the next step must find a
        replica of every stage at it. A late call goes on in the background; its replica
        catches up by replaying the rounds it missed. A stage in `bypassed` (this step's
        microbatches found no usable replica of it and went around it) is not waited for past
        the measured deadline: none of its replicas answered a call this step, the next step
        will go around it too, and they catch up when they are back (recovery's fast-forward,
        or replay)."""
        d = self.d
        timeout = d.spec.sync.timeout_s * 3 + 10
        stage_of = {pid: s for s, pids in replicas.items() for pid in pids}

        async def end(pid: str) -> pb.StepDone | None:
            req = request_for(pid, stage_of[pid])
            try:
                stub = pbg.StageStub(d.channel(d.address_of(pid)))
                if on_send is not None:
                    on_send(pid, req)
                t0 = time.monotonic()
                done = await stub.EndStep(req, timeout=timeout)
                self.links.record_round_trip(pid, time.monotonic() - t0, done.server_s)
                return done
            except (grpc.aio.AioRpcError, KeyError) as exc:
                log.warning("EndStep(%d) to %s failed: %s", step, pid[:8], exc)
                d.unreachable.note_error(pid, exc)
                return None

        calls = {pid: asyncio.ensure_future(end(pid)) for pid in stage_of}
        mine = await own
        if not mine.stepped:
            log.warning("stage 0 did not step at %d: %s", step, mine.detail)
        if calls:
            started = time.monotonic()
            _, late = await asyncio.wait(calls.values(),
                                         timeout=self._answers.seconds(timeout))

            def waiting() -> set[int]:  # stages without a replica that stepped yet
                return {s for s, pids in replicas.items() if pids and s not in bypassed and not any(
                    calls[p].done() and calls[p].result() is not None
                    and calls[p].result().stepped for p in pids)}
            while late and waiting() and time.monotonic() < started + timeout:
                _, late = await asyncio.wait(late, timeout=started + timeout - time.monotonic(),
                                             return_when=asyncio.FIRST_COMPLETED)
            if late:
                self._late |= late  # still running: keep a reference until they end
                for task in late:
                    task.add_done_callback(self._late.discard)
                log.warning("step %d: going on without the EndStep answers of %s (waited %.1f "
                            "s)", step, ",".join(sorted(p[:8] for p, t in calls.items()
                                                        if t in late)),
                            time.monotonic() - started)
            else:
                self._answers.complete(time.monotonic() - started)
        return {pid: t.result() if t.done() else None for pid, t in calls.items()}
