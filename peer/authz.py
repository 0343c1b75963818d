"""Who may call what on this peer: the one authorization policy of the Stage, Sync and State
services, as a table of rules by method, checked against the coordinator's current view.

Every handler of peer/services.py asks `Policy.authorize` (peer/policy.py) first, on the call's
header (or the unary request), before any payload is decoded. The *caller* is the identity that
signed the call (protocols.auth.current_caller(), set by the AuthInterceptor, which has already
refused bad signatures, expired certificates and revoked peers); no field of the message may
name another sender: CallHeader.sender and StepEnd.sender must equal the caller, and are filled
in when empty.

The rules (contract 2 of issue #12):

| method                      | who may call                                      | step        |
|-----------------------------|---------------------------------------------------|-------------|
| Stage.Forward (training)    | live stage-0 replicas, for the receiver's stage   | next        |
| Stage.Forward (inference)   | any member, observers included (no graph kept)    | any         |
| Stage.Backward              | live stage-0 replicas, for the receiver's stage   | next        |
| Stage.EndStep               | live stage-0 replicas; the replica lists name     | not beyond  |
|                             | members of the right stages only                  | the swarm   |
| Sync.Exchange               | live replicas of the receiver's stage             | near own    |
| State.Download              | any member, observers included                    | -           |
| Stage.Forward / Backward,   | the route's origin (a live stage-0 replica), or a | next        |
| peer to peer (`check_route`)| live replica of the stage before / after the hop  |             |
| Stage.Deliver               | live block replicas, for a microbatch the driver  | -           |
|                             | awaits, with its nonce (peer/pipeline/p2p.py)     |             |

"Live" here means listed in the view at that stage, not revoked, and not departed (lost or
left): a replica that is re-downloading ("syncing") still abstains from rounds, and a draining
driver still finishes its in-flight microbatches. Steps: a microbatch's step is the receiver's
next step; a jump (the sole replica of a rebuilt stage catching up) is allowed only up to the
swarm's attested step + 1 (stage 0's StageInfo.attested_step, else its step), plus the lead the
honest drivers can have over the attestation by now (`StepRate`: the attested step's own pace
times its lag; 0 in a swarm that stands still); a step at or
before the receiver's own, or beyond that bound, is INVALID_ARGUMENT. An EndStep may run up to
END_SLACK steps past that bound (the attestation trails a fast swarm): the receiver does not
adopt such a step, it re-downloads its stage from its replicas.

A denial that the view could explain by lagging (a caller it does not list yet, or at another
stage; a step beyond what it attests) first costs one view refresh (peer/policy.py `Refresher`:
shared by the three services, at most one every MIN_REFRESH_S), then the rule is checked
again. A driver that joined a moment ago is thus not refused, and a stranger cannot make the
peer hammer the coordinator.

Pure where it can be: `decide` is a function of (caller, request, receiver, view) and raises
`Denied`; the tests (tests/peer/test_authz.py) check the table rule by rule.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from protocols import auth
from protocols import shoal_pb2 as pb
from protocols.coordinator_client import SwarmView

log = logging.getLogger("shoal.authz")

MIN_REFRESH_S = 0.5  # at most ~2 view refreshes a second, for all callers together
REFRESH_TIMEOUT_S = 3.0
DEPARTED = ("lost", "left")
INFERENCE = "inference"  # the Forward meta "mode" of an inference call (no graph kept)
#: how far behind its own step a replica still takes a sync part (a late part gets the result)
ROUND_LAG = 4
#: a request for a finished round's aggregate (meta "replay": a laggard catching up) may name a
#: round this far back: peer/sync/rounds.py's KEEP_ROUNDS
REPLAY_LAG = 32
#: an EndStep may name a step this far beyond the attested swarm step + 1 (the attestation
#: trails a fast swarm by its heartbeats): the receiver then re-downloads its stage from its
#: replicas instead of adopting the step (peer/step_barrier.py); beyond it, INVALID_ARGUMENT
END_SLACK = 64
#: how far the attested swarm step trails the drivers: a few heartbeats (the replicas' reports,
#: then the coordinator's view) and the view refresh (`StepRate` turns it into steps)
LAG_HEARTBEATS = 3
LAG_EXTRA_S = 2.0

# the methods, as the rules name them
FORWARD, INFER, BACKWARD, END_STEP, EXCHANGE, DOWNLOAD, DELIVER = (
    "Stage.Forward", "Stage.Forward(inference)", "Stage.Backward", "Stage.EndStep",
    "Sync.Exchange", "State.Download", "Stage.Deliver")

# who may call: "stage0" (live stage-0 replicas), "same_stage" (live replicas of the receiver's
# stage), "block" (live replicas of any block stage), "member" (any admitted identity: peers,
# observers, the coordinator). A peer-to-peer Forward or Backward (meta hops = "p2p",
# peer/pipeline/p2p.py) may also come from the replica before or after the receiver on its
# route: `check_route`.
# steps: "next" (the receiver's next step, or a bounded jump), "end" (not beyond the swarm),
# "round" (near the receiver's own), "" (no step)
RULES: dict[str, tuple[str, str]] = {
    FORWARD: ("stage0", "next"),
    INFER: ("member", ""),
    BACKWARD: ("stage0", "next"),
    END_STEP: ("stage0", "end"),
    EXCHANGE: ("same_stage", "round"),
    DOWNLOAD: ("member", ""),
    DELIVER: ("block", ""),
}


class Denied(Exception):
    """A refused call: `code` (a grpc.StatusCode) and a message saying what the caller should
    do. `stale`: the receiver's view may be what refuses it (a refresh could change that)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stale = stale


