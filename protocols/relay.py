"""Relays for peers nobody can dial: a byte-transparent TCP tunnel over one outbound gRPC stream.

A peer behind NAT (or a firewall) opens one long-lived Relay.Attach stream to a relay: the
coordinator, or a reachable peer started with `--relay`. The relay (`RelayHub`, the Relay
servicer) listens on a TCP port for that peer and sends its address (RelayFrame.address, the
first frame); every TCP connection others make to that port is carried over the stream as a
numbered `conn` (open, data both ways, close), and the peer (`RelayTunnel`,
protocols.relay_tunnel) pumps each one to its own gRPC server. Bytes pass unchanged, so mTLS and
the per-call signatures run end to end: a relay can neither read nor forge what it carries.

Admission: Attach is a signed call (protocols.auth.AuthInterceptor); the hub asks `admit(peer_id)`
whether the verified caller may attach (the coordinator: a live member; a peer's relay: a live
member in its view). Limits (protocols.relay_conns.RelayLimits): peers attached at once,
connections per peer, queued frames, data per frame; past one, the stream gets an error frame
saying which and ends, and the hub serves the others. A peer that attaches again (it reconnected
after its old stream half-died) replaces its old stream and, where the port is free, keeps its
port. `relayed_bytes` and `bytes_by_peer` count the data carried both ways.

    hub = RelayHub(admit=membership.is_member, advertise_host="203.0.113.5",
                   ports=parse_ports("40000-40999"))
    pbg.add_RelayServicer_to_server(hub, server)     # a server with AuthInterceptor
    ...
    await hub.stop()
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.auth import current_caller
from protocols.relay_conns import (
    DEFAULT_LIMITS,
    KEEPALIVE_S,
    MAX_DATA_BYTES,
    Conns,
    RelayLimits,
    RelayProtocolError,
)
from protocols.relay_tunnel import RelayTunnel  # the peer's end, re-exported

__all__ = ["KEEPALIVE_S", "MAX_DATA_BYTES", "RelayHub", "RelayLimits", "RelayProtocolError",
           "RelayRefused", "RelayTunnel", "parse_ports"]

log = logging.getLogger("shoal.relay")


class RelayRefused(Exception):
    """This relay will not carry the caller now; the message says why and what to do."""


def parse_ports(text: str | None) -> range | None:
    """`--relay-ports` as a range: "40000-40999", "40000", or "" / "0" / None (any free port)."""
    if not text or text.strip() == "0":
        return None
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        raise ValueError(f"relay ports {text!r}: write FIRST-LAST, e.g. 40000-40999") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"relay ports {text!r}: need 1 <= FIRST <= LAST <= 65535")
    return range(first, last + 1)


@dataclass
class _Attached:
    """One attached peer: its listener and the connections its stream carries."""

    peer_id: str
    conns: Conns
    server: asyncio.base_events.Server | None = None
    address: str = ""
    port: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class RelayHub(pbg.RelayServicer):
    """The Relay servicer: allocates a port per attached peer and carries its connections.

    Args:
        admit: whether the verified caller (its peer id) may attach; called per Attach.
        advertise_host: the host others dial to reach a relayed port (a str, or a callable read
            at each Attach, e.g. the peer's advertised host once it is known).
        bind_host: the interface the relayed ports listen on.
        ports: the ports to allocate from (`parse_ports`); None: any free port the OS picks.
        limits: how much this relay takes on (RelayLimits).

    Event loop only. `stop()` ends every stream, listener and connection.
    """

    def __init__(self, admit: Callable[[str], bool], *,
                 advertise_host: str | Callable[[], str] = "127.0.0.1",
                 bind_host: str = "0.0.0.0", ports: range | None = None,
                 limits: RelayLimits = DEFAULT_LIMITS) -> None:
        self._admit = admit
        self._advertise = advertise_host
        self._bind_host = bind_host
        self._ports = ports
        self.limits = limits
        self.attached: dict[str, _Attached] = {}
        self._last_port: dict[str, int] = {}  # a peer that re-attaches gets its port back
        self.relayed_bytes = 0
        self.bytes_by_peer: dict[str, int] = {}  # peers that ever attached (admitted members)
        self.refused = 0
        self._stopped = False

    # ---------------------------------------------------------------- the servicer

    async def Attach(self, request_iterator: AsyncIterator[pb.RelayFrame],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RelayFrame]:
        caller = current_caller()
        peer_id = caller.peer_id if caller is not None else ""
        try:
            session = await self._attach(peer_id)
        except RelayRefused as exc:
            self.refused += 1
            log.info("relay refused %s: %s", peer_id[:8] or context.peer(), exc)
            yield pb.RelayFrame(error=str(exc))
            return
        log.info("relaying for peer %s at %s", peer_id[:8], session.address,
                 extra={"fields": {"peer": peer_id, "relayed_address": session.address}})
        reading = asyncio.create_task(self._read(session, request_iterator))
        try:
            async for frame in session.conns.frames(pb.RelayFrame(address=session.address)):
                yield frame
        finally:
            reading.cancel()
            self._detach(session)

    async def _read(self, session: _Attached, frames: AsyncIterator[pb.RelayFrame]) -> None:
        """The peer's frames: data to the connections' sockets, closes; ends the stream on a
        protocol error or when the peer is silent past idle_timeout_s."""
        it = frames.__aiter__()
        error = ""
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(it.__anext__(), self.limits.idle_timeout_s)
                except StopAsyncIteration:
                    break
                if frame.open or frame.address or frame.error:
                    raise RelayProtocolError("a peer sends only data, close and keepalive frames")
                await session.conns.receive(frame)
        except TimeoutError:
            error = (f"nothing from peer {session.peer_id[:8]} for "
                     f"{self.limits.idle_timeout_s:g} s; the stream is taken as dead (send a "
                     f"keepalive at least every {self.limits.keepalive_s:g} s)")
        except RelayProtocolError as exc:
            error = f"malformed frame: {exc}; the stream ends (attach again)"
        except grpc.RpcError:
            pass  # the peer's side of the stream broke: end ours
        except Exception:  # a bug here must end this stream, not leave it half-served
            log.exception("relay stream of peer %s failed", session.peer_id[:8])
            error = "the relay failed on this stream; attach again"
        if error:
            log.warning("relay stream of peer %s ends: %s", session.peer_id[:8], error)
        session.conns.finish(error)

    # ---------------------------------------------------------------- attaching

    async def _attach(self, peer_id: str) -> _Attached:
        if self._stopped:
            raise RelayRefused("this relay is stopping; attach to another relay")
        if not peer_id or not self._admit(peer_id):
            raise RelayRefused(f"peer {peer_id or '(unsigned)'} is not a live member of this "
                               f"relay's swarm; join (or re-join) the coordinator first")
        old = self.attached.pop(peer_id, None)
        if old is not None:  # the peer reconnected: its old stream is dead to it
            old.conns.finish("replaced by a newer stream from the same peer")
            self._close(old)
        if len(self.attached) >= self.limits.max_peers:
            raise RelayRefused(f"this relay carries {len(self.attached)} peers already (its "
                               f"limit); attach to another relay")
        session = _Attached(peer_id, Conns(self.limits, lambda n: self._count(peer_id, n)))

        def arrived(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if session.conns.accept(reader, writer) is None:
                log.warning("relay for %s: %d connections open (the limit); refused one",
                            peer_id[:8], len(session.conns))
                writer.close()

        session.server = await self._listen(peer_id, arrived)
        session.port = session.server.sockets[0].getsockname()[1]
        host = self._advertise() if callable(self._advertise) else self._advertise
        session.address = f"{_bracket(host)}:{session.port}"
        self._last_port[peer_id] = session.port
        self.attached[peer_id] = session
        self.bytes_by_peer.setdefault(peer_id, 0)
        return session

    async def _listen(self, peer_id: str, arrived: Callable) -> asyncio.base_events.Server:
        """A listener on a free port of the range (the peer's previous one first)."""
        if self._ports is None:
            candidates = [self._last_port.get(peer_id, 0), 0]
        else:
            start = random.randrange(len(self._ports))
            candidates = [self._last_port.get(peer_id, 0),
                          *self._ports[start:], *self._ports[:start]]
        for port in candidates:
            if port == 0 and self._ports is not None:
                continue
            try:
                return await asyncio.start_server(arrived, self._bind_host, port,
                                                  limit=MAX_DATA_BYTES)
            except OSError:
                continue
        where = (f"ports {self._ports.start}-{self._ports.stop - 1}" if self._ports is not None
                 else "any port")
        raise RelayRefused(f"no relay port free on {self._bind_host} ({where}); the relay's "
                           f"operator can widen --relay-ports; attach to another relay")

    def _count(self, peer_id: str, n: int) -> None:
        self.relayed_bytes += n
        self.bytes_by_peer[peer_id] = self.bytes_by_peer.get(peer_id, 0) + n

    def _detach(self, session: _Attached) -> None:
        if self.attached.get(session.peer_id) is session:
            del self.attached[session.peer_id]
            log.info("relay for peer %s at %s closed", session.peer_id[:8], session.address)
        self._close(session)

    @staticmethod
    def _close(session: _Attached) -> None:
        if session.server is not None:
            session.server.close()  # stop taking connections; the open ones end below
        session.conns.close_all()
        session.ended.set()

    # ---------------------------------------------------------------- the process

    def connections(self) -> int:
        """Connections carried right now, all attached peers together."""
        return sum(len(s.conns) for s in self.attached.values())

    async def stop(self) -> None:
        """End every stream (each gets an error frame), listener and connection."""
        self._stopped = True
        for session in list(self.attached.values()):
            session.conns.finish("this relay is stopping; attach to another relay")
            self._close(session)
        self.attached.clear()
        await asyncio.sleep(0)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
