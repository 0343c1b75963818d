"""SyncRounds' aggregator side (peer/sync/rounds.py) without a network: parts are handed to `serve`
as the Sync.Exchange handler would."""

from __future__ import annotations

import asyncio

import numpy as np

from peer.pipeline import wire
from peer.sync.rounds import SyncRounds


class CountingMode:
    """A sync mode whose aggregate names who was in it."""

    name = "count"

    def aggregate(self, parts):
        return {"n": np.asarray([len(parts)])}, {"included": ",".join(sorted(parts))}


def rounds(me: str, timeout: float) -> SyncRounds:
    return SyncRounds(me=me, stage=1, mode=CountingMode(), candidates=lambda: ["a", "b"],
                      exchange_stub=lambda pid: None, counter=wire.ByteCounter(),
                      timeout=timeout, max_bytes=1 << 20)


def header(sender: str, step: int, **meta: str):
    from protocols import shoal_pb2 as pb

    h = pb.CallHeader(kind="sync", step=step, stage=1, sender=sender)
    h.meta.update(meta)
    return h


def test_aggregator_stops_waiting_for_a_replica_that_moved_on() -> None:
    """b's view left a out at step 1, so b finished round 1 alone; its part for round 2 shows
    that, and a closes round 1 without b instead of waiting out the timeout."""
    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        a.agreed[1] = ["a", "b"]
        leader = asyncio.create_task(a.run(1, ({}, {})))
        await asyncio.sleep(0.3)
        assert not leader.done()  # still waiting for b: nothing says b is not coming
        late = asyncio.create_task(a.serve(header("b", 2), {}, "b"))
        _, meta = await asyncio.wait_for(leader, 10)  # well inside the 60 s timeout
        assert meta["included"] == "a"
        late.cancel()

    asyncio.run(scenario())


def test_aggregator_waits_for_a_replica_that_is_still_coming() -> None:
    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        a.agreed[1] = ["a", "b"]
        leader = asyncio.create_task(a.run(1, ({}, {})))
        await asyncio.sleep(0.6)
        assert not leader.done()
        served = asyncio.create_task(a.serve(header("b", 1), {}, "b"))
        _, meta = await asyncio.wait_for(leader, 10)
        assert meta["included"] == "a,b"
        assert (await served)[1]["included"] == "a,b"

    asyncio.run(scenario())


def test_aggregator_names_the_replicas_that_began_from_other_weights() -> None:
    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        a.agreed[1] = ["a", "b", "c"]
        leader = asyncio.create_task(a.run(1, ({"state_hash": "h1"}, {})))
        b = asyncio.create_task(a.serve(header("b", 1, state_hash="h2"), {}, "b"))
        c = asyncio.create_task(a.serve(header("c", 1, state_hash="h1"), {}, "c"))
        _, meta = await asyncio.wait_for(leader, 10)
        assert meta["included"] == "a,b,c" and meta["diverged"] == "b"
        assert (await b)[1]["diverged"] == (await c)[1]["diverged"] == "b"  # the same bytes

    asyncio.run(scenario())


def test_no_verdict_without_hashes_or_when_they_agree() -> None:
    from peer.sync.rounds import _diverged

    assert _diverged({"a": "h", "b": "h"}) == []
    assert _diverged({"a": "", "b": "h"}) == []  # a replica that does not know its hash yet
    assert _diverged({"b": "h1", "a": "h2", "c": "h2"}) == ["b"]


def test_the_majority_then_the_senior_replica_is_right_never_the_lowest_id() -> None:
    from peer.sync.rounds import _diverged

    # "0" sorts first but is alone against two: it is the one that diverged
    assert _diverged({"0": "bad", "a": "h", "b": "h"}) == ["0"]
    # a tie goes to the most senior (earliest joined_at), not to the lowest id
    assert _diverged({"0": "bad", "b": "h"}, {"b": 10.0, "0": 20.0}) == ["0"]
    # the coordinator's attested hash beats any count
    assert _diverged({"a": "x", "b": "x", "c": "h"}, {}, attested="h") == ["a", "b"]


def test_parts_are_keyed_by_the_signing_caller_not_the_message() -> None:
    """Three parts whose headers name invented senders, all from one caller, are one part."""
    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        a.agreed[1] = ["a", "b"]
        leader = asyncio.create_task(a.run(1, ({}, {})))
        parts = [asyncio.create_task(a.serve(header(f"spoof{i}", 1), {}, "b")) for i in range(3)]
        _, meta = await asyncio.wait_for(leader, 10)
        assert meta["included"] == "a,b"
        for p in parts:
            assert (await p)[1]["included"] == "a,b"

    asyncio.run(scenario())