@dataclass(frozen=True)
class Receiver:
    """What the rules need of the receiving peer: its stage and step (None before it holds one),
    its last swarm view, and `lead`: how many steps a driver may be ahead of the attested swarm
    step by now (the attestation trails a fast swarm by its heartbeats; `StepRate`)."""

    stage: int | None
    step: int | None
    view: SwarmView | None
    lead: int = 0

    def jump_bound(self) -> int:
        """The furthest step a microbatch may take this replica to (the attested swarm step + 1,
        plus the lead the attestation's lag allows)."""
        return attested_swarm_step(self.view) + 1 + self.lead


class StepRate:
    """How fast the attested swarm step moves, from the views this peer refreshed: the lead a driver
    may have over the attestation is (steps per second) x (the attestation's lag). A liar can
    then push a replica at most as far as the honest drivers get within that lag, and never
    while the swarm stands still."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._samples: list[tuple[float, int]] = []

    def note(self, step: int, now: float) -> None:
        if not self._samples or self._samples[-1][1] != step:
            self._samples.append((now, step))
        self._samples = [x for x in self._samples if now - x[0] <= self.WINDOW_S][-64:]

    def per_s(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return max(0.0, (s1 - s0) / (t1 - t0)) if t1 - t0 >= 0.5 else 0.0


def method_of(service_method: str, header: pb.CallHeader | None) -> str:
    """The rule's name of a call: Forward splits into training and inference by meta mode."""
    if service_method == FORWARD and header is not None and header.meta.get("mode") == INFERENCE:
        return INFER
    return service_method


def holds(view: SwarmView | None, peer_id: str, stage: int) -> bool:
    """Whether the view lists `peer_id` at `stage`, not revoked and not departed."""
    if view is None or peer_id in view.revoked:
        return False
    p = view.peer(peer_id)
    return p is not None and p.stage == stage and p.state not in DEPARTED


def attested_swarm_step(view: SwarmView | None) -> int:
    """The swarm's step as the coordinator attests it: stage 0's attested step when the view
    carries one, else stage 0's step (0 without a view)."""
    for s in view.stages if view is not None else ():
        if s.stage == 0:
            return int(getattr(s, "attested_step", 0) or 0) or int(s.step)
    return 0


def short_id(peer_id: str) -> str:
    return peer_id[:12]


