"""peer/authz.py's rules as a table: every rule, allowed and denied, on hand-made views.

The swarm of these tests: driver "d0" holds stage 0, "r1"/"r1b" hold stage 1, "r2" stage 2,
"gone" held stage 0 and left, "obs" is an observer (no stage, role "observer"). The receiver
holds stage 1 after step 5; the swarm's attested step is 5.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest

from peer import authz
from peer.policy import Policy
from protocols import auth
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import Benchmark, PeerInfo, PeerStats
from tests.fakes import FakeView, stage_infos

OK = None
PD = grpc.StatusCode.PERMISSION_DENIED
IA = grpc.StatusCode.INVALID_ARGUMENT
UA = grpc.StatusCode.UNAVAILABLE


class View(FakeView):
    """FakeView plus a peer that left ("gone", stage 0)."""

    @property
    def peers(self) -> list[PeerInfo]:
        left = PeerInfo("gone", b"", "x", 0, "left", Benchmark(), PeerStats(state="left"),
                        0.0, 0.0)
        return [*super().peers, left]


def swarm_view(step: int = 5) -> View:
    return View(stage_infos(2, step=step), {0: ["d0"], 1: ["r1", "r1b"], 2: ["r2"]},
                {"d0": step, "r1": step, "r1b": step, "r2": step})


RECEIVER = authz.Receiver(stage=1, step=5, view=swarm_view())


def caller(pid: str, role: str = "peer") -> auth.Caller:
    return auth.Caller(peer_id=pid, public_key=b"k" * 32, certificate=None, method="m", role=role)


def replay(step: int) -> pb.CallHeader:
    """A laggard's request for a finished round (peer/sync/rounds.py's REPLAY)."""
    h = pb.CallHeader(kind="sync", microbatch_id="m", stage=1, step=step)
    h.meta.update({"replay": "1"})
    return h


def header(sender: str = "", stage: int = 1, step: int = 6, mode: str = "") -> pb.CallHeader:
    h = pb.CallHeader(kind="forward", microbatch_id="m", stage=stage, step=step, sender=sender)
    if mode:
        h.meta["mode"] = mode
    return h


def routed(path=(1, 2), hop: int = 0, origin: str = "d0", kind: str = "forward"
           ) -> pb.CallHeader:
    """A peer-to-peer hop (peer/pipeline/p2p.py) for the receiver (stage 1) at `hop` of `path`."""
    h = pb.CallHeader(kind=kind, microbatch_id="m", stage=1, step=6, path=list(path), hop=hop)
    h.meta.update({"hops": "p2p", "origin": origin})
    return h


def step_end(sender: str = "", step: int = 6, stage0=("d0",), stage1=("r1", "r1b")
             ) -> pb.StepEnd:
    return pb.StepEnd(step=step, sender=sender, stage0_replicas=list(stage0),
                      stage_replicas=list(stage1))


# (name, rule, caller id, role, header or None, step_end or None, expected code or OK)
TABLE = [
    # Forward (training): live stage-0 replicas, for the receiver's stage, next step
    ("forward from the driver", authz.FORWARD, "d0", "peer", header(), None, OK),
    ("forward from an observer", authz.FORWARD, "obs", "observer", header(), None, PD),
    ("forward from the coordinator key", authz.FORWARD, "c", "coordinator", header(), None, PD),
    ("forward from a block replica", authz.FORWARD, "r2", "peer", header(), None, PD),
    ("forward from a driver that left", authz.FORWARD, "gone", "peer", header(), None, PD),
    ("forward from a stranger", authz.FORWARD, "zz", "peer", header(), None, PD),
    ("forward naming another sender", authz.FORWARD, "d0", "peer", header("spoofed"), None, PD),
    ("forward naming itself", authz.FORWARD, "d0", "peer", header("d0"), None, OK),
    ("forward for another stage", authz.FORWARD, "d0", "peer", header(stage=2), None, UA),
    ("forward of a past step", authz.FORWARD, "d0", "peer", header(step=5), None, IA),
    ("forward of step 0", authz.FORWARD, "d0", "peer", header(step=0), None, IA),
    ("forward jumping to the swarm's step + 1", authz.FORWARD, "d0", "peer", header(step=6),
     None, OK),
    ("forward of step 10**12", authz.FORWARD, "d0", "peer", header(step=10**12), None, IA),
    # Forward (inference): any member, any step, but the receiver's stage
    ("inference from an observer", authz.INFER, "obs", "observer", header(mode="inference",
                                                                           step=10**12), None, OK),
    ("inference from a stranger peer", authz.INFER, "zz", "peer", header(mode="inference"),
     None, OK),
    ("inference naming another sender", authz.INFER, "obs", "observer",
     header("d0", mode="inference"), None, PD),
    ("inference for another stage", authz.INFER, "obs", "observer",
     header(stage=2, mode="inference"), None, UA),
    # Backward: as Forward (training)
    ("backward from the driver", authz.BACKWARD, "d0", "peer", header(), None, OK),
    ("backward from an observer", authz.BACKWARD, "obs", "observer", header(), None, PD),
    ("backward from a replica of the stage", authz.BACKWARD, "r1b", "peer", header(), None, PD),
    ("backward of step 10**12", authz.BACKWARD, "d0", "peer", header(step=10**12), None, IA),
    # EndStep: live stage-0 replicas, sender = caller, lists of members, step not beyond
    ("end step from the driver", authz.END_STEP, "d0", "peer", None, step_end(), OK),
    ("end step naming itself", authz.END_STEP, "d0", "peer", None, step_end("d0"), OK),
    ("end step from an observer", authz.END_STEP, "obs", "observer", None,
     step_end("spoofed-driver"), PD),
    ("end step spoofing the driver", authz.END_STEP, "obs", "observer", None, step_end("d0"),
     PD),
    ("end step from a block replica", authz.END_STEP, "r1b", "peer", None, step_end(), PD),
    ("end step of a driver naming another", authz.END_STEP, "d0", "peer", None,
     step_end("d1"), PD),
    ("end step listing an invented driver", authz.END_STEP, "d0", "peer", None,
     step_end(stage0=("d0", "ghost")), IA),
    ("end step listing an invented replica", authz.END_STEP, "d0", "peer", None,
     step_end(stage1=("r1", "ghost")), IA),
    ("end step listing a replica of another stage", authz.END_STEP, "d0", "peer", None,
     step_end(stage1=("r1", "r2")), IA),
    ("end step listing a driver that left", authz.END_STEP, "d0", "peer", None,
     step_end(stage0=("d0", "gone")), OK),
    ("end step of a past step", authz.END_STEP, "d0", "peer", None, step_end(step=3), OK),
    ("end step of the swarm's step + 1", authz.END_STEP, "d0", "peer", None, step_end(step=6),
     OK),
    ("end step a little past the attested step (a lagging attestation)", authz.END_STEP, "d0",
     "peer", None, step_end(step=6 + authz.END_SLACK), OK),
    ("end step past the slack", authz.END_STEP, "d0", "peer", None,
     step_end(step=7 + authz.END_SLACK), IA),
    ("end step of step 10**12", authz.END_STEP, "d0", "peer", None, step_end(step=10**12), IA),
    # Sync.Exchange: live replicas of the receiver's stage, near its step
    ("sync part from a replica of the stage", authz.EXCHANGE, "r1b", "peer", header(), None, OK),
    ("sync part from an observer", authz.EXCHANGE, "obs", "observer", header(), None, PD),
    ("sync part from a replica of another stage", authz.EXCHANGE, "r2", "peer", header(),
     None, PD),
    ("sync part from the driver", authz.EXCHANGE, "d0", "peer", header(), None, PD),
    ("sync part under an invented sender", authz.EXCHANGE, "r1b", "peer", header("invented"),
     None, PD),
    ("sync part for another stage", authz.EXCHANGE, "r1b", "peer", header(stage=2), None, UA),
    ("sync part of a late round", authz.EXCHANGE, "r1b", "peer", header(step=2), None, OK),
    ("sync part of an ancient round", authz.EXCHANGE, "r1b", "peer", header(step=0), None, IA),
    ("sync part of round 10**12", authz.EXCHANGE, "r1b", "peer", header(step=10**12), None, IA),
    ("replay of a kept round", authz.EXCHANGE, "r1b", "peer", replay(step=0), None, OK),
    ("replay of round 10**12", authz.EXCHANGE, "r1b", "peer", replay(step=10**12), None, IA),
    # peer-to-peer hops: the route's origin, or the replica before (forward) / after (backward)
    ("p2p forward from its origin", authz.FORWARD, "d0", "peer", routed(), None, OK),
    ("p2p forward from the stage before on the route", authz.FORWARD, "r2", "peer",
     routed(path=(2, 1), hop=1), None, OK),
    ("p2p forward from the stage after on the route", authz.FORWARD, "r2", "peer", routed(),
     None, PD),
    ("p2p forward from a replica of the receiver's stage", authz.FORWARD, "r1b", "peer",
     routed(path=(2, 1), hop=1), None, PD),
    ("p2p forward from a driver that is not its origin", authz.FORWARD, "d0", "peer",
     routed(path=(2, 1), hop=1, origin="gone"), None, PD),
    ("p2p forward naming a block replica as origin", authz.FORWARD, "r2", "peer",
     routed(path=(2, 1), hop=1, origin="r2"), None, PD),
    ("p2p forward whose hop is not the receiver's stage", authz.FORWARD, "d0", "peer",
     routed(path=(2, 1), hop=0), None, IA),
    ("p2p forward from an observer", authz.FORWARD, "obs", "observer",
     routed(path=(2, 1), hop=1), None, PD),
    ("p2p backward from the stage after", authz.BACKWARD, "r2", "peer",
     routed(kind="backward"), None, OK),
    ("p2p backward from its origin", authz.BACKWARD, "d0", "peer", routed(kind="backward"),
     None, OK),
    ("p2p backward from the stage before", authz.BACKWARD, "r2", "peer",
     routed(path=(2, 1), hop=1, kind="backward"), None, PD),
    # Stage.Deliver: live block replicas (the driver's inbox then wants the microbatch's own)
    ("delivery from a block replica", authz.DELIVER, "r2", "peer", header(), None, OK),
    ("delivery from a driver", authz.DELIVER, "d0", "peer", header(), None, PD),
    ("delivery from an observer", authz.DELIVER, "obs", "observer", header(), None, PD),
    ("delivery from a stranger", authz.DELIVER, "zz", "peer", header(), None, PD),
    # State.Download: any member
    ("download from an observer", authz.DOWNLOAD, "obs", "observer", None, None, OK),
    ("download from a peer of another stage", authz.DOWNLOAD, "r2", "peer", None, None, OK),
]


@pytest.mark.parametrize("name,rule,pid,role,hdr,end,expected", TABLE,
                         ids=[row[0] for row in TABLE])
def test_rule(name, rule, pid, role, hdr, end, expected) -> None:
    who = caller(pid, role)
    hdr = None if hdr is None else pb.CallHeader.FromString(hdr.SerializeToString())
    end = None if end is None else pb.StepEnd.FromString(end.SerializeToString())
    if expected is OK:
        assert authz.decide(rule, who, RECEIVER, header=hdr, step_end=end) == pid
        if hdr is not None:
            assert hdr.sender == pid  # an empty sender is filled with the caller
        if end is not None:
            assert end.sender == pid
    else:
        with pytest.raises(authz.Denied) as denied:
            authz.decide(rule, who, RECEIVER, header=hdr, step_end=end)
        assert denied.value.code == expected, denied.value.message
        assert denied.value.message  # says what to do


def test_every_rule_is_in_the_table() -> None:
    assert {row[1] for row in TABLE} == set(authz.RULES)


def test_an_unsigned_call_is_refused() -> None:
    with pytest.raises(authz.Denied) as denied:
        authz.decide(authz.DOWNLOAD, None, RECEIVER)
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_inference_is_told_apart_by_the_header() -> None:
    assert authz.method_of(authz.FORWARD, header(mode="inference")) == authz.INFER
    assert authz.method_of(authz.FORWARD, header(mode="spsa")) == authz.FORWARD


def test_the_attested_step_bounds_a_jump() -> None:
    class Stage:
        stage, step, attested_step, attested_hash = 0, 99, 7, "h"

    v = swarm_view()
    v.stages = [Stage()]
    assert authz.attested_swarm_step(v) == 7  # not the step one liar could move
    receiver = replace(RECEIVER, view=v)
    assert authz.decide(authz.FORWARD, caller("d0"), receiver, header=header(step=8)) == "d0"
    with pytest.raises(authz.Denied):
        authz.decide(authz.FORWARD, caller("d0"), receiver, header=header(step=9))


class Ctx:
    """A peer context whose view the coordinator would list `newcomer` in."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.host = type("Host", (), {"stage": 1, "step": 5})()
        self.client = object()
        self.refreshes = 0

    async def refresh_view(self) -> None:
        self.refreshes += 1
        v = swarm_view()
        v.holders[0] = ["d0", "newcomer"]
        self.view = v