def test_the_round_deadline_follows_the_measured_rounds() -> None:
    """Until three complete rounds were measured the aggregator waits the whole timeout; after
    quick ones, a round that a replica never joins closes at the floor, and is not measured."""
    from peer.pipeline import deadline

    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        assert a.round_deadline_s() == 60.0
        for step in (1, 2, 3):
            a.agreed[step] = ["a", "b"]
            served = asyncio.create_task(a.serve(header("b", step), {}, "b"))
            await asyncio.sleep(0)  # b's part is in before a's own
            await a.run(step, ({}, {}))
            await served
        assert a.round_deadline_s() == deadline.FLOOR_S
        a.agreed[4] = ["a", "b"]
        # the bound only turns a wait of the whole 60 s timeout into a failure
        _, meta = await asyncio.wait_for(a.run(4, ({}, {})), 30)
        assert meta["included"] == "a"
        assert a.round_deadline_s() == deadline.FLOOR_S  # the lone round: unmeasured

    asyncio.run(scenario())


def test_the_measured_deadline_is_a_few_medians_between_a_floor_and_the_timeout() -> None:
    from peer.pipeline.deadline import FLOOR_S, SPREAD, MeasuredDeadline

    d = MeasuredDeadline()
    d.complete(1.0)
    d.complete(1.0)
    assert d.seconds(30.0) == 30.0  # fewer than three measured: the configured timeout
    d.complete(5.0)
    assert d.seconds(30.0) == SPREAD * 1.0  # the median, not the mean: one slow wait is noise
    assert d.seconds(3.0) == 3.0  # never past the timeout
    quick = MeasuredDeadline()
    for _ in range(3):
        quick.complete(0.01)
    assert quick.seconds(30.0) == FLOOR_S


def test_a_member_fails_over_from_an_aggregator_that_does_not_acknowledge_its_part() -> None:
    """The aggregator b is cut off: its port accepts TCP but nothing answers (as when a partition
    drops its packets). Member a's part is not acknowledged within the measured deadline, so a
    fails over to the next candidate (itself) long before the call timeout (2 * 60 + 10 s)."""
    import grpc

    from peer.pipeline import deadline
    from protocols import shoal_pb2_grpc as pbg

    async def scenario() -> None:
        async def swallow(reader, writer):  # reads and never answers
            while await reader.read(65536):
                pass

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        a = SyncRounds(me="b-member", stage=1, mode=CountingMode(),
                       candidates=lambda: ["a-silent", "b-member"],
                       exchange_stub=lambda pid: pbg.SyncStub(channel).Exchange,
                       counter=wire.ByteCounter(), timeout=60.0, max_bytes=1 << 20)
        for _ in range(deadline.WARMUP):  # earlier parts were acknowledged at once
            a.ack_deadline.complete(0.01)
        a.agreed[1] = ["a-silent", "b-member"]
        try:
            _, meta = await asyncio.wait_for(a.run(1, ({}, {})), 60)
        finally:
            await channel.close()
            server.close()
        assert meta["included"] == "b-member"  # it closed the round alone, as the next in line

    asyncio.run(scenario())


def test_an_acknowledgement_is_measured_and_its_absence_is_not() -> None:
    from peer.sync.rounds import ACK_KEY

    class Call:
        def __init__(self, metadata):
            self.metadata = metadata

        async def initial_metadata(self):
            return self.metadata

    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        await a._acknowledged(Call(((ACK_KEY, "1"),)), "b")
        await a._acknowledged(Call(()), "b")  # an answer without the ack (an error): not timed
        assert len(a.ack_deadline._waits) == 1

    asyncio.run(scenario())


