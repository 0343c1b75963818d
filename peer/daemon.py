"""`shoal peer`: the daemon that holds one stage of the model on one machine.

Life of a peer: find the coordinator (flag, SHOAL_COORDINATOR, or mDNS) → join with its identity
and self-benchmark → get the run spec and a stage → take the stage's state (download from a live
replica, hash-checked; or, when the coordinator marks the stage as lost after training, rebuild
it without a replica by CheckFree / CheckFree+ / a local snapshot, peer/recovery/rebuild.py; or the
deterministic initial weights when it is the first) → serve Stage /
Sync / State, heartbeat its stats, and on stage 0 drive microbatches (peer/pipeline/driver.py) → on
SIGTERM or a spot-interruption notice drain: stop taking work, finish in-flight microbatches
within the grace period, tell the coordinator, exit 0. SIGKILL loses at most its in-flight
microbatches: the coordinator expires its lease and routers resend elsewhere.

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

One asyncio event loop (uvloop) per process; torch runs on the StageHost's compute thread, so a
long forward pass never delays a heartbeat.

The daemon is the process; its collaborators (services, the driver, recovery, the sync modes) get
it as a `PeerContext` (peer/context.py) and use nothing else of it. The replicas' consistency
rules are peer/consistency.py's; which sync mode and driver a run uses, peer/sync/registry.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path

import grpc

from peer import consistency, machine
from peer.authz import attested_swarm_step
from peer.consistency import READY_STATES
from peer.metrics import PeerMetrics
from peer.pipeline import stalls, wire
from peer.pipeline.data import CorpusError, data_fingerprint_for, load_corpus_for
from peer.pipeline.driver import Driver
from peer.pipeline.p2p import Inbox
from peer.pipeline.stage_host import StageHost
from peer.pipeline.unreachable import UnreachableLog
from peer.preemption import SpotWatcher
from peer.progress import ProgressReporter, peer_stats, progress_text
from peer.reach import ReachNotice, ReachService
from peer.recovery.durable import DurableCheckpoints
from peer.recovery.edge_copy import EdgeCopies
from peer.recovery.rebuild import catch_up, snapshot_if_due
from peer.recovery.transfer import download_state
from peer.relayed import RelayLink, local_target, relay_hub
from peer.services import serve
from peer.sync.base import SyncMode
from peer.sync.registry import make_driver, make_sync_mode
from peer.sync.replay import replay_rounds
from peer.sync.rounds import SyncRounds
from protocols import auth, codec, dataplane, tls
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.admission import parse_token
from protocols.coordinator_client import (
    OBSERVER_STAGE,
    Benchmark,
    CoordinatorClient,
    CoordinatorRefused,
    PeerStats,
    SwarmView,
)
from protocols.identity import Identity
from protocols.recovery_report import RecoveryReport
from protocols.relay import RelayHub
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.peer")


class PeerDaemon:
    """The peer process: joins, holds one stage, serves it, heartbeats, drains. Implements
    `PeerContext` (peer/context.py) and the services' `ServiceContext` for its collaborators."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.identity = Identity.load_or_create(args.identity)
        self.peer_id = self.identity.peer_id
        self.token = Path(args.token_file).read_text().strip() if args.token_file else None
        self.counter = wire.ByteCounter()
        self.host: StageHost | None = None
        self.spec: RunSpec = RunSpec()
        self.mode: SyncMode | None = None
        self.rounds: SyncRounds | None = None
        self.view: SwarmView | None = None
        self.state = "joining"
        self._hash = consistency.StateHash()
        self._stall = consistency.StallClock()
        self.draining = False
        self.queue = 0
        self.step_lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self.plaintext = bool(getattr(args, "plaintext", False))
        self.server_tls: tls.PeerServerTls | None = None  # set when the server serves mTLS
        self._channels = wire.Channels(
            lambda: auth.client_interceptors(
                auth.CallSigner(self.identity, lambda: self.client.certificate)),
            tls=lambda: self.client.tls() if self.client is not None else None,
            peer_of=self._peer_at)
        self._throughput = 0.0  # EMA of samples/s actually computed here
        self.driver: Driver | None = None
        self._driving: list[asyncio.Future] = []  # the drivers' run loops (run() starts them)
        self._running = False
        self._moving: asyncio.Future | None = None  # a move to another stage, under way
        self.client: CoordinatorClient | None = None
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.metrics_file = getattr(args, "metrics_file", None)
        self._resync_task: asyncio.Task | None = None
        self._heartbeats: asyncio.Task | None = None
        self.progress = ProgressReporter(getattr(args, "progress_s", 30.0))
        self.recovery: RecoveryReport | None = None  # of the last rebuild, if any
        self.snapshot_dir: str | None = getattr(args, "snapshot_dir", None)
        self._snapshot_step = 0
        self.checkpoints = DurableCheckpoints(getattr(args, "resume", None))  # durable.py
        self.edge_copies = EdgeCopies()  # CheckFree+: stage 1's / S's copy of stage 0, kept current
        self.metrics = PeerMetrics(self)  # served only with --metrics-port
        self.reach_notice = ReachNotice()  # logs what the coordinator's dial-back found
        self.unreachable = UnreachableLog()  # peers that refused calls: the next beat says so
        self.inbox = Inbox()  # peer-to-peer hops: deliveries awaited by the driver
        self.relay_link: RelayLink | None = None  # attaches to a relay while nobody can dial in
        self.relay_hub: RelayHub | None = None  # the relay it offers with --relay
        # bulk state downloads (StateService), started once joined; TLS with the leaf when the
        # gRPC server is mTLS (`_dataplane_leaf` is the leaf its context holds)
        self.dataplane: dataplane.DataPlaneServer | None = None
        self._dataplane_leaf: tls.PeerTls | None = None

    # ------------------------------------------------------------------ what collaborators use

    @property
    def state_hash(self) -> str:
        """The stage's state hash, or "" while it is not known for the current step
        (consistency.StateHash says why)."""
        return self._hash.at(self.host.step) if self.host is not None else ""

    @state_hash.setter
    def state_hash(self, value: str) -> None:
        step = self.host.step if self.host is not None else -1
        self._hash.set(step, value)
        if value and self.host is not None:  # bench.gpu_check compares replicas step by step
            log.debug("stage %d after step %d: state hash %s", self.host.stage, step, value)

    def activation_limits(self) -> codec.Limits:
        return wire.activation_limits(self.spec)

    def sync_limits(self) -> codec.Limits:
        n = sum(p.numel() for p in self.host.module.parameters()) if self.host else 1 << 20
        return wire.sync_limits(n)

    def state_limits(self) -> codec.Limits:
        return wire.state_limits(self.spec)

    def note_compute(self, samples: int, seconds: float) -> None:
        rate = samples / max(seconds, 1e-6)
        self._throughput = rate if self._throughput == 0 else 0.9 * self._throughput + 0.1 * rate

    def stats(self) -> PeerStats:
        return peer_stats(self.state, self._throughput, self.queue, self.counter, self.host,
                          self.driver, self.state_hash, self.recovery)

    def channel(self, address: str) -> grpc.aio.Channel:
        return self._channels.get(address)

    def _peer_at(self, address: str) -> str:
        """The peer id the view places at `address` ("" when none): the TLS name to dial. A
        replacement on a departed peer's host:port shares its address while the old entry is in
        the view: the one still there, else the latest to join, is the one that answers."""
        at = [p for p in (self.view.peers if self.view is not None else ()) if
              p.address == address]
        if not at:
            return ""
        gone = consistency.departed_peers(self.view)
        return max(at, key=lambda p: (p.peer_id not in gone, p.joined_at)).peer_id

    def address_of(self, peer_id: str) -> str:
        return consistency.address_of(self.view, peer_id)

    def live_replicas(self, stage: int) -> list[str]:
        return consistency.live_replicas(self.view, stage)

    def stage_info(self, stage: int, field: str) -> object:
        """A field of `stage`'s StageInfo in the current view (rebuild, step, grad_norm, ...)."""
        info = next((s for s in (self.view.stages if self.view else ()) if s.stage == stage),
                    None)
        return getattr(info, field) if info is not None else None

    async def refresh_view(self, retry_s: float = 30.0) -> None:
        self.view = await self.client.view(retry_s=retry_s)

    # ------------------------------------------------------------------ start-up

    async def start(self) -> None:
        args = self.args
        fingerprint = self._fingerprint()
        coordinator = args.coordinator or await self._discover(fingerprint)
        bind = self._bind_host(coordinator)
        self.server_tls = self._server_tls(bind)
        if getattr(args, "relay", False):  # relayed ports at this peer's registered host
            self.relay_hub = relay_hub(lambda: self.view, self._own_host, bind)
        self.server, port = serve(self, f"{bind}:{args.port}",
                                  self.server_tls.credentials if self.server_tls else None,
                                  reach=ReachService(self.identity), relay=self.relay_hub)
        if port == 0:
            raise SystemExit(f"cannot listen on {bind}:{args.port}: address in use?")
        await self.server.start()
        # no --advertise on all interfaces: the coordinator fills in the host it sees (":PORT")
        self.address = (f"{args.advertise}:{port}" if args.advertise else
                        f":{port}" if _all_interfaces(bind) else f"{bind}:{port}")
        if getattr(args, "metrics_port", None) is not None:
            bound = await self.metrics.start(bind, args.metrics_port)
            log.info("metrics at http://%s:%d/metrics", bind, bound)
        _check_dataplane_port(bind, self._dataplane_port())  # before joining: fail fast
        tls_key = None if self.plaintext else tls.load_or_create_tls_key(
            Path(args.identity).with_suffix(".tls.key"))
        self.client = CoordinatorClient(coordinator, self.identity, token=self.token,
                                        fingerprint=fingerprint, plaintext=self.plaintext,
                                        tls_key=tls_key)
        self.client.relay = bool(getattr(args, "relay", False))  # PeerInfo.relay (--relay)
        self.relay_link = RelayLink(self.client, local_target(bind, port), lambda: self.view,
                                    self.channel)
        try:
            await self.client.connect()  # a coordinator that fails its fingerprint: fail fast
            self.client.data_fingerprint = await self._data_fingerprint()
            bench = await asyncio.to_thread(machine.benchmark, args.throttle,
                                            getattr(args, "simulate_speed", 0.0),
                                            machine.device(args.device))
            joined = await self.client.join(bench, self.address, stage_hint=args.stage)
        except CoordinatorRefused as exc:
            raise SystemExit(f"shoal peer: cannot join: {exc}") from None
        if self.server_tls is not None:
            leaf = self.client.tls()
            if leaf is None:
                raise SystemExit("shoal peer: the coordinator issued no TLS certificate, so this "
                                 "peer cannot serve mTLS: update the coordinator, or run both "
                                 "with --plaintext on a network you trust")
            self.server_tls.update(leaf)
        self.address = joined.address or self.address
        self._check_link(bind)
        await self._start_dataplane(bind)
        self.spec = joined.spec
        self.view = joined.view
        log.info("joined %s as %s at %s: stage %d of %d, sync %s", coordinator,
                 self.peer_id[:8], self.address, joined.stage, self.spec.pipeline.stages,
                 self.spec.sync.mode)
        # Heartbeat from now on: taking the stage (a download) may outlast the lease.
        self._heartbeats = asyncio.ensure_future(self.heartbeat_loop())
        await self._take_stage(joined.stage)

    async def _data_fingerprint(self) -> str:
        """This peer's data fingerprint, sent with its Join (any peer may come to drive stage 0;
        the coordinator refuses data that differ from the run's). The run spec names the
        tokenizer and data.path, so it is read first, as an observer. "" when this peer cannot
        read the data (it says why; as a driver it would fail with the same reason)."""
        observed = await self.client.join(Benchmark(declared=True), "",
                                          stage_hint=OBSERVER_STAGE)
        try:
            return await asyncio.to_thread(data_fingerprint_for, observed.spec, self.args.data)
        except CorpusError as exc:
            log.warning("cannot read the run's data on this peer (%s); joining without a data "
                        "fingerprint, it cannot drive stage 0", exc)
            return ""

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

    async def _take_stage(self, stage: int) -> None:
        """Hold `stage`: download it from a live replica; or, when the view says the stage lost
        every replica after training, rebuild it without one (CheckFree / CheckFree+ / snapshot,
        peer/recovery/rebuild.py); or start from the initial weights when it is the first holder."""
        if self.host is not None:
            self.host.close()
        if stage != 0 and self.driver is not None:  # moved off stage 0: it drives no more
            self.driver.stop()  # its loop ends at its next turn (it may hold step_lock's waiters)
            self.driver = None
        self.state = "syncing"
        self.host = StageHost(self.spec, stage, device=machine.device(self.args.device))
        self._hash.clear()
        self.host.throttle = max(self.args.throttle, 1.0)
        self.host.simulated_rate = getattr(self.args, "simulate_speed", 0.0)
        self.mode = mode = make_sync_mode(self.spec)
        self.rounds = SyncRounds(
            me=self.peer_id, stage=stage, mode=mode,
            candidates=lambda: consistency.leader_order({*self.live_replicas(stage), self.peer_id},
                                                        consistency.joined_at(self.view),
                                                        consistency.relayed(self.view)),
            exchange_stub=lambda pid: pbg.SyncStub(self.channel(self.address_of(pid))).Exchange,
            departed=lambda: consistency.departed_peers(self.view),
            counter=self.counter, timeout=self.spec.sync.timeout_s,
            max_bytes=self.sync_limits().max_total_bytes,
            joined=lambda: consistency.joined_at(self.view),
            attested=lambda: consistency.attested(self.view, stage),
            step_now=lambda: self.host.step if self.host is not None else 0,
            relayed=lambda: consistency.relayed(self.view),
            unreachable=self.unreachable,
        )
        report = await self.checkpoints.take_state(self, mode, stage,
                                                   vars(self.args).get("init_model"))
        if report is not None:
            self.recovery = report
        self.state_hash = await self.host.run(self.host.state_hash)
        self.state = "rebuilt" if report is not None else "training"
        if stage == 0 and self.driver is None:
            # tokenizing a corpus may take long: off the event loop (the driver reuses it)
            await asyncio.to_thread(load_corpus_for, self.spec, self.args.data)
            self.driver = make_driver(self, mode, self.args.data,
                                      getattr(self.args, "router", "swarm"))
            if self._running:  # moved to stage 0 while serving: drive from now on
                self._driving.append(asyncio.ensure_future(self.driver.run()))

    def fall_behind(self, why: str, behind_of: int = 0) -> None:
        """This replica missed steps (`behind_of`: up to that one) or drifted: stop serving,
        catch up by replay where it can, else re-download the stage (PeerContext.fall_behind)."""
        if self._resync_task and not self._resync_task.done():
            return
        stage = self.host.stage
        log.warning("stage %d replica is behind (%s): %s", stage, why,
                    "replaying the rounds it missed" if behind_of else "re-downloading")
        self.state = "syncing"

        async def resync() -> None:
            async with self.step_lock:
                if behind_of:
                    got = await replay_rounds(self, self.mode, self.rounds)
                    if not got.download and self.host.step >= behind_of:
                        log.info("stage %d: caught up by replaying %d rounds, after step %d",
                                 stage, got.rounds, self.host.step)
                        self.state = "training"
                        return
                    log.warning("stage %d: replayed %d rounds, after step %d: %s; "
                                "re-downloading", stage, got.rounds, self.host.step,
                                got.download or f"the swarm is after step {behind_of}")
                sources = [p for p in self.live_replicas(stage) if p != self.peer_id]
                if (not sources and behind_of and self.mode.fast_forwards
                        and catch_up(self, min(behind_of, attested_swarm_step(self.view)),
                                     holding_lock=True)):
                    # the stage's only holder: nobody applied the steps it missed (the drivers
                    # bypassed the stage), so the step counter is all it lacks; without this it
                    # waited for the heartbeats' stall check (~12 s) while the swarm ran on
                    self.state = "training"
                    return
                if await download_state(self, self.mode, sources):
                    self.state_hash = await self.host.run(self.host.state_hash)
                    got = await replay_rounds(self, self.mode, self.rounds)
                    if got.rounds:  # the rounds that passed during the download
                        log.info("stage %d: downloaded, then replayed %d rounds, after step %d",
                                 stage, got.rounds, self.host.step)
                self.state = "training"

        self._resync_task = asyncio.ensure_future(resync())

    async def sync_step(self, step: int, replicas: list[str] | None = None) -> pb.StepDone:
        """Synchronise this replica's stage for `step` and apply the aggregate (the sync mode's
        `step` hook, under the step lock)."""
        if replicas is not None:
            self.rounds.agreed[step] = replicas
        async with self.step_lock:
            host = self.host
            if step != host.step + 1:
                return pb.StepDone(step=step, stage=host.stage, stepped=False,
                                   detail=f"replica is after step {host.step}")
            done = await self.mode.step(self, self.rounds, step)
            await self.checkpoints.after_step(self)  # a durable checkpoint when one is due
            self.metrics.note_step(host.step)
            return done

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_s(self) -> float:
        """The period the coordinator told this peer (coordinator/pacing.py: the spec's in small
        swarms, slower in large ones); the spec's before the first Join."""
        told = getattr(self.client, "heartbeat_s", 0.0)
        return told if isinstance(told, (int, float)) and told > 0 else \
            self.spec.membership.heartbeat_s

    async def heartbeat_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                res = await self.client.heartbeat(self.stats(),
                                                  unreachable=self.unreachable.take())
                if self.server_tls is not None and self.client.tls() is not None:
                    self.server_tls.update(self.client.tls())  # a re-join renews the leaf
                    self._renew_dataplane_leaf(self.client.tls())
                self.address = self.client.registered_address or self.address
                self.reach_notice.update(res.reach, res.relay, self.address)
                view = res.view
                if view is not None:
                    self.view = view
                if self.relay_link is not None:  # after the view: it may name a relay peer
                    await self.relay_link.update(res.reach, res.relay)
                if (res.action == "move" and self.host and res.stage != self.host.stage
                        and self._moving is None):
                    log.info("coordinator moves this peer to stage %d", res.stage)
                    # beside the heartbeats, which must go on while it downloads the stage (a
                    # lapsed lease would make it a newcomer again)
                    self._moving = asyncio.ensure_future(self._move(res.stage))
                self._check_hash()
                self._snapshot_step = await snapshot_if_due(self, self._snapshot_step)
                self.edge_copies.poll(self)
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("heartbeat failed: %s", exc)
            self._report_progress()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), self._heartbeat_s())
            self._write_metrics()

    async def _move(self, stage: int) -> None:
        try:
            async with self.step_lock:
                await self._take_stage(stage)
        except Exception:
            log.exception("moving to stage %d failed; the coordinator will say what next",
                          stage)
        finally:
            self._moving = None

    def _report_progress(self) -> None:
        if self.host is None:
            return
        stats, now = self.stats(), time.monotonic()
        if self.progress.due(stats, now):
            fields = self.progress.take(self.host.stage, stats, now)
            log.info("%s", progress_text(fields), extra={"fields": fields})

    def _check_hash(self) -> None:
        """Compare this replica with the view (peer/consistency.py's rules): re-download, or
        adopt the swarm's step, when they say so."""
        if (self.view is None or self.host is None or self.state not in READY_STATES
                or not self.state_hash):
            return
        me, stage, step = self.peer_id, self.host.stage, self.host.step
        verdict = consistency.differing_hash(self.view, me, stage, step, self.state_hash)
        wait = max(3 * self.spec.membership.heartbeat_s, self.spec.sync.timeout_s)
        if verdict is None and self._stall.stalled(step, time.monotonic(),
                                                   2 * self.spec.membership.heartbeat_s):
            verdict = consistency.behind_the_attestation(self.view, stage, step)
        if verdict is None and self._stall.stalled(step, time.monotonic(), wait):
            verdict = consistency.behind_the_swarm(self.view, me, stage, step,
                                                   fast_forwards=self.mode.fast_forwards)
        if verdict is None:
            return
        if verdict.action == "download":
            self.fall_behind(verdict.why, behind_of=verdict.step)
            return
        log.warning("stage %d: every replica is behind the swarm (after step %d, the others "
                    "after %d)", stage, step, verdict.step)
        catch_up(self, verdict.step)  # recovery.catch_up: under the same conditions

    def _write_metrics(self) -> None:
        if self.metrics_file and self.driver:
            self.driver.append_metrics(self.metrics_file)

    # ------------------------------------------------------------------ draining

    async def drain(self, reason: str) -> None:
        """Stop taking work, let in-flight microbatches finish, leave; all within the grace.

        The grace is split so that the coordinator hears of the drain at once (its routers stop
        sending here), in-flight work gets all but a reserve, and the reserve covers the leave
        call and the shutdown; every network wait is bounded by what is left of the grace.
        """
        if self.draining:
            return
        self.draining = True
        self.state = "draining"
        grace = self.args.grace
        log.info("draining (%s): %.0f s grace", reason, grace)
        t0 = time.monotonic()
        deadline = t0 + grace
        reserve = min(2.0, 0.25 * grace)

        def left(cap: float) -> float:
            return max(0.05, min(cap, deadline - reserve / 2 - time.monotonic()))

        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.heartbeat(self.stats()), left(2.0))
        self.edge_copies.stop()
        if self.driver:
            self.driver.stop()
        while time.monotonic() < deadline - reserve:
            busy = (self.host and self.host.pending) or (self.driver and self.driver.busy())
            if not busy:
                break
            await asyncio.sleep(0.1)
        unfinished = len(self.host.pending) if self.host else 0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.leave(reason), left(2.0))
        self._write_metrics()
        log.info("drained in %.1f s of %.0f s grace; %d in-flight microbatches handed back",
                 time.monotonic() - t0, grace, unfinished)
        self.stopped.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(
                self.drain(signal.Signals(s).name)))
        machine.dump_tasks_on_sigusr1(log)
        stalls.WATCH.start()  # timeouts across a stop of this process are not the peers'
        await self.start()
        tasks = [self._heartbeats]
        watcher = SpotWatcher(self.args.spot_url, on_notice=self.drain)
        tasks.append(asyncio.ensure_future(watcher.run(self.stopped)))
        self._running = True
        if self.driver:
            self._driving.append(asyncio.ensure_future(self.driver.run()))
        await self.stopped.wait()
        tasks += self._driving
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.relay_link is not None:
            await self.relay_link.stop()
        if self.relay_hub is not None:
            await self.relay_hub.stop()
        await self.server.stop(1.0)
        if self.dataplane is not None:
            await self.dataplane.close()
        await self.metrics.stop()
        await self._channels.close()
        await self.client.close()
        if self.host:
            self.host.close()
        log.info("peer %s stopped", self.peer_id[:8])
        return 0


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


def _check_dataplane_port(bind: str, port: int) -> None:
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


def _all_interfaces(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def main(args: argparse.Namespace) -> int:
    machine.prepare_process()

    async def _main() -> int:
        return await PeerDaemon(args).run()

    return asyncio.run(_main())
