"""Where a peer listens and how others reach it: the bind address, TLS for its server, the
coordinator's fingerprint and mDNS discovery, and the data plane beside the gRPC server.

Links (protocols/tls.py): unless `--plaintext`, the peer sends a CSR for its P-256 key
(IDENTITY.tls.key, 0600) with its Join and gets a leaf naming its peer id from the coordinator (the
swarm's CA). Its server serves mTLS whenever it is reachable from another machine (its --host or
--advertise address is not loopback), and it dials other peers with protocols.tls.peer_channel.
The coordinator is verified against its fingerprint (the token file's, or
--coordinator-fingerprint); mDNS discovery is used only with one.

Reachability (peer/reach.py): by default the peer serves on all interfaces and joins with
":PORT", and the coordinator registers it at the host it sees the Join come from (the Join
reply's address); 127.0.0.1 when the coordinator itself is on loopback. The coordinator then
dials it back (Reach.Ping, answered with the peer's identity key); heartbeat replies say whether
it is reached directly, and a peer nobody can dial logs what to do about it.

A mixin of `PeerDaemon` (peer/daemon.py), split out of it by responsibility; it uses the
daemon's `args`, `address`, `client`, `plaintext`, `server_tls`, `dataplane` and
`_dataplane_leaf`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket

from protocols import dataplane, tls
from protocols.admission import parse_token
from protocols.coordinator_client import CoordinatorClient

log = logging.getLogger("shoal.peer")


class Listening:
    """How the daemon listens: `_bind_host`, `_server_tls`, `_check_link`, `_fingerprint`,
    `_discover`, `_start_dataplane` and the data plane's leaf renewal."""

    args: argparse.Namespace
    address: str
    client: CoordinatorClient | None
    plaintext: bool
    server_tls: tls.PeerServerTls | None
    dataplane: dataplane.DataPlaneServer | None
    _dataplane_leaf: tls.PeerTls | None

    def _bind_host(self, coordinator: str) -> str:
        """--host, or by default all interfaces; 127.0.0.1 when neither --host nor --advertise
        is given and the coordinator is on this machine's loopback (a plaintext link,
        protocols.tls.link_is_local): it then sees the Join come from 127.0.0.1 and registers
        this peer there, where no other machine reaches it, and peers dial loopback in
        plaintext."""
        if self.args.host:
            return self.args.host
        with contextlib.suppress(ValueError):
            if not self.args.advertise and tls.link_is_local(tls.split_host_port(coordinator)[0]):
                return "127.0.0.1"
        return "0.0.0.0"

    def _check_link(self, bind: str) -> None:
        """The registered address and the server must agree on TLS, as other peers dial it
        (protocols.tls.peer_channel: plaintext on loopback links, else mTLS)."""
        host = tls.split_host_port(self.address)[0]
        if self.server_tls is not None and tls.link_is_local(host):
            raise SystemExit(f"shoal peer: the coordinator registered this peer at "
                             f"{self.address}, a loopback address, but it serves mTLS on {bind}: "
                             f"pass --host 127.0.0.1, or --advertise an address others reach")

    def _server_tls(self, bind: str) -> tls.PeerServerTls | None:
        """mTLS for this peer's server unless --plaintext or every address of it is loopback."""
        args = self.args
        advertise = args.advertise or bind  # a host: the port is appended to it
        if self.plaintext or (tls.link_is_local(bind) and tls.link_is_local(advertise)):
            return None
        if tls.link_is_local(advertise):
            raise SystemExit(f"shoal peer: --host {bind} is reachable from other machines but "
                             f"the advertised address {advertise} is loopback: advertise an "
                             f"address others can reach (--advertise), serve on 127.0.0.1, or "
                             f"pass --plaintext")
        return tls.PeerServerTls()

    def _fingerprint(self) -> str | None:
        given = getattr(self.args, "coordinator_fingerprint", None)
        if given:
            try:
                return tls.check_fingerprint(given)
            except ValueError as exc:
                raise SystemExit(f"shoal peer: --coordinator-fingerprint: {exc}") from None
        return parse_token(self.token)[1] if self.token else None

    async def _discover(self, fingerprint: str | None) -> str:
        """HOST:PORT of the coordinator with `fingerprint` that mDNS finds (SystemExit if none)."""
        from protocols.discovery import DiscoveryRefused, discover, matching

        if not fingerprint:  # say so before waiting for mDNS answers
            try:
                matching([], None)
            except DiscoveryRefused as exc:
                raise SystemExit(f"shoal peer: {exc}") from None
        try:
            host, port, _ = matching(await discover(timeout=5.0), fingerprint)
        except DiscoveryRefused as exc:
            raise SystemExit(f"shoal peer: {exc}") from None
        return f"{host}:{port}"

    async def _start_dataplane(self, bind: str) -> None:
        """The data plane beside the gRPC server (same interfaces, a port of its own:
        --dataplane-port, else any free one): state downloads go over it to receivers that ask
        (peer/state_service.py StateService). Its TLS is the gRPC server's: the peer's leaf, client
        leaves of the swarm CA required. Receivers dial the host of the gRPC address they
        called, so the advertised host is informative. Without --dataplane-port a failure to
        listen leaves downloads from this peer in-band; with it, the peer leaves and exits."""
        port = self._dataplane_port()
        context = None
        if self.server_tls is not None:
            leaf = self.client.tls()
            context = dataplane.peer_server_context(leaf.ca_pem, leaf.cert_pem, leaf.key_pem)
            self._dataplane_leaf = leaf
        plane = dataplane.DataPlaneServer(bind, port, advertise_host=self._own_host(),
                                          ssl_context=context)
        try:
            await plane.start()
        except OSError as exc:
            if port:  # taken since the check before joining: the operator asked for this port
                with contextlib.suppress(Exception):
                    await self.client.leave("cannot serve the data plane")
                raise SystemExit(_dataplane_port_error(bind, port, exc)) from None
            log.warning("no data plane on %s (%s): state downloads from this peer go in-band",
                        bind, exc)
            return
        self.dataplane = plane
        log.info("data plane at %s:%d (%s)", bind, plane.port,
                 "mTLS" if context is not None else "plaintext")

    def _dataplane_port(self) -> int:
        return int(getattr(self.args, "dataplane_port", 0) or 0)

    def _renew_dataplane_leaf(self, leaf: tls.PeerTls) -> None:
        plane = self.dataplane
        if plane is None or plane.ssl_context is None or leaf == self._dataplane_leaf:
            return
        dataplane.renew_leaf(plane.ssl_context, leaf.cert_pem, leaf.key_pem)
        self._dataplane_leaf = leaf

    def _own_host(self) -> str:
        """The host others reach this peer at (where a --relay peer's relayed ports are)."""
        with contextlib.suppress(ValueError):
            return tls.split_host_port(self.address)[0] or "127.0.0.1"
        return "127.0.0.1"


def check_dataplane_port(bind: str, port: int) -> None:
    """SystemExit with what to do when `bind`:`port` cannot be listened on (0: nothing to check).
    The data plane itself starts after the join (its TLS needs the leaf the join issues); this
    check, before it, keeps a peer whose --dataplane-port is taken from joining at all. It binds
    as asyncio's server does (SO_REUSEADDR), so a port in TIME_WAIT passes as it would there."""
    if not port:
        return
    try:
        family = socket.getaddrinfo(bind or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((bind, port))
            probe.listen(1)
    except OSError as exc:
        raise SystemExit(_dataplane_port_error(bind, port, exc)) from None


def _dataplane_port_error(bind: str, port: int, exc: OSError) -> str:
    return (f"shoal peer: cannot serve the data plane on {bind}:{port} "
            f"({exc.strerror or exc}): pick another --dataplane-port (or SHOAL_DATAPLANE_PORT), "
            "or 0 for any free one")


def all_interfaces(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")