def test_an_acknowledgement_that_came_while_this_process_was_stopped_is_waited_for_again(
        monkeypatch) -> None:
    """The member was stopped (SIGSTOP) while its part waited for the aggregator's ack: when it
    runs again the ack deadline has passed, but the ack may be in the socket. It waits once more
    instead of leading the round alone; with no stop, the same late ack fails over."""
    from peer.pipeline import deadline, stalls
    from peer.sync.rounds import ACK_KEY

    class Call:
        def __init__(self, after_s: float) -> None:
            self.after_s, self.cancelled = after_s, False

        async def initial_metadata(self):
            await asyncio.sleep(self.after_s)
            return ((ACK_KEY, "1"),)

        def cancel(self) -> None:
            self.cancelled = True

    class Stopped:
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def stalled_during(self, t0: float, t1: float) -> float:
            return self.seconds

    async def scenario(stopped_s: float) -> Call:
        a = rounds("a", timeout=60.0)
        for _ in range(deadline.WARMUP):
            a.ack_deadline.complete(0.01)
        monkeypatch.setattr(stalls, "WATCH", Stopped(stopped_s))
        call = Call(after_s=1.5 * a.ack_deadline.seconds(60.0))
        try:
            await a._acknowledged(call, "b")
        except TimeoutError:
            call.cancelled = True
        return call

    assert not asyncio.run(scenario(stopped_s=5.0)).cancelled
    assert asyncio.run(scenario(stopped_s=0.0)).cancelled


def test_aggregator_does_not_wait_for_a_replica_whose_port_refuses() -> None:
    """b was killed: the view lists it until its lease lapses, but its address refuses every
    connection, so a closes the round without it instead of waiting out its deadline (60 s
    here, as no round was measured yet); a frozen replica would not refuse, and is waited for
    (test_aggregator_waits_for_a_replica_that_is_still_coming)."""
    import socket

    import grpc

    from protocols import shoal_pb2_grpc as pbg

    async def scenario() -> None:
        with socket.socket() as s:  # a port nothing listens on any more
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{closed}")
        a = SyncRounds(me="a", stage=1, mode=CountingMode(), candidates=lambda: ["a", "b"],
                       exchange_stub=lambda pid: pbg.SyncStub(channel).Exchange,
                       counter=wire.ByteCounter(), timeout=60.0, max_bytes=1 << 20)
        a.agreed[1] = ["a", "b"]
        try:
            _, meta = await asyncio.wait_for(a.run(1, ({}, {})), 30)  # a hang guard only
            assert meta["included"] == "a"
        finally:
            await channel.close()

    asyncio.run(scenario())


def test_a_member_measures_complete_rounds_and_leads_with_that_deadline() -> None:
    """Member b saw three complete rounds through aggregator a: when a is cut off and b must
    lead, b waits a measured deadline (the floor here) for the others, not the 60 s timeout
    (bench.churn: a stage's new leader waited 30 s for a partitioned replica)."""
    from peer.pipeline import deadline

    async def scenario() -> None:
        b = rounds("b", timeout=60.0)
        included = {"value": "a,b"}

        async def answered(cand, step, own, timeout=None):
            return {}, {"included": included["value"]}

        b._send = answered
        assert b.round_deadline_s() == 60.0
        included["value"] = "a"  # an incomplete round (b's part came late): not a measure
        await b.run(1, ({}, {}))
        assert b.round_deadline_s() == 60.0
        included["value"] = "a,b"
        for step in range(2, 2 + deadline.WARMUP):
            await b.run(step, ({}, {}))
        assert b.round_deadline_s() == deadline.FLOOR_S

    asyncio.run(scenario())


def test_a_replica_the_last_round_closed_without_is_not_waited_for_until_heard_from() -> None:
    """b is frozen: round 1 waits its deadline for b and closes without it; round 2 does not
    wait for b at all (a freeze costs one deadline, not one per round); once b is heard from
    again (its late part), round 3 waits for it as usual."""
    from peer.pipeline import deadline

    async def scenario() -> None:
        a = rounds("a", timeout=60.0)
        for _ in range(deadline.WARMUP):
            a.deadline.complete(0.01)  # measured: round 1 waits the 2 s floor for b
        for step in (1, 2, 3):
            a.agreed[step] = ["a", "b"]
        _, meta = await asyncio.wait_for(a.run(1, ({}, {})), 30)  # hang guards only
        assert meta["included"] == "a"
        for _ in range(deadline.MEASURED):
            a.deadline.complete(100.0)  # from now on a wait for b would last the 60 s timeout
        _, meta = await asyncio.wait_for(a.run(2, ({}, {})), 30)
        assert meta["included"] == "a"
        late = await a.serve(header("b", 2), {}, "b")  # b thawed: the same aggregate back
        assert late[1]["included"] == "a"
        third = asyncio.create_task(a.run(3, ({}, {})))
        await asyncio.sleep(0.6)
        assert not third.done()  # waiting for b again
        served = asyncio.create_task(a.serve(header("b", 3), {}, "b"))
        _, meta = await asyncio.wait_for(third, 30)
        assert meta["included"] == "a,b" and (await served)[1]["included"] == "a,b"

    asyncio.run(scenario())
