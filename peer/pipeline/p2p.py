"""Peer-to-peer hops (`pipeline.hops = "p2p"`, issue #15): a microbatch's activations go from
block replica to block replica instead of back through stage 0 after every stage.

Forward. The stage-0 driver sends the embedding to a replica of its route's first block stage
(header meta `hops` = "p2p", `origin` = the driver). That replica computes and keeps the graph,
then sends its output to a replica of the route's next stage, chosen by its own `Router` (the
SWARM estimates of its own calls; the SkipPipe plan's replica first, from meta `plan`, while it
is usable). The replica that ends the route hands the last activation to the origin with
`Stage.Deliver`, naming the replicas the route took (meta `taken`, grown hop by hop), and the
driver goes on as soon as it lands. Every Forward also answers its caller, with a header-only
ack once everything after it is done (off the critical path: the driver does not wait for
them); an ack says how long the hops after the callee took (`after_s`), so each sender's router
records only the callee's own share.

Backward. The driver sends the head's gradient to the replica that ended the route. Each
replica backpropagates and sends its input gradient to the replica its forward came from (the
graph's owner); the route's first block replica delivers it to the origin. A graph's backward is
taken from its owner or from a peer its output was sent to (`Pending.backers`: the next stage's
replicas it tried, marked before each send, or the origin at the end of the route), nobody
else.

Failures. A next hop that fails is retried on other replicas of that stage by the replica that
sends it (its router bans or slows the failing one, as the driver's does), and a stage with no
usable replica that has trained is bypassed (left out of the route), as the driver does. When no
replica of the next stage answers, the sender aborts its own call with ABORTED "downstream: ...":
its caller does not hold that against it (it answered), passes it on, and the driver drops and
counts the microbatch. A backward hop cannot go elsewhere (the graph is there); its failure comes
back the same way. Each nested call's deadline is the time its caller's call has left, so the
driver's timeout bounds the whole route.

Stays hub-shaped: SPSA's paired streams (the driver compares them; the run spec refuses p2p with
SPSA) and inference.

Bytes: with 2 block stages a microbatch crosses the network 8 times through the hub (4 forward,
4 backward, all on the driver's link) and 6 times peer to peer, 4 of them on the driver's link.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import secrets
import time
from dataclasses import dataclass, field

import torch

from peer.pipeline import stalls, wire
from peer.pipeline.hops import (
    AFTER_S,
    DOWNSTREAM,
    Downstream,
    HopCalls,
    MicrobatchDropped,
    StageEmpty,
)
from peer.pipeline.links import LinkEstimates
from peer.pipeline.router import RoundRobinRouter, Router
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg

log = logging.getLogger("shoal.p2p")
P2P = "p2p"
#: header meta of a p2p call: the mode, the stage-0 peer that owns the microbatch, the plan's
#: replica per stage of the path (comma-separated, "" where it has none), the replicas the route
#: took so far (comma-separated "stage:peer"), and the microbatch's nonce: a secret the driver
#: draws per microbatch that only the replicas on its route see, and a delivery must carry
HOPS, ORIGIN, PLAN, TAKEN, NONCE = "hops", "origin", "plan", "taken", "nonce"
#: a nested call leaves its caller this much of the caller's deadline to answer in
MARGIN_S = 0.25
#: a replica re-reads its view for its router at most this often when the view object is the
#: same (heartbeats apply deltas in place); it asks the coordinator for one, for at most
#: VIEW_RETRY_S, when the next stage has no usable replica in it
VIEW_READ_S = 1.0
VIEW_RETRY_S = 2.0


def is_p2p(header: pb.CallHeader) -> bool:
    return header.meta.get(HOPS) == P2P


def format_taken(taken: list[tuple[int, str]]) -> str:
    return ",".join(f"{s}:{p}" for s, p in taken)


def parse_taken(text: str) -> list[tuple[int, str]]:
    """The replicas a route took, from an ack's or a delivery's meta; ValueError when malformed."""
    out = []
    for part in filter(None, text.split(",")):
        stage, _, peer = part.partition(":")
        if not peer or not stage.isdigit():
            raise ValueError(f"malformed route entry {part[:40]!r}")
        out.append((int(stage), peer))
    return out


class NotExpected(LookupError):
    """A delivery for a microbatch this peer is not waiting for, or from a peer it does not
    expect it from."""


@dataclass
class _Waiting:
    future: asyncio.Future
    nonce: str  # what the delivery must carry (the replicas on the route know it)
    senders: frozenset[str] | None  # who may deliver it (None: any block replica)
    stages: frozenset[int] = field(default_factory=frozenset)  # ... of these stages


class Inbox:
    """The deliveries a stage-0 driver waits for: (microbatch id, "forward" | "backward") to a
    future that `Stage.Deliver` resolves (peer/services.py). Used on the event loop only."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], _Waiting] = {}

    def expect(self, mb_id: str, kind: str, nonce: str, senders: frozenset[str] | None = None,
               stages: frozenset[int] = frozenset()) -> asyncio.Future:
        w = _Waiting(asyncio.get_running_loop().create_future(), nonce, senders, stages)
        self._waiting[(mb_id, kind)] = w
        return w.future

    def check(self, mb_id: str, kind: str, sender: str, sender_stage: int,
              nonce: str) -> None:
        """Raise NotExpected unless this delivery is awaited, from `sender` (of
        `sender_stage`), with the microbatch's nonce (a peer off its route cannot know it)."""
        w = self._waiting.get((mb_id, kind))
        if w is None or w.future.done():
            raise NotExpected(f"no {kind} delivery of microbatch {mb_id[:40]} is awaited here")
        if not hmac.compare_digest(w.nonce.encode(), nonce.encode()):
            raise NotExpected(f"the {kind} of microbatch {mb_id[:40]} carries the wrong nonce: "
                              "only a replica on its route may deliver it")
        if w.senders is not None and sender not in w.senders:
            raise NotExpected(f"the {kind} of microbatch {mb_id[:40]} is awaited from another "
                              "replica")
        if w.stages and sender_stage not in w.stages:
            raise NotExpected(f"the {kind} of microbatch {mb_id[:40]} is awaited from a replica "
                              f"of stage {sorted(w.stages)}, not {sender_stage}")

    def deliver(self, mb_id: str, kind: str, sender: str, sender_stage: int, nonce: str,
                x: torch.Tensor, taken: list[tuple[int, str]]) -> None:
        """Resolve the awaited delivery with (x, sender, taken); NotExpected as `check`."""
        self.check(mb_id, kind, sender, sender_stage, nonce)
        self._waiting[(mb_id, kind)].future.set_result((x, sender, taken))

    def drop(self, mb_id: str, kind: str) -> None:
        w = self._waiting.pop((mb_id, kind), None)
        if w is not None and not w.future.done():
            w.future.cancel()

    def __len__(self) -> int:
        return len(self._waiting)


