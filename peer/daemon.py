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

Links and reachability (mTLS, where it listens, the data plane): peer/listening.py. Keeping
the replica current (heartbeats, hash checks, falling behind) and draining: peer/upkeep.py.

One asyncio event loop (uvloop) per process; torch runs on the StageHost's compute thread, so a
long forward pass never delays a heartbeat.

The daemon is the process; its collaborators (services, the driver, recovery, the sync modes) get
it as a `PeerContext` (peer/context.py) and use nothing else of it. The replicas' consistency
rules are peer/consistency.py's; which sync mode and driver a run uses, peer/sync/registry.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc

from peer import consistency, machine
from peer.listening import Listening, all_interfaces, check_dataplane_port
from peer.metrics import PeerMetrics
from peer.pipeline import stalls, wire
from peer.pipeline.data import CorpusError, data_fingerprint_for, load_corpus_for
from peer.pipeline.driver import Driver
from peer.pipeline.p2p import Inbox
from peer.pipeline.stage_host import StageHost
from peer.pipeline.unreachable import UnreachableLog
from peer.preemption import SpotWatcher
from peer.progress import ProgressReporter, peer_stats
from peer.reach import ReachNotice, ReachService
from peer.recovery.durable import DurableCheckpoints
from peer.recovery.edge_copy import EdgeCopies
from peer.relayed import RelayLink, local_target, relay_hub
from peer.services import serve
from peer.sync.base import SyncMode
from peer.sync.registry import make_driver, make_sync_mode
from peer.sync.rounds import SyncRounds
from peer.upkeep import Upkeep
from protocols import auth, codec, dataplane, tls
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
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


class PeerDaemon(Listening, Upkeep):
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
                        f":{port}" if all_interfaces(bind) else f"{bind}:{port}")
        if getattr(args, "metrics_port", None) is not None:
            bound = await self.metrics.start(bind, args.metrics_port)
            log.info("metrics at http://%s:%d/metrics", bind, bound)
        check_dataplane_port(bind, self._dataplane_port())  # before joining: fail fast
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


def main(args: argparse.Namespace) -> int:
    machine.prepare_process()

    async def _main() -> int:
        return await PeerDaemon(args).run()

    return asyncio.run(_main())