def test_an_unknown_caller_costs_one_rate_limited_refresh(monkeypatch) -> None:
    ctx = Ctx(swarm_view())
    policy = Policy(ctx)
    who = {"c": caller("newcomer")}
    monkeypatch.setattr(authz.auth, "current_caller", lambda: who["c"])

    async def scenario() -> None:
        # a driver that joined a moment ago: refused by the old view, allowed after a refresh
        assert await policy.authorize(authz.FORWARD, header=header()) == "newcomer"
        assert ctx.refreshes == 1
        # strangers right after: no second refresh within MIN_REFRESH_S, refused
        who["c"] = caller("stranger")
        for _ in range(5):
            with pytest.raises(authz.Denied) as denied:
                await policy.authorize(authz.FORWARD, header=header())
            assert denied.value.code == PD
        assert ctx.refreshes == 1
        # an observer is refused without any refresh
        who["c"] = caller("obs", "observer")
        with pytest.raises(authz.Denied):
            await policy.authorize(authz.FORWARD, header=header())
        assert ctx.refreshes == 1

    asyncio.run(scenario())


def test_concurrent_unknown_callers_share_one_refresh(monkeypatch) -> None:
    ctx = Ctx(swarm_view())
    policy = Policy(ctx)
    monkeypatch.setattr(authz.auth, "current_caller", lambda: caller("stranger"))

    async def one() -> grpc.StatusCode:
        try:
            await policy.authorize(authz.EXCHANGE, header=header())
        except authz.Denied as exc:
            return exc.code
        return grpc.StatusCode.OK

    async def scenario() -> list[grpc.StatusCode]:
        return await asyncio.gather(*(one() for _ in range(20)))

    assert set(asyncio.run(scenario())) == {PD}
    assert ctx.refreshes == 1


def test_departed_senders() -> None:
    v = swarm_view()
    assert authz.departed_senders(v, {"d0", "gone", "ghost", ""}) == {"gone", "ghost"}


def test_a_jump_may_lead_the_attestation_by_its_pace_times_its_lag() -> None:
    """A fast swarm's drivers are ahead of the attested step (heartbeats lag): the sole replica
    of a rebuilt stage may catch up to them, a liar no further than they can be by now."""
    rate = authz.StepRate()
    assert rate.per_s() == 0.0
    rate.note(100, 0.0)
    rate.note(100, 1.0)  # no change: no new sample
    rate.note(120, 2.0)
    assert rate.per_s() == 10.0
    rate.note(500, 100.0)  # older samples leave the window
    assert rate.per_s() == 0.0
    receiver = replace(RECEIVER, lead=30)
    assert receiver.jump_bound() == 5 + 1 + 30
    assert authz.decide(authz.FORWARD, caller("d0"), receiver, header=header(step=36)) == "d0"
    with pytest.raises(authz.Denied):
        authz.decide(authz.FORWARD, caller("d0"), receiver, header=header(step=37))