def bind_sender(caller: str, named: str, what: str) -> str:
    """The sender a message may name: the caller (empty is the caller); anything else is
    refused."""
    if named and named != caller:
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{what} names sender {short_id(named)} but the call is signed by "
                     f"{short_id(caller)}: a peer sends only as itself (leave it empty or set it "
                     "to your own peer id)")
    return caller


def check_caller(rule: str, caller: auth.Caller, receiver: Receiver, method: str) -> None:
    who = RULES[rule][0]
    if who == "member":
        return
    if who == "block":
        p = receiver.view.peer(caller.peer_id) if receiver.view is not None else None
        stage = p.stage if p is not None and p.stage > 0 else 1
    else:
        stage = 0 if who == "stage0" else receiver.stage
    if stage is None:
        raise Denied(grpc.StatusCode.UNAVAILABLE,
                     f"{method}: this peer holds no stage yet; retry on another replica")
    role = caller.role
    what = ("a stage-0 replica (a driver)" if who == "stage0" else "a block replica"
            if who == "block" else f"a replica of stage {stage}")
    if role not in ("peer", ""):
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{method} is only for {what}; an {role or 'unknown'} identity "
                     f"({short_id(caller.peer_id)}) may only download state or run inference "
                     "forwards")
    if not holds(receiver.view, caller.peer_id, stage):
        p = receiver.view.peer(caller.peer_id) if receiver.view is not None else None
        where = (f"listed at stage {p.stage} ({p.state})" if p is not None
                 else "not in this peer's swarm view")
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{method} is only for {what}; peer {short_id(caller.peer_id)} is {where}. "
                     "Join (or wait to be assigned) that stage first", stale=True)


def check_route(rule: str, caller: auth.Caller, receiver: Receiver, header: pb.CallHeader,
                method: str) -> None:
    """A peer-to-peer Forward or Backward: from the route's origin (a live stage-0 replica
    that names itself), or from a live replica of the stage before (forward) or after
    (backward) the receiver's hop on the header's path, for an origin that is a live stage-0
    replica."""
    origin, hop, path = header.meta.get("origin", ""), int(header.hop), list(header.path)
    if not 0 <= hop < len(path) or path[hop] != header.stage:
        raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                     f"{method}: hop {hop} of path {path[:16]} is not stage {header.stage}")
    if not holds(receiver.view, origin, 0):
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{method}: the route's origin {short_id(origin) or '(none)'} is not a live "
                     "stage-0 replica in this peer's view", stale=True)
    if caller.peer_id == origin and (hop == 0 or rule == BACKWARD):
        return
    if rule == FORWARD:
        stage = path[hop - 1] if hop > 0 else 0
    else:
        stage = path[hop + 1] if hop + 1 < len(path) else 0
    if caller.role not in ("peer", "") or not holds(receiver.view, caller.peer_id, stage):
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{method} at hop {hop} of its route is only for a replica of stage "
                     f"{stage}; {short_id(caller.peer_id)} is not one in this peer's view",
                     stale=True)


def check_stage(rule: str, stage: int, receiver: Receiver, method: str) -> None:
    """A forward, a backward or a sync part is for the receiver's own stage."""
    if rule not in (FORWARD, INFER, BACKWARD, EXCHANGE) or receiver.stage is None:
        return  # Download answers FAILED_PRECONDITION itself; EndStep names no stage
    if stage != receiver.stage:
        raise Denied(grpc.StatusCode.UNAVAILABLE,
                     f"{method} for stage {stage}, but this peer holds stage {receiver.stage}: "
                     "refresh your swarm view and send it to a replica of that stage")


