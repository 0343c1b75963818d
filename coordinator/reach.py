"""Reachability: the address a member is registered at, and whether it can be dialled there.

A peer behind a router or firewall can dial out but nobody can dial in; it learns that only if
someone tries. Three pieces, used by coordinator/service.py:

- `observed_address`: a Join (or an address announced by heartbeat) may leave the host empty
  (":PORT"); the coordinator fills in the host it saw the call come from, as STUN does, and
  the usual address checks (coordinator/messages.check_address) then apply to the result.
- `ReachChecker`: after a member joins or announces a new address, the coordinator calls
  Reach.Ping on that address with a fresh nonce (protocols/reach.py) and checks that the answer
  is signed by the member's identity key. Off the Join path (one asyncio task per member, at
  most MAX_PENDING of them, at most MAX_IN_FLIGHT calls out at once), retried with back-off
  until DEADLINE_S (the peer may not have read its Join reply yet), then reported once through
  `on_result`.
  With TLS the call is mTLS like a peer's (protocols.tls.peer_channel): the callee must present
  its leaf, and the coordinator presents a leaf its own CA issued to itself (CN = the
  coordinator's id, the key that signs the call); the peer admits it because the call is signed
  by the coordinator's key (protocols.auth: the issuer vouches for itself) and its Reach service
  answers nobody else (peer/reach.py).
- `pick_relay`: which relay an unreachable member is told to use: the least loaded of the
  coordinator's own Relay service and the members started with --relay that were reached
  directly; a member keeps its relay while it is still offered.

`Reachability` ties them to the membership for the service: announced addresses, when to dial,
the reach each result means (PeerInfo.reach; a change moves the epoch), the relay to name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from coordinator.ca import CoordinatorCA
from coordinator.membership import Member, Membership
from coordinator.messages import BadRequest, check_address, is_loopback_peer
from protocols import reach as reach_wire
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols import tls
from protocols.auth import CallSigner, client_interceptors
from protocols.identity import Identity, verify_signature

log = logging.getLogger("shoal.coordinator")

# one dial-back, all attempts together: long enough for a peer whose event loop is busy
# building its stage on a loaded machine (seconds, measured on 2 shared cores)
DEADLINE_S = 20.0
ATTEMPT_S = 4.0  # one attempt (connect, TLS, the call)
FIRST_DELAY_S = 0.3  # the peer reads its Join reply (coordinator key, TLS leaf) meanwhile
MAX_IN_FLIGHT = 16
MAX_PENDING = 1024
REFUSED_ATTEMPTS = 2  # connection refused this often: nothing listens, stop early
# connection closed before an answer this often (refused, reset, or a socket closed during the
# handshake: what a NAT or a firewall that rejects gives, and a lab host's delay relay that finds
# nothing behind it): stop early too. Timeouts (a busy peer) keep being retried.
CLOSED_ATTEMPTS = 3
_CLOSED = ("connection refused", "socket closed", "connection reset")
# an unreachable or relayed member is dialled again this often (it may have opened its port
# since; its relay may have failed)
RECHECK_UNREACHABLE_S = 120.0
# a relayed member whose relay is no longer offered (it left, or stopped relaying) is dialled
# again at once, at most this often: a failure names it another relay
RECHECK_RELAY_GONE_S = 30.0
# a member that was relayed by a peer's relay announces its direct address again: that relay
# failed it (peer/relayed.py LOST_AFTER_FAILURES). It is not offered to anyone for this long,
# though its own lease may still run for a while (a killed relay peer lives until it lapses)
LOST_RELAY_S = 30.0
_LEAF_RENEW_S = 86400.0


def observed_address(address: str, grpc_peer: str) -> str:
    """`address`, its empty host (":PORT") filled with the host of `grpc_peer` (a gRPC
    `context.peer()`: "ipv4:10.0.0.5:40312", "ipv6:[2001:db8::5]:40312", percent-encoded
    forms too). Other addresses come back unchanged; BadRequest when the host is empty and the
    caller's host cannot be seen (a unix socket, a proxy)."""
    if not address.startswith(":"):
        return address
    kind, _, rest = urllib.parse.unquote(grpc_peer).partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else ""
    host = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(f"address {address!r:.40} leaves the host to the coordinator, but it "
                         f"cannot see where this call came from ({grpc_peer!r:.60}); pass "
                         f"--advertise HOST") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    host = str(ip) if ip.version == 4 else f"[{ip}]"
    return host + address


