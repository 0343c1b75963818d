"""`shoal coordinator`: start (or restart) the coordinator service.

    shoal coordinator --config run.toml --port 7000 --http-port 8080 --state-dir DIR \\
        [--token-file F | --allow-file KEYS] [--no-mdns] [--host 0.0.0.0] [--tls-dir DIR]
    python -m coordinator.main ...          (the same, without the `shoal` wrapper)

The flags and the serving process are coordinator/command.py's; this module is `serve`.

One process, one uvloop event loop: gRPC (grpc.aio), HTTP (aiohttp), the once-a-second tick and
the mDNS announcement share it; SQLite writes run on the journal's one thread.

First start: the run spec comes from --config (RunSpec() defaults without it), a swarm id and
the coordinator's Ed25519 key (DIR/coordinator.key, mode 0600) are made. Restart: everything
comes from DIR; --config is then ignored with a warning (a new run needs a new --state-dir). The
epoch is bumped, members come back with a grace lease and their certificates stay valid.

Admission: --token-file (created with a fresh token when the file does not exist),
--allow-file (hex Ed25519 public keys, one a line, `#` comments), or both. With neither, the
token lives in DIR/join.token. There is no open mode (coordinator/admission_files.py).

TLS (issue #12): the coordinator is the swarm's CA (coordinator/ca.py: DIR/tls-ca.pem and
DIR/tls-ca.key, 0600, made once, reused on restart). It serves gRPC over TLS with that CA unless
--plaintext or bound to a loopback address, signs the CSR of every Join for the caller's own peer
id, writes its fingerprint into the token file ("SECRET sha256:HEX") and its mDNS announcement,
and prints it (peers admitted by allow-list pass it as --coordinator-fingerprint).

Operator's levers (issue #12): --http-token-file F (the dashboard, /api/*, /metrics and SSE need
that bearer token), --max-sse-clients N (32), `shoal ban PEER` (POST /api/ban; persisted),
--rejoin-cooldown S (5: a peer that left waits that long before joining again),
--join-nonce-capacity N (100000: replay memory for Joins of keys that are not members), and
--trust-stage-hints for a lab or test swarm whose operator places peers with `--stage` (by default
a hint is honoured only to re-attach a stage or fill an empty one).

`serve(...)` does the same in-process for tests and `shoal demo` and returns a handle to stop it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from coordinator import checkpoints
from coordinator.admission_files import CoordinatorStartError, read_admission, read_http_token
from coordinator.ca import CaError, CoordinatorCA
from coordinator.events import Event, EventLog, History
from coordinator.http import DEFAULT_MAX_SSE_CLIENTS, make_app, start_http
from coordinator.membership import DEFAULT_REJOIN_COOLDOWN_S, RESTART_EPOCH_GAP, Membership
from coordinator.pacing import Pacer
from coordinator.service import CoordinatorService
from coordinator.store import Batch, Journal, Store
from protocols import shoal_pb2_grpc as pbg
from protocols.auth import AuthInterceptor
from protocols.identity import Identity
from protocols.relay import RelayHub, parse_ports
from protocols.runspec import RunSpec
from protocols.tensor_stream import grpc_options
from protocols.tls import coordinator_server_credentials, link_is_local

log = logging.getLogger("shoal.coordinator")

KEY_FILE = "coordinator.key"
TICK_S = 1.0
MAX_REQUEST_BYTES = 1 << 20  # nothing a peer sends the coordinator is near this
MAX_PENDING_CALLS = 100_000  # calls grpc core queues before the handlers take them
DEFAULT_JOIN_NONCE_CAPACITY = 100_000  # Joins by non-members remembered for replay protection


@dataclass
class CoordinatorHandle:
    """A running coordinator. `await handle.stop()` persists everything and closes it."""

    service: CoordinatorService
    host: str
    grpc_port: int
    http_port: int
    state_dir: Path
    token_file: Path | None
    _server: grpc.aio.Server
    _runner: object
    _journal: Journal
    tasks: list[asyncio.Task] = field(default_factory=list)
    announcement: object | None = None
    relay: RelayHub | None = None  # the relay for unreachable peers (None with --no-relay)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def swarm_id(self) -> str:
        return self.service.swarm_id

    @property
    def token(self) -> str | None:
        """The join token peers must present (None with an allow-list only)."""
        return self.service.admission.token

    @property
    def grpc_address(self) -> str:
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.http_port}/"

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        for task in self.tasks:
            task.cancel()
        if self.relay is not None:
            await self.relay.stop()
        await self._server.stop(grace_s)
        await self._runner.cleanup()  # type: ignore[attr-defined]
        if self.announcement is not None:
            await self.announcement.close()  # type: ignore[attr-defined]
        await self._journal.close()
        log.info("coordinator stopped; state saved in %s", self.state_dir)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        from protocols.discovery import local_ipv4_addresses

        lan = local_ipv4_addresses(include_loopback=False)
        return lan[0] if lan else "127.0.0.1"
    return host


async def serve(config: str | Path | RunSpec | None = None, port: int = 7000,
                http_port: int = 8080, state_dir: str | Path = "./shoal-state",
                token_file: str | None = None, allow_file: str | None = None,
                mdns: bool = True, host: str = "0.0.0.0", *, tls_dir: str | None = None,
                plaintext: bool = False, trust_stage_hints: bool = False,
                rejoin_cooldown_s: float = DEFAULT_REJOIN_COOLDOWN_S,
                http_token_file: str | None = None,
                max_sse_clients: int = DEFAULT_MAX_SSE_CLIENTS,
                join_nonce_capacity: int = DEFAULT_JOIN_NONCE_CAPACITY,
                relay: bool = True, relay_ports: str | None = None,
                relay_host: str | None = None,
                clock: Callable[[], float] = time.time,
                checkpoint_every: int | None = None,
                checkpoint_dir: str | None = None) -> CoordinatorHandle:
    """Start a coordinator on the running event loop; see the module docstring."""
    try:
        ports = parse_ports(relay_ports)
    except ValueError as exc:
        raise CoordinatorStartError(f"--relay-ports: {exc}") from None
    state = Path(state_dir)
    store = Store(state)
    loop = asyncio.get_running_loop()
    snapshot = await loop.run_in_executor(None, store.load)
    identity = Identity.load_or_create(state / KEY_FILE)
    try:
        ca = CoordinatorCA.load_or_create(state, identity.public_key)
    except CaError as exc:
        raise CoordinatorStartError(str(exc)) from None
    now = clock()
    events, history = EventLog(), History()
    if snapshot is None:
        spec = config if isinstance(config, RunSpec) else (
            RunSpec.load(config) if config is not None else RunSpec())
        swarm_id, epoch, serial, restarts, totals = secrets.token_hex(8), 0, 0, 0, {}
    else:
        meta = snapshot.meta
        spec = RunSpec.from_toml(meta["spec_toml"])
        if config is not None:
            given = config if isinstance(config, RunSpec) else RunSpec.load(config)
            if given != spec:
                log.warning("--config differs from the run stored in %s; continuing the stored "
                            "run (start a new run with a new --state-dir)", state)
        swarm_id = meta["swarm_id"]
        epoch = int(meta.get("epoch", "0"))
        serial = int(meta.get("serial", "0")) + 10_000  # renewals may not all have been saved
        restarts = int(meta.get("restarts", "0")) + 1
        totals = json.loads(meta.get("totals", "{}"))
        events.restore(snapshot.events)
        history.restore(snapshot.history)
    spec = checkpoints.with_flags(spec, checkpoint_every, checkpoint_dir)
    admission, token_path = read_admission(state, token_file, allow_file)
    if token_path is not None:
        ca.stamp_token_file(token_path)  # peers verify this coordinator with the token alone
    http_token = read_http_token(http_token_file)
    membership = Membership(spec, swarm_id, epoch=epoch, events=events, history=history,
                            trust_stage_hints=trust_stage_hints,
                            rejoin_cooldown_s=rejoin_cooldown_s)
    membership.traffic.restore(totals)
    if snapshot is not None:
        membership.restore_bans(snapshot.bans)
        live = sum(1 for m in snapshot.members if m.live)
        # a large swarm was told a slower pace (coordinator/pacing.py): its grace is as long
        lease = Pacer(spec.membership.heartbeat_s, spec.membership.lease_s).target(live).lease_s
        membership.restore(snapshot.members, now, max(2 * lease, lease + 5.0),
                           f"restart #{restarts}: {live} live members restored with a grace "
                           f"lease; epoch {epoch} -> {epoch + RESTART_EPOCH_GAP}")
    else:
        membership.events.append(_start_event(now, swarm_id, spec))
    svc = CoordinatorService(spec=spec, swarm_id=swarm_id, identity=identity,
                             admission=admission, membership=membership, serial=serial,
                             clock=clock)
    svc.restarts = restarts
    svc.ca = ca
    if snapshot is not None:  # the first peer's data fingerprint, when the spec has none
        svc.data_fingerprint = snapshot.meta.get("data_fingerprint", "")

    if snapshot is not None and svc.spsa_ledger is not None:
        svc.spsa_ledger.restore(snapshot.spsa)  # replicas replay steps across the restart

    def collect(progress: bool) -> Batch:
        batch = svc.collect(progress)
        if svc.spsa_ledger is not None:
            batch.spsa_reset, batch.spsa = svc.spsa_ledger.take_unsaved()
        if progress:
            batch.meta["totals"] = json.dumps(membership.traffic.to_json())
        return batch

    journal = Journal(store, collect)
    journal.start()
    svc.journal = journal
    store_meta = {"restarts": str(restarts)}
    if snapshot is None:
        store_meta |= {"spec_toml": spec.to_toml(), "swarm_id": swarm_id,
                       "created_at": repr(now)}
    await journal.write(Batch(meta=store_meta))
    await journal.commit()

    auth = AuthInterceptor(issuer_public_key=lambda: identity.public_key,
                           swarm_id=lambda: swarm_id, is_member=svc.is_member,
                           max_stranger_nonces=join_nonce_capacity)
    options = [o for o in grpc_options(64 << 20) if o[0] != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", MAX_REQUEST_BYTES))
    # grpc core cancels calls that wait for the application beyond 1000 (randomly, "random
    # early detection") and 3000 (all): in a join storm, or a few thousand peers' heartbeats
    # arriving together, calls were CANCELLED before any handler saw them (the cliff at 1200
    # peers, issue #19). The coordinator sheds load itself (coordinator/pacing.py: the pace,
    # the Join gate), so let calls queue instead.
    options += [("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS)]
    server = grpc.aio.server(interceptors=[auth], options=options)
    svc.add_to_server(server)
    checkpoints.install(server, spec, membership)  # durable checkpoints (docs/checkpoints.md)
    hub = None
    if relay:  # relayed ports listen where gRPC does; peers dial them at --relay-host
        hub = RelayHub(admit=membership.is_member, bind_host=host, ports=ports,
                       advertise_host=relay_host or _connect_host(host))
        pbg.add_RelayServicer_to_server(hub, server)
    svc.relay_hub = hub
    try:
        if tls_dir:
            from protocols.tls import server_credentials

            bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls_dir))
        elif not plaintext and not link_is_local(host):  # TLS with the swarm CA by default
            bound = server.add_secure_port(f"{host}:{port}", coordinator_server_credentials(
                ca.cert_pem, ca.key_pem))
            svc.tls = True
        else:
            bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        bound = 0
        reason = str(exc)
    else:
        reason = "address in use?"
    if not bound:
        await journal.close()
        raise CoordinatorStartError(f"cannot serve gRPC on {host}:{port} ({reason}); pick "
                                    f"another --port or stop the process holding it")
    await server.start()
    try:
        runner, bound_http = await start_http(
            make_app(svc, clock, http_token=http_token, max_sse_clients=max_sse_clients),
            host, http_port)
    except OSError as exc:
        await server.stop(0)
        await journal.close()
        raise CoordinatorStartError(str(exc.strerror or exc)) from exc
    handle = CoordinatorHandle(svc, host, bound, bound_http, state, token_path, server, runner,
                               journal, relay=hub)
    svc.grpc_address = handle.grpc_address
    # where unreachable peers attach (HeartbeatReply.relay): this coordinator's own gRPC address
    svc.relay_address = handle.grpc_address if hub is not None else ""
    svc.join_token_file = str(token_path) if token_path is not None else ""
    handle.tasks.append(asyncio.create_task(_tick_loop(svc, clock), name="shoal-tick"))
    handle.tasks.append(asyncio.create_task(_watch_loop_lag(svc), name="shoal-loop-lag"))
    if mdns:
        from protocols.discovery import DiscoveryError, announce

        try:
            handle.announcement = await announce(bound, swarm_id=swarm_id, version=svc.version,
                                                  public_key=identity.public_key, host=host,
                                                  tls_fingerprint=ca.fingerprint)
        except DiscoveryError as exc:
            log.warning("%s", exc)
    log.info("coordinator for swarm %s (run %r) at epoch %d: gRPC %s, HTTP %s", swarm_id,
             spec.run.name, membership.epoch, handle.grpc_address, handle.http_url,
             extra={"fields": {"swarm_id": swarm_id, "run": spec.run.name,
                               "epoch": membership.epoch, "grpc": handle.grpc_address,
                               "http": handle.http_url}})
    return handle


def _start_event(now: float, swarm_id: str, spec: RunSpec) -> Event:
    return Event(now, "start", "", -1, f"swarm {swarm_id}: run {spec.run.name!r}, "
                 f"{spec.pipeline.stages} block stages, sync {spec.sync.mode}")


async def _watch_loop_lag(svc: CoordinatorService, period_s: float = 0.1) -> None:
    """Measure how late the event loop wakes up: the coordinator's own queueing delay.

    `svc.loop_lag_s` holds the worst lag of the last ten seconds (shown in /metrics); a lag of
    seconds means something blocks the loop and is logged.
    """
    loop = asyncio.get_running_loop()
    window: list[float] = []
    while True:
        t0 = loop.time()
        await asyncio.sleep(period_s)
        lag = loop.time() - t0 - period_s
        window.append(lag)
        if len(window) > 10 / period_s:
            window.pop(0)
        svc.loop_lag_s = max(window)
        svc.loop_lag_now_s = lag  # what Join admission looks at (coordinator/pacing.py)
        if lag > 1.0:
            log.warning("the coordinator's event loop stalled for %.1f s", lag)


async def _tick_loop(svc: CoordinatorService, clock: Callable[[], float]) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        try:
            await svc.tick(clock())
        except Exception:  # the tick must survive anything; the next one retries
            log.exception("coordinator tick failed")


def tune_interpreter() -> None:
    """Settings for a process whose latency is its product (measured in bench/coordinator.py).

    grpc.aio hands every completed call from its poller thread to the event loop thread; with
    CPython's default 5 ms GIL switch interval each hand-off can wait that long behind a busy
    loop, which doubled median heartbeat latency at 1000 peers. And a full (generation 2)
    garbage collection scans every object, grpc's and the stdlib's included: freezing what
    exists after start-up keeps those pauses to the coordinator's own objects.
    """
    sys.setswitchinterval(0.001)
    gc.collect()
    gc.freeze()


if __name__ == "__main__":  # python -m coordinator.main: the command line (coordinator/command.py)
    from coordinator.command import main

    raise SystemExit(main())