def check_step(rule: str, step: int, receiver: Receiver, method: str,
               replay: bool = False) -> None:
    kind = RULES[rule][1]
    mine = receiver.step
    if not kind or mine is None:
        return
    bound = receiver.jump_bound()
    if kind == "next":
        if step == mine + 1:
            return
        if step <= mine:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{method} of step {step}, but this replica is already after step "
                         f"{mine}: send microbatches of step {mine + 1} only")
        if step > bound:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{method} of step {step}, but this replica is after step {mine} and "
                         f"the swarm's attested step is {bound - 1}: a microbatch is for the "
                         "next step, or at most the swarm's step + 1", stale=True)
    elif kind == "end":
        if step > mine + 1 and step > bound + END_SLACK:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{method} of step {step}, but this replica is after step {mine} and "
                         f"the swarm's attested step is {bound - 1}: end the step you drove, "
                         "never one beyond the swarm", stale=True)
    elif kind == "round":
        high = max(mine + 2, bound)
        lag = REPLAY_LAG if replay else ROUND_LAG
        if not mine - lag <= step <= high:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{method} for round {step}, but this replica is after step {mine}: "
                         f"it takes parts for rounds {max(0, mine - lag)}..{high} only")


def check_step_end_lists(request: pb.StepEnd, receiver: Receiver) -> None:
    """The replica lists of an EndStep name only members of the right stages (stage0_replicas:
    stage 0; stage_replicas: the receiver's stage): a receiver waits for the ones it names, so
    an invented name would hold it up to the sync timeout."""
    view = receiver.view
    lists = [("stage0_replicas", 0, request.stage0_replicas)]
    if receiver.stage is not None:
        lists.append(("stage_replicas", receiver.stage, request.stage_replicas))
    limit = len(view.peers) if view is not None else 0
    for name, stage, pids in lists:
        if len(pids) > limit:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                         f"EndStep.{name} names {len(pids)} peers, more than the swarm's "
                         f"{limit}: list the live replicas of stage {stage} only", stale=True)
        bad = [p for p in pids if not _member_of(view, p, stage)]
        if bad:
            raise Denied(grpc.StatusCode.INVALID_ARGUMENT,
                         f"EndStep.{name} names {', '.join(short_id(p) for p in bad[:3])}, not "
                         f"replicas of stage {stage} in this peer's swarm view: list the live "
                         "replicas of that stage from your view only", stale=True)


def _member_of(view: SwarmView | None, peer_id: str, stage: int) -> bool:
    """Listed at `stage` in the view, in any state (a replica that just left or was lost still
    ended the step it was listed for; the receiver stops waiting for departed ones)."""
    p = view.peer(peer_id) if view is not None else None
    return p is not None and p.stage == stage


def decide(rule: str, caller: auth.Caller | None, receiver: Receiver, *,
           header: pb.CallHeader | None = None, step_end: pb.StepEnd | None = None) -> str:
    """Apply the rule `rule` (a key of RULES) to one call; returns the sender to use (the caller)
    and fills an empty CallHeader.sender / StepEnd.sender with it. Raises Denied."""
    method = rule.split("(")[0]
    if caller is None:
        raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                     f"{method}: the call carries no verified identity; sign it "
                     "(protocols.auth.client_interceptors)")
    if header is not None:
        header.sender = bind_sender(caller.peer_id, header.sender, f"{method}'s CallHeader")
    if step_end is not None:
        step_end.sender = bind_sender(caller.peer_id, step_end.sender, "EndStep")
    if header is not None and rule in (FORWARD, BACKWARD) and header.meta.get("hops") == "p2p":
        check_route(rule, caller, receiver, header, method)
    else:
        check_caller(rule, caller, receiver, method)
    if header is not None:
        check_stage(rule, header.stage, receiver, method)
        check_step(rule, header.step, receiver, method,
                   replay=header.meta.get("replay") == "1")
    if step_end is not None:
        check_step(rule, step_end.step, receiver, method)
        check_step_end_lists(step_end, receiver)
    return caller.peer_id


def departed_senders(view: SwarmView | None, owners: Iterable[str]) -> set[str]:
    """Of `owners` (senders of pending graphs), those the view says are gone: departed,
    revoked, or no longer listed."""
    if view is None:
        return set()
    out = set()
    for o in owners:
        p = view.peer(o)
        if not o:
            continue
        if p is None or p.state in DEPARTED or o in view.revoked:
            out.add(o)
    return out
