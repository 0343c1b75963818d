"""A peer nobody can dial, reached through a relay; and a reachable peer that relays (--relay).

`RelayLink` follows the coordinator's heartbeat replies. When one says this peer is unreachable
and names a relay (HeartbeatReply.reach == "unreachable", .relay = HOST:PORT of a Relay
service), it keeps a RelayTunnel (protocols/relay_tunnel.py) attached there, carrying every
connection made to the relayed port to this peer's own server; each address the relay gives is
announced with the next heartbeats (CoordinatorClient.announce_address: HeartbeatRequest.address
and relayed_by). When the stream drops the tunnel attaches again with back-off (and announces
the port it gets, which is usually the same); when the coordinator names another relay, the link
moves there. A relay lost for good (LOST_AFTER_FAILURES attaches in a row fail while the
coordinator still calls this peer relayed) makes the link announce the address registered at
join again: the coordinator checks it, finds it unreachable and names a relay it still has. The
stage is never touched: only the address changes.

`relay_hub` is the RelayHub a reachable peer started with `--relay` serves on its own server:
it admits members that are live in this peer's view of the swarm.

The relay is dialled like everything else this peer dials: a peer relay through the peer's own
channels (mTLS to the relay peer's leaf), the coordinator through a channel like the
CoordinatorClient's (the swarm CA pinned, or plaintext where the client is). Event loop only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from peer import consistency
from protocols import tensor_stream, tls
from protocols.auth import CallSigner, client_interceptors
from protocols.coordinator_client import CoordinatorClient, SwarmView
from protocols.relay import RelayHub, RelayTunnel

log = logging.getLogger("shoal.peer")

#: attach attempts in a row that fail, while the coordinator still calls this peer relayed,
#: before the relay counts as lost (0.5 + 1 + 2 s of back-off at least)
LOST_AFTER_FAILURES = 3


class RelayLink:
    """This peer's relayed address, kept up while the coordinator says it cannot be dialled.

    Args:
        client: the joined CoordinatorClient (announce_address; its TLS settings and certificate
            for a channel to the coordinator when the coordinator is the relay).
        target: HOST:PORT of this peer's own gRPC server, as the tunnel dials it locally.
        view: the current swarm view (which relays are peers).
        peer_channel: this peer's signed channel to another peer's address.
        tunnel: how a tunnel is made (tests pass RelayTunnel with short back-offs).
    """

    def __init__(self, client: CoordinatorClient, target: str,
                 view: Callable[[], SwarmView | None],
                 peer_channel: Callable[[str], grpc.aio.Channel], *,
                 tunnel: Callable[..., RelayTunnel] = RelayTunnel) -> None:
        self.client = client
        self.target = target
        self._view = view
        self._peer_channel = peer_channel
        self._make_tunnel = tunnel
        self.tunnel: RelayTunnel | None = None
        self._coordinator_channels: dict[str, grpc.aio.Channel] = {}
        self._warned_no_relay = False
        self._direct = ""  # the address the coordinator registered at join (not relayed)
        self._fell_back = False

    @property
    def address(self) -> str:
        """The relayed address others dial now ("" while none)."""
        return self.tunnel.address if self.tunnel is not None else ""

    async def update(self, reach: str, relay: str) -> None:
        """Act on one heartbeat reply's `reach` and `relay` (may stop the old tunnel)."""
        if reach == "relayed":
            self._check_lost()
        if reach != "unreachable":
            return  # direct, or relayed (the tunnel keeps itself up), or not checked yet
        if not relay:
            if not self._warned_no_relay:
                log.warning("no relay is offered for this peer yet: it stays unreachable until "
                            "the coordinator (without --no-relay) or a peer started with --relay "
                            "can carry its calls")
                self._warned_no_relay = True
            return
        self._warned_no_relay = False
        if self.tunnel is not None and self.tunnel.relay == relay:
            return  # attached, or attaching with back-off: the coordinator sees the outcome
        if self.tunnel is not None:
            log.info("moving from relay %s to %s (the coordinator names another relay)",
                     self.tunnel.relay, relay)
            await self.tunnel.stop()
        log.info("this peer cannot be dialled: attaching to the relay at %s", relay)
        if not self._direct:
            self._direct = self.client.registered_address
        # which kind of relay is decided now, once: a --relay peer that dies later drops out of
        # the view, and its tunnel must keep failing towards it (so that the loss is noticed and
        # announced), never quietly attach to the coordinator's relay under the dead one's name
        via_peer = self._is_peer(relay)
        self.tunnel = self._make_tunnel(relay, self.target,
                                        lambda: self._channel(relay, via_peer),
                                        on_address=self._on_address)
        self.tunnel.start()

    def _on_address(self, address: str) -> None:
        if address and self.tunnel is not None:
            self._fell_back = False
            self.client.announce_address(address, relayed_by=self.tunnel.relay)

    def _check_lost(self) -> None:
        """The coordinator still routes calls through a relay this peer cannot attach to (it
        left, or the path to it broke): announce the address registered at join again. The
        coordinator dials it back, finds it unreachable and names a relay it still has."""
        t = self.tunnel
        if (t is None or t.address or t.failures < LOST_AFTER_FAILURES or self._fell_back
                or not self._direct):
            return
        log.warning("relay %s is lost (%s); announcing %s again so that the coordinator names "
                    "another relay", t.relay, t.last_error or "no stream", self._direct)
        self._fell_back = True
        self.client.announce_address(self._direct, relayed_by="")

    def _is_peer(self, relay: str) -> bool:
        view = self._view()
        return view is not None and any(p.address == relay for p in view.peers)

    def _channel(self, relay: str, via_peer: bool) -> grpc.aio.Channel:
        if via_peer:
            return self._peer_channel(relay)  # a peer started with --relay
        # the coordinator's own relay: dialled where this peer reaches the coordinator already
        # (the address it names itself by may be one only its own network reaches)
        address = self.client.address
        ch = self._coordinator_channels.get(address)
        if ch is None:
            ch = self._coordinator_channels[address] = coordinator_channel(self.client, address)
        return ch

    async def stop(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.stop()
        for ch in self._coordinator_channels.values():
            await ch.close()
        self._coordinator_channels.clear()


def coordinator_channel(client: CoordinatorClient, address: str) -> grpc.aio.Channel:
    """A signed channel to the coordinator's gRPC server at `address`, trusting what `client`
    trusts (the pinned swarm CA, a --tls-dir, or plaintext)."""
    interceptors = client_interceptors(CallSigner(client.identity, lambda: client.certificate))
    options = tensor_stream.grpc_options()
    if client.tls_dir:
        return grpc.aio.secure_channel(address, tls.channel_credentials(client.tls_dir),
                                       options=options, interceptors=interceptors)
    if client.secure and client.tls_ca:
        return grpc.aio.secure_channel(
            address, tls.coordinator_channel_credentials(client.tls_ca),
            options=[*options, ("grpc.ssl_target_name_override", tls.COORDINATOR_TLS_NAME)],
            interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def relay_hub(view: Callable[[], SwarmView | None], advertise_host: Callable[[], str],
              bind_host: str) -> RelayHub:
    """The relay a peer started with --relay serves: members live in its view may attach; their
    relayed ports listen on `bind_host` and are advertised at this peer's own host."""

    def admit(peer_id: str) -> bool:
        current = view()
        return (current is not None and any(p.peer_id == peer_id for p in current.peers)
                and peer_id not in consistency.departed_peers(current))

    return RelayHub(admit, advertise_host=advertise_host, bind_host=bind_host)


def local_target(bind: str, port: int) -> str:
    """How this peer's tunnel dials its own server bound to `bind`:`port`."""
    host = bind.strip("[]")
    if host in ("0.0.0.0", "::", ""):
        return f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