@dataclass(frozen=True, slots=True)
class Outcome:
    """One dial-back's result: reached (the member answered, signed), and what happened."""

    reached: bool
    detail: str


class ReachChecker:
    """Dials members back (see the module docstring). Use on one event loop.

    Args:
        identity: the coordinator's key; it signs the Ping calls.
        ca: the swarm CA (coordinator/ca.py), or None; needed to dial members over mTLS.
        on_result: called on the event loop once per finished check with (peer_id, address,
            outcome); not called for a check that a newer one for the same member replaced.
    """

    def __init__(self, identity: Identity, ca: Callable[[], CoordinatorCA | None],
                 on_result: Callable[[str, str, Outcome], None], *,
                 deadline_s: float = DEADLINE_S, max_in_flight: int = MAX_IN_FLIGHT,
                 max_pending: int = MAX_PENDING) -> None:
        self.identity = identity
        self._ca = ca
        self._on_result = on_result
        self.deadline_s = deadline_s
        self.max_pending = max_pending
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: dict[str, asyncio.Task] = {}
        self._leaf: tls.PeerTls | None = None
        self._leaf_until = 0.0
        self._signer = CallSigner(identity, lambda: None)  # no certificate: the issuer's key

    def pending(self, peer_id: str) -> bool:
        return peer_id in self._tasks

    def check(self, peer_id: str, public_key: bytes, address: str, use_tls: bool) -> bool:
        """Start dialling `peer_id` back at `address` (replacing a check of it still running);
        returns immediately. False when MAX_PENDING checks already wait: nothing is started
        (the caller may try again later)."""
        old = self._tasks.pop(peer_id, None)
        if old is not None:
            old.cancel()
        if len(self._tasks) >= self.max_pending:
            return False
        task = asyncio.ensure_future(self._run(peer_id, public_key, address, use_tls))
        self._tasks[peer_id] = task
        task.add_done_callback(lambda t, p=peer_id: self._done(p, t))
        return True

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, peer_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(peer_id) is task:
            del self._tasks[peer_id]

    async def _run(self, peer_id: str, public_key: bytes, address: str, use_tls: bool) -> None:
        outcome = await self.dial(peer_id, public_key, address, use_tls)
        if self._tasks.get(peer_id) is asyncio.current_task():
            try:
                self._on_result(peer_id, address, outcome)
            except Exception:  # a bug in the callback must not end in an unretrieved task
                log.exception("recording the reach of peer %s failed", peer_id)

    async def dial(self, peer_id: str, public_key: bytes, address: str, use_tls: bool
                   ) -> Outcome:
        """Ping `peer_id` at `address` until it answers or DEADLINE_S passed. An answer whose
        signature is not the member's fails at once: something else listens there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        delay, attempts, refused, closed, last = FIRST_DELAY_S, 0, 0, 0, "no attempt"
        how = "mTLS" if use_tls else "plaintext"
        while True:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            left = deadline - loop.time()
            if left <= 0.05:
                break
            attempts += 1
            nonce = secrets.token_bytes(reach_wire.NONCE_BYTES)
            try:
                async with self._slots:  # waiting between attempts holds no slot
                    pong = await self._ping(peer_id, address, use_tls, nonce,
                                            max(0.05, min(ATTEMPT_S, deadline - loop.time())))
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # another peer answers there
                    return Outcome(False, f"{address} ({how}) answered for another peer: {last}")
                # refused: nothing listens (the peer listens before it joins); once more in case
                # of a restart, then stop (a swarm of such members must not cost many dials)
                refused += "connection refused" in last.lower()
                closed += exc.code() == grpc.StatusCode.UNAVAILABLE and any(
                    c in last.lower() for c in _CLOSED)
                if refused >= REFUSED_ATTEMPTS or closed >= CLOSED_ATTEMPTS:
                    break
            except (ValueError, OSError) as exc:
                last = str(exc)
            else:
                if bytes(pong.nonce) == nonce and verify_signature(
                        public_key, bytes(pong.signature), reach_wire.payload(nonce, peer_id)):
                    return Outcome(True, f"answered a signed ping at {address} ({how})")
                return Outcome(False, f"something answered at {address} ({how}) but not with "
                                      f"peer {peer_id}'s signature over the nonce")
            delay = min(delay * 2, 4.0)
        return Outcome(False, f"no answer from {address} ({how}), {attempts} attempts in "
                              f"{self.deadline_s - max(0.0, deadline - loop.time()):.0f} s; "
                              f"last: {last}")

    async def _ping(self, peer_id: str, address: str, use_tls: bool, nonce: bytes,
                    timeout: float) -> pb.ReachPong:
        interceptors = client_interceptors(self._signer)
        if use_tls:
            channel = grpc.aio.secure_channel(
                address, self._client_tls().channel_credentials(),
                options=[("grpc.ssl_target_name_override", peer_id)], interceptors=interceptors)
        else:
            channel = grpc.aio.insecure_channel(address, interceptors=interceptors)
        try:
            return await pbg.ReachStub(channel).Ping(
                pb.ReachPing(nonce=nonce, peer_id=peer_id), timeout=timeout)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def _client_tls(self) -> tls.PeerTls:
        """The coordinator's own client leaf, issued by its CA (renewed a day before it ends)."""
        ca = self._ca()
        if ca is None:
            raise ValueError("no swarm CA to dial a member over mTLS with")
        if self._leaf is None or self._leaf.ca_pem != ca.cert_pem or \
                time.time() > self._leaf_until - _LEAF_RENEW_S:
            me = self.identity.peer_id
            cert, key = tls.issue_leaf(ca.cert_pem, ca.key_pem, me, [me], client=True,
                                       server=False, days=tls.LEAF_DAYS)
            self._leaf = tls.PeerTls(ca.cert_pem, cert, key)
            self._leaf_until = time.time() + tls.LEAF_DAYS * 86400
        return self._leaf