class P2PRoutes:
    """The driver's side (a mixin of `Driver`, beside `HopCalls`): one microbatch's forward over
    its route and its backward, peer to peer (see the module docstring). Uses the driver's `d`,
    `router` and `inbox`. The driver goes on as soon as a delivery lands; the call that started
    the route ends (with the acks) in the background."""

    inbox: Inbox
    _acks: set[asyncio.Task]  # route calls whose acks are still out
    _nonces: dict[str, str]  # microbatch id -> its nonce, from its forward to its backward

    async def _start_and_await(self: HopCalls, call, fut: asyncio.Future, what: str):
        """Run the route's first call beside the delivery it should bring: the delivery's
        result, or the call's failure (StageEmpty, Downstream, ...) when it fails first."""
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task, fut}, return_when=asyncio.FIRST_COMPLETED)
        if fut not in done:
            task.result()  # raises the call's failure
            try:  # answered: the delivery came before the ack
                return await asyncio.wait_for(fut, MARGIN_S * 8)
            except TimeoutError:
                raise MicrobatchDropped(f"{what}: the route answered but nothing was "
                                        "delivered") from None
        self._acks.add(task)  # kept until its acks come back (the loop holds tasks weakly)
        task.add_done_callback(_ack_done(self._acks, what))
        return fut.result()

    async def route_forward(self: HopCalls, step: int, mb_id: str, planned: list[tuple[int, str]],
                            h: torch.Tensor, has_trained) -> tuple[torch.Tensor, list[int],
                                                                   list[tuple[int, str]]]:
        """Send `h` into the route; returns the last activation, the path (less the stages
        bypassed) and the replicas taken. A first stage with no usable replica is bypassed as the
        hub does; the rest bypass their next stages themselves."""
        d = self.d
        path = [s for s, _ in planned]
        plan = ",".join(p for _, p in planned) if d.spec.pipeline.skip_ratio > 0 else ""
        nonce = secrets.token_hex(16)
        while path:
            meta = {HOPS: P2P, ORIGIN: d.peer_id, PLAN: plan, NONCE: nonce}
            fut = self.inbox.expect(mb_id, "forward", nonce, stages=frozenset(path))
            call = self._call_hop("forward", path[0], step, mb_id, path, 0, h, meta=meta,
                                  prefer=planned[len(planned) - len(path)][1] if plan else None,
                                  hops_left=len(path) + 1)
            try:
                x, sender, taken = await self._start_and_await(call, fut, f"microbatch {mb_id}")
                if not taken or taken[-1][1] != sender:
                    raise MicrobatchDropped(
                        f"microbatch {mb_id}: its last activation came from {sender[:8]}, not "
                        "from the replica its route names last")
                self._nonces[mb_id] = nonce  # the backward carries it too
                return x, [s for s, _ in taken], taken
            except StageEmpty:
                if not has_trained(path[0]):
                    raise
                self.bypassed_hops += 1
                self._bypassed.add(path[0])
                path.pop(0)
                plan = ",".join(plan.split(",")[1:]) if plan else ""
            finally:
                self.inbox.drop(mb_id, "forward")
        return h, [], []

    async def route_backward(self: HopCalls, step: int, mb_id: str, path: list[int],
                             taken: list[tuple[int, str]], g: torch.Tensor) -> torch.Tensor:
        """Send the head's gradient to the route's last replica; returns the gradient the
        route's first replica delivers (only it may: `Inbox.expect`)."""
        nonce = self._nonces.pop(mb_id, "")
        if not taken:
            return g
        fut = self.inbox.expect(mb_id, "backward", nonce, senders=frozenset({taken[0][1]}))
        last_stage, last = taken[-1]
        call = self._call_hop("backward", last_stage, step, mb_id, path, len(taken) - 1, g,
                              peer=last, meta={HOPS: P2P, ORIGIN: self.d.peer_id, NONCE: nonce},
                              hops_left=len(taken) + 1)
        try:
            x, _, _ = await self._start_and_await(call, fut, f"microbatch {mb_id}'s backward")
            return x
        finally:
            self.inbox.drop(mb_id, "backward")