def dial_tls(address: str, coordinator_tls: bool, member_has_leaf: bool) -> bool:
    """Whether to dial a member at `address` over mTLS, as its fellow peers do
    (protocols.tls.peer_channel): not on a loopback link, and only when the member has a swarm
    leaf (it sent a CSR at join; every member of a coordinator serving TLS has one)."""
    host = address
    with contextlib.suppress(ValueError):
        host, _ = tls.split_host_port(address)
    return (coordinator_tls or member_has_leaf) and not tls.link_is_local(host)


def relay_loads(live: list[Member], coordinator_relay: str) -> dict[str, int]:
    """The relays on offer, each with how many live members use it or were told to: the
    coordinator's own Relay service (`coordinator_relay`, "" when it runs none) first, then the
    live members started with --relay that were reached directly (their Relay service is on
    their address). O(members)."""
    loads = {coordinator_relay: 0} if coordinator_relay else {}
    for m in live:
        if m.relay and m.reach == reach_wire.DIRECT:
            loads.setdefault(m.address, 0)
    for m in live:
        used = m.relayed_by or (m.relay_told if m.reach == reach_wire.UNREACHABLE else "")
        if used in loads:
            loads[used] += 1
    return loads


def pick_relay(loads: dict[str, int], current: str) -> str:
    """The relay an unreachable member is told to attach to: the one it was told before while
    that one is still offered, else the least loaded (ties: the order of `loads`, the
    coordinator's own first). "" when none is offered."""
    if current in loads:
        return current
    if not loads:
        return ""
    order = {a: i for i, a in enumerate(loads)}
    return min(loads, key=lambda a: (loads[a], order[a]))


class Reachability:
    """The coordinator's reachability bookkeeping, for coordinator/service.py: which address a
    heartbeat announces, when to dial members back, what their reach is, which relay an
    unreachable member is told. Event loop only.

    Args:
        identity, ca: the coordinator's key and CA, for the dial-back (ReachChecker).
        membership: the members; their `reach`, `relay_told` and addresses change here.
        tls: whether the coordinator serves TLS (then every member holds a swarm leaf).
        on_change: called when a reach changed (the service persists soon).
    """

    def __init__(self, identity: Identity, membership: Membership, *,
                 ca: Callable[[], CoordinatorCA | None], tls: Callable[[], bool],
                 clock: Callable[[], float], on_change: Callable[[], None]) -> None:
        self.membership = membership
        self.checker = ReachChecker(identity, ca, self._result)
        self._tls = tls
        self._clock = clock
        self._on_change = on_change
        self.relay_address = ""  # this coordinator's own Relay service (set by main)
        self._relays: dict[str, int] = {}  # relay address -> members on it (tick refreshes)
        self._checked: dict[str, float] = {}  # peer id -> when its last check began
        self._lost: dict[str, float] = {}  # relay address -> offered again from then on

    def announced(self, request: pb.HeartbeatRequest, grpc_peer: str) -> tuple[str, str] | None:
        """The (address, relayed_by) a heartbeat announces, checked like Join's address (an
        empty host filled with the observed one); None when it announces nothing. BadRequest."""
        if not request.address:
            if request.relayed_by:
                raise BadRequest("relayed_by is set but address is empty: announce the address "
                                 "the relay listens on for this peer")
            return None
        loopback = is_loopback_peer(grpc_peer)
        address = check_address(observed_address(request.address, grpc_peer), loopback)
        relayed_by = check_address(request.relayed_by, loopback) if request.relayed_by else ""
        return address, relayed_by

    def check(self, member: Member, now: float) -> None:
        """Dial `member` back at its address, off the calling path (returns at once)."""
        use_tls = dial_tls(member.address, self._tls(), member.has_leaf)
        if self.checker.check(member.peer_id, member.public_key, member.address, use_tls):
            self._checked[member.peer_id] = now

    def relay_lost(self, relay: str, now: float) -> None:
        """A member relayed by `relay` announced its direct address again: that relay failed
        it. Offer it to no one for LOST_RELAY_S (the coordinator's own relay stays: its loss
        is the coordinator's)."""
        if relay and relay != self.relay_address:
            self._lost[relay] = now + LOST_RELAY_S
            self._relays.pop(relay, None)

    def relay_for(self, member: Member) -> str:
        """The relay an unreachable member is told to attach to (least loaded; sticky)."""
        told = pick_relay(self._relays, member.relay_told)
        if told and told != member.relay_told:
            self._relays[told] += 1
        member.relay_told = told
        return told

    def tick(self, now: float) -> None:
        """Once a second: refresh the relays' loads; dial back members never checked (restored
        after a restart, or skipped while MAX_PENDING checks waited), relayed members whose
        relay is gone, and every RECHECK_UNREACHABLE_S the unreachable and relayed ones."""
        live = self.membership.live_members()
        self._lost = {a: until for a, until in self._lost.items() if until > now}
        self._relays = {a: n for a, n in relay_loads(live, self.relay_address).items()
                        if a not in self._lost}
        for m in live:
            since = now - self._checked.get(m.peer_id, 0.0)
            relay_gone = (m.reach == reach_wire.RELAYED and m.relayed_by not in self._relays
                          and since >= RECHECK_RELAY_GONE_S)
            due = m.reach == "" or relay_gone or (
                m.reach in (reach_wire.UNREACHABLE, reach_wire.RELAYED)
                and since >= RECHECK_UNREACHABLE_S)
            if due and not self.checker.pending(m.peer_id):
                self.check(m, now)
        for pid in [p for p in self._checked if not self.membership.is_member(p)]:
            del self._checked[pid]

    async def close(self) -> None:
        """Cancel the checks in flight (the coordinator stops)."""
        await self.checker.close()

    def _result(self, peer_id: str, address: str, outcome: Outcome) -> None:
        member = self.membership.get(peer_id)
        if member is None:
            return
        reach = ((reach_wire.RELAYED if member.relayed_by else reach_wire.DIRECT)
                 if outcome.reached else reach_wire.UNREACHABLE)
        if not self.membership.set_reach(peer_id, address, reach, outcome.detail, self._clock()):
            return
        if outcome.reached:
            log.info("peer %s is reachable (%s): %s", peer_id, reach, outcome.detail)
        else:
            log.warning("peer %s is unreachable: %s", peer_id, outcome.detail)
        self._on_change()