def _ack_done(acks: set[asyncio.Task], what: str):
    def done(task: asyncio.Task) -> None:
        acks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s: delivered, then its route's ack failed: %s", what, task.exception())
    return done


class Forwarder(HopCalls):
    """A block replica's side: its own router over the next stages' replicas, and the calls
    that pass a microbatch on (see the module docstring). One per peer (peer/services.py);
    `ctx` is the peer as services see it."""

    def __init__(self, ctx) -> None:
        self.d = ctx
        rng = random.Random(int(ctx.peer_id, 16) ^ 0x5EED)
        # `shoal peer --router round_robin` (the benches' baseline) holds for its hops too
        kind = getattr(getattr(ctx, "args", None), "router", "swarm")
        self.router = RoundRobinRouter(rng=rng) if kind == "round_robin" else Router(rng=rng)
        self.links = LinkEstimates()
        self.stalls = stalls.WATCH
        self._view, self._read_at = None, -1e18
        self._asking: asyncio.Future | None = None

    def _refresh(self, force: bool = False) -> None:
        """The router's replicas from the peer's view, when the view changed (heartbeats may
        update it in place: then at most every VIEW_READ_S)."""
        view, now = self.d.view, time.monotonic()
        if view is None or (view is self._view and now - self._read_at < VIEW_READ_S
                            and not force):
            return
        self._view, self._read_at = view, now
        self.read_replicas()

    async def _ask_view(self) -> bool:
        """A fresh view from the coordinator (one request at a time, shared by the calls that
        want it); whether one came."""
        if self._asking is None or self._asking.done():
            self._asking = asyncio.ensure_future(self.d.refresh_view(retry_s=VIEW_RETRY_S))
        try:
            await asyncio.shield(self._asking)
        except Exception as exc:  # the coordinator away: go on with the view held
            log.debug("view refresh for a p2p hop failed: %s", exc)
            return False
        self._refresh(force=True)
        return True

    def _trained(self, stage: int) -> bool:
        return bool(self.d.stage_info(stage, "step"))

    async def pass_forward(self, header: pb.CallHeader, y: torch.Tensor,
                           time_left: float | None) -> dict[str, str]:
        """After this replica's forward of `header`'s microbatch: send `y` to the next stage of
        the route, or deliver it to the origin at the route's end; the peer it goes to may then
        send the graph's backward (`StageHost.handed_to`, before the send). Returns the ack's
        meta; raises Downstream when no replica of the next stage takes it."""
        self._refresh()
        origin = header.meta.get(ORIGIN, "")
        path, hop = list(header.path), int(header.hop)
        plan = header.meta.get(PLAN, "").split(",") if header.meta.get(PLAN) else []
        try:  # the replicas before this one, then this one
            taken = [*parse_taken(header.meta.get(TAKEN, "")),
                     (int(header.stage), self.d.peer_id)]
        except ValueError as exc:
            raise Downstream(f"{DOWNSTREAM}{exc}") from exc
        host, mb_id = self.d.host, header.microbatch_id
        t0, asked = time.monotonic(), False
        while hop + 1 < len(path):
            nxt = path[hop + 1]
            prefer = plan[hop + 1] if hop + 1 < len(plan) and plan[hop + 1] else None
            try:
                await self._call_hop(
                    "forward", nxt, int(header.step), mb_id, path, hop + 1, y,
                    meta={HOPS: P2P, ORIGIN: origin, PLAN: ",".join(plan),
                          TAKEN: format_taken(taken), NONCE: header.meta.get(NONCE, "")},
                    prefer=prefer,
                    hops_left=len(path) - hop, time_left=_left(time_left),
                    on_target=lambda target: host.handed_to(mb_id, target))
            except StageEmpty as exc:
                if not asked and await self._ask_view():
                    asked = True  # this peer's view may lag the driver's: once more on a fresh one
                    continue
                if not self._trained(nxt):
                    raise Downstream(f"{DOWNSTREAM}{exc}") from exc
                path.pop(hop + 1)  # bypassed: no usable replica of a stage that has trained
                if plan:
                    plan.pop(hop + 1)
                continue
            except MicrobatchDropped as exc:
                raise Downstream(exc.args[0] if str(exc).startswith(DOWNSTREAM)
                                 else f"{DOWNSTREAM}{exc}") from exc
            return {AFTER_S: f"{time.monotonic() - t0:.6f}"}
        host.handed_to(mb_id, origin)
        await self.deliver(origin, "forward", header, y, time_left, taken)
        return {AFTER_S: f"{time.monotonic() - t0:.6f}"}

    async def pass_backward(self, header: pb.CallHeader, g: torch.Tensor, upstream: str,
                            time_left: float | None) -> dict[str, str]:
        """After this replica's backward: send the input gradient `g` to the replica the
        forward came from (`upstream`), or deliver it to the origin when that was the origin."""
        origin = header.meta.get(ORIGIN, "")
        t0 = time.monotonic()
        if upstream == origin:
            await self.deliver(origin, "backward", header, g, time_left)
        else:
            self._refresh()
            hop = int(header.hop)
            stage = int(header.path[hop - 1]) if 0 < hop <= len(header.path) else -1
            try:
                await self._call_hop("backward", stage, int(header.step), header.microbatch_id,
                                     list(header.path), hop - 1, g, peer=upstream,
                                     meta={HOPS: P2P, ORIGIN: origin,
                                           NONCE: header.meta.get(NONCE, "")},
                                     hops_left=hop + 1,
                                     time_left=_left(time_left))
            except MicrobatchDropped as exc:
                raise Downstream(exc.args[0] if str(exc).startswith(DOWNSTREAM)
                                 else f"{DOWNSTREAM}{exc}") from exc
        return {AFTER_S: f"{time.monotonic() - t0:.6f}"}

    async def deliver(self, origin: str, kind: str, header: pb.CallHeader, x: torch.Tensor,
                      time_left: float | None, taken: list[tuple[int, str]] = ()) -> None:
        """Hand `x` to the microbatch's origin (Stage.Deliver); Downstream when it fails."""
        d = self.d
        out = pb.CallHeader(kind=kind, microbatch_id=header.microbatch_id, step=header.step,
                            stage=d.host.stage if d.host is not None else header.stage,
                            sender=d.peer_id, sent_at=time.time())
        out.meta[NONCE] = header.meta.get(NONCE, "")
        if taken:
            out.meta[TAKEN] = format_taken(taken)
        chunks = wire.encode_chunks(out, {"x": x.float().numpy()},
                                    wire.ACTIVATION_ENCODINGS[d.spec.pipeline.activations])
        left = _left(time_left)
        try:
            stub = pbg.StageStub(d.channel(d.address_of(origin)))
            await stub.Deliver(wire.send_iter(chunks, d.counter, "activations"),
                               timeout=left if left is not None else 30.0)
        except KeyError as exc:
            raise Downstream(f"{DOWNSTREAM}origin {origin[:8]} is not in this peer's view") \
                from exc
        except Exception as exc:  # grpc.aio.AioRpcError, a dead origin
            code = getattr(exc, "code", lambda: None)()
            if code is not None:
                self.d.unreachable.note_error(origin, exc)
            raise Downstream(f"{DOWNSTREAM}delivery to {origin[:8]} failed: "
                             f"{code.name if code is not None else exc}") from exc


def _left(time_left: float | None) -> float | None:
    """What a nested call may take of its caller's `time_left` (None: no deadline)."""
    return None if time_left is None else max(0.0, time_left - MARGIN_S)
