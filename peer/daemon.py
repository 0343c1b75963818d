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

One asyncio event loop (uvloop) per process; torch runs on the StageHost's compute thread, so a
long forward pass never delays a heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import grpc
import torch

from peer.pipeline import wire
from peer.pipeline.stage_host import StageError, StageHost
from peer.preemption import SpotWatcher
from peer.progress import ProgressReporter, progress_text
from peer.recovery import rebuild as recovery
from peer.sync.modes import DemoMode, DilocoMode, RobustAllreduceMode
from peer.sync.rounds import LOCAL_STEP, AllreduceMode, SyncFailed, SyncMode, SyncRounds
from protocols import auth, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import Benchmark, CoordinatorClient, PeerStats, SwarmView
from protocols.identity import Identity
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.peer")
READY_STATES = ("training", "rebuilt")


def make_sync_mode(spec: RunSpec) -> SyncMode:
    """The run's sync mode (peer/sync/rounds.py, peer/sync/modes.py); one per replica and stage."""
    mode = spec.sync.mode
    if mode == "allreduce":
        a = spec.sync.allreduce
        if a.aggregator != "mean":
            return RobustAllreduceMode(a.aggregator, a.trim, a.clip_norm)
        return AllreduceMode(a.aggregator, a.trim, a.clip_norm)
    if mode == "demo":
        return DemoMode(spec)
    if mode == "diloco":
        if spec.sync.diloco.delayed:
            from peer.sync.diloco_delayed import DelayedDilocoMode

            return DelayedDilocoMode(spec)
        return DilocoMode(spec)
    if mode == "spsa":
        from peer.sync.spsa import SpsaMode

        return SpsaMode(spec)
    raise NotImplementedError(f"sync mode {mode!r} is not wired into the peer")


class PeerDaemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.identity = Identity.load_or_create(args.identity)
        self.peer_id = self.identity.peer_id
        token = None
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
        self.token = token
        self.counter = wire.ByteCounter()
        self.host: StageHost | None = None
        self.spec: RunSpec = RunSpec()
        self.mode: SyncMode | None = None
        self.rounds: SyncRounds | None = None
        self.view: SwarmView | None = None
        self.state = "joining"
        self._state_hash: tuple[int, str] = (-1, "")  # (the step it was computed after, hash)
        self._step_seen: tuple[int, float] = (-1, 0.0)  # (step, when it was first seen)
        self.draining = False
        self.queue = 0
        self.step_lock = asyncio.Lock()
        self.stopped = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._throughput = 0.0  # EMA of samples/s actually computed here
        self.driver = None
        self.client: CoordinatorClient | None = None
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.metrics_file = getattr(args, "metrics_file", None)
        self._resync_task: asyncio.Task | None = None
        self._heartbeats: asyncio.Task | None = None
        self.progress = ProgressReporter(getattr(args, "progress_s", 30.0))
        self.recovery = None  # peer/recovery.RecoveryReport of the last rebuild, if any
        self._snapshot_step = 0

    # ------------------------------------------------------------------ limits and stats

    @property
    def state_hash(self) -> str:
        """The stage's state hash, or "" while it is not known for the current step.

        A step advances the step counter on the compute thread before the new hash is computed;
        a heartbeat in between must not pair the new step with the old hash (a false drift).
        """
        step, value = self._state_hash
        return value if self.host is not None and step == self.host.step else ""

    @state_hash.setter
    def state_hash(self, value: str) -> None:
        self._state_hash = (self.host.step if self.host is not None else -1, value)

    def activation_limits(self):
        m, p = self.spec.model, self.spec.pipeline
        max_bytes = 4 * p.target_batch * m.seq_len * m.d_model * 4 + 4096
        return wire.limits_for(max_bytes)

    def sync_limits(self):
        n = sum(p.numel() for p in self.host.module.parameters()) if self.host else 1 << 20
        return wire.limits_for(8 * n + (1 << 20))

    def state_limits(self):
        return wire.limits_for(64 * self.spec.model.d_model ** 2 * self.spec.model.n_layers * 16
                               + (64 << 20))

    def note_compute(self, samples: int, seconds: float) -> None:
        rate = samples / max(seconds, 1e-6)
        self._throughput = rate if self._throughput == 0 else 0.9 * self._throughput + 0.1 * rate

    def stats(self) -> PeerStats:
        h = self.host
        driver = self.driver
        return PeerStats(
            state=self.state,
            samples_per_s=self._throughput,
            queue=self.queue,
            bytes_sent=self.counter.total_sent(),
            bytes_received=self.counter.total_received(),
            loss=driver.last_loss if driver else math.nan,
            step=h.step if h else 0,
            tokens_per_s=driver.tokens_per_s if driver else 0.0,
            dropped_microbatches=(driver.dropped if driver else 0) + (h.dropped if h else 0),
            grad_norm=h.last_grad_norm if h else 0.0,
            state_hash=self.state_hash,
            bytes_by_kind={**self.counter.by_kind(), **self._recovery_stat()},
            microbatches_done=driver.done if driver else 0,
        )

    def _recovery_stat(self) -> dict[str, int]:
        """The last rebuild, for the coordinator's event (peer/recovery/rebuild.py explains the
        key)."""
        r = self.recovery
        return {r.wire_key(): r.step} if r is not None else {}

    # ------------------------------------------------------------------ channels

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            signer = auth.CallSigner(self.identity, lambda: self.client.certificate)
            ch = grpc.aio.insecure_channel(address, options=tensor_stream.grpc_options(),
                                           interceptors=auth.client_interceptors(signer))
            self._channels[address] = ch
        return ch

    def address_of(self, peer_id: str) -> str:
        p = self.view.peer(peer_id) if self.view else None
        if p is None:
            raise KeyError(f"peer {peer_id[:8]} is not in the swarm view")
        return p.address

    def live_replicas(self, stage: int) -> list[str]:
        if self.view is None:
            return []
        return sorted(p.peer_id for p in self.view.replicas(stage)
                      if p.state in READY_STATES and p.peer_id not in self.view.revoked)

    def departed_peers(self) -> set[str]:
        if self.view is None:
            return set()
        gone = {p.peer_id for p in self.view.peers if p.state not in (*READY_STATES, "syncing")}
        return gone | set(self.view.revoked)

    # ------------------------------------------------------------------ start-up

    async def start(self) -> None:
        args = self.args
        self.server = grpc.aio.server(
            options=tensor_stream.grpc_options(),
            interceptors=[auth.AuthInterceptor(
                issuer_public_key=lambda: self.client.coordinator_public_key if self.client
                else b"",
                swarm_id=lambda: self.client.swarm_id if self.client else "",
                is_member=lambda pid: not (self.view and pid in self.view.revoked),
                key_only_methods=frozenset(),
            )],
        )
        from peer.services import StageService, StateService, SyncService

        pbg.add_StageServicer_to_server(StageService(self), self.server)
        pbg.add_SyncServicer_to_server(SyncService(self), self.server)
        pbg.add_StateServicer_to_server(StateService(self), self.server)
        port = self.server.add_insecure_port(f"{args.host}:{args.port}")
        if port == 0:
            raise SystemExit(f"cannot listen on {args.host}:{args.port}: address in use?")
        await self.server.start()
        self.address = f"{args.advertise or args.host}:{port}"
        coordinator = args.coordinator or await self._discover()
        self.client = CoordinatorClient(coordinator, self.identity, token=self.token)
        bench = await asyncio.to_thread(self._benchmark)
        joined = await self.client.join(bench, self.address, stage_hint=args.stage)
        self.spec = joined.spec
        self.view = joined.view
        log.info("joined %s as %s at %s: stage %d of %d, sync %s", coordinator,
                 self.peer_id[:8], self.address, joined.stage, self.spec.pipeline.stages,
                 self.spec.sync.mode)
        # Heartbeat from now on: taking the stage (a download) may outlast the lease.
        self._heartbeats = asyncio.ensure_future(self.heartbeat_loop())
        await self._take_stage(joined.stage)

    async def _discover(self) -> str:
        from protocols.discovery import discover

        found = await discover(timeout=5.0)
        if not found:
            raise SystemExit("no coordinator given and none found by mDNS on this LAN: pass "
                             "--coordinator HOST:PORT or set SHOAL_COORDINATOR")
        host, port, _ = found[0]
        return f"{host}:{port}"

    def _benchmark(self) -> Benchmark:
        device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
        # A cheap fixed probe: peers of one run compare like with like.
        t0 = time.perf_counter()
        a = torch.randn(256, 256)
        for _ in range(20):
            a = torch.tanh(a @ a / 16)
        rate = 20 / (time.perf_counter() - t0) / max(self.args.throttle, 1e-3)
        if getattr(self.args, "simulate_speed", 0.0) > 0:
            rate = self.args.simulate_speed
        return Benchmark(samples_per_s=rate, device=device,
                         memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    async def _take_stage(self, stage: int) -> None:
        """Hold `stage`: download it from a live replica; or, when the view says the stage lost
        every replica after training, rebuild it without one (CheckFree / CheckFree+ / snapshot,
        peer/recovery/rebuild.py); or start from the initial weights when it is the first holder."""
        if self.host is not None:
            self.host.close()
        self.state = "syncing"
        self.host = StageHost(self.spec, stage, device=_device(self.args.device))
        self._state_hash = (-1, "")
        self.host.throttle = max(self.args.throttle, 1.0)
        self.host.simulated_rate = getattr(self.args, "simulate_speed", 0.0)
        self.mode = make_sync_mode(self.spec)
        self.rounds = SyncRounds(
            me=self.peer_id, stage=stage, mode=self.mode,
            candidates=lambda: sorted(set(self.live_replicas(stage)) | {self.peer_id}),
            exchange_stub=lambda pid: pbg.SyncStub(self.channel(self.address_of(pid))).Exchange,
            departed=self.departed_peers,
            counter=self.counter, timeout=self.spec.sync.timeout_s,
            max_bytes=self.sync_limits().max_total_bytes,
        )
        rebuilt = False
        sources = [p for p in self.live_replicas(stage) if p != self.peer_id]
        if stage > 0 and not sources and self.stage_info(stage, "rebuild"):
            rebuilt = await recovery.rebuild(self)
        elif not (sources and await self.download_state(sources)):
            if sources and stage > 0 and self.stage_info(stage, "step"):
                # The view listed replicas that did not answer: likely dead, lease not yet
                # expired. Wait for the coordinator to expire them, then rebuild or copy.
                rebuilt = await recovery.await_sources_or_rebuild(self, stage)
            elif sources:
                log.warning("stage %d: no replica could give its state", stage)
            if not rebuilt and not sources and getattr(self.args, "init_model", None):
                await self.host.run(self.host.load_exported, self.args.init_model)
                log.info("stage %d: starting from the exported model in %s", stage,
                         self.args.init_model)
        self.state_hash = await self.host.run(self.host.state_hash)
        self.state = "rebuilt" if rebuilt else "training"
        if stage == 0 and self.driver is None:
            from peer.pipeline.driver import Driver

            if self.spec.sync.mode == "spsa":
                from peer.sync.spsa_driver import SpsaDriver as Driver  # forward-only step loop

            self.driver = Driver(self)

    def stage_info(self, stage: int, field: str) -> object:
        """A field of `stage`'s StageInfo in the current view (rebuild, step, grad_norm, ...)."""
        info = next((s for s in (self.view.stages if self.view else ()) if s.stage == stage),
                    None)
        return getattr(info, field) if info is not None else None

    def catch_up(self, step: int) -> bool:
        """Adopt a later step when this is the stage's only replica (peer/recovery/rebuild.py)."""
        from peer.recovery.rebuild import catch_up

        return catch_up(self, step)

    async def download_state(self, sources: list[str]) -> bool:
        host = self.host
        for pid in sources:
            try:
                stub = pbg.StateStub(self.channel(self.address_of(pid)))
                call = stub.Download(pb.StateRequest(
                    stage=host.stage, include_optimizer=True,
                    ledger_snapshot=self.spec.sync.mode == "spsa"), timeout=120)
                header, arrays = await wire.receive(call.__aiter__(), self.state_limits(),
                                                    self.counter, "state")
                await host.run(host.load_state_arrays, arrays)
                got = await host.run(host.state_hash)
                if got != header.meta.get("state_hash"):
                    raise StageError(f"state from {pid[:8]} hashes to {got[:12]}, it claimed "
                                     f"{header.meta.get('state_hash', '')[:12]}")
                log.info("stage %d: downloaded state at step %d from %s (hash %s)", host.stage,
                         host.step, pid[:8], got[:12])
                if hasattr(self.mode, "catch_up"):  # SPSA: replay the ledger from the snapshot
                    self.mode.forget_checkpoints()
                    await self.mode.catch_up(self, 0)
                return True
            except (grpc.aio.AioRpcError, StageError, KeyError, ValueError,
                    RuntimeError) as exc:
                log.warning("state download from %s failed: %s", pid[:8], exc)
        return False

    def fall_behind(self, why: str) -> None:
        """This replica missed a step: stop serving and re-download the stage."""
        if self._resync_task and not self._resync_task.done():
            return
        log.warning("stage %d replica is behind (%s): re-downloading", self.host.stage, why)
        self.state = "syncing"

        async def resync() -> None:
            async with self.step_lock:
                sources = [p for p in self.live_replicas(self.host.stage) if p != self.peer_id]
                if await self.download_state(sources):
                    self.state_hash = await self.host.run(self.host.state_hash)
                self.state = "training"

        self._resync_task = asyncio.ensure_future(resync())

    # ------------------------------------------------------------------ steps

    async def sync_step(self, step: int) -> pb.StepDone:
        """Synchronise this replica's stage for `step` and apply the aggregate."""
        async with self.step_lock:
            host = self.host
            if step != host.step + 1:
                return pb.StepDone(step=step, stage=host.stage, stepped=False,
                                   detail=f"replica is after step {host.step}")
            if not self.mode.exchanges(step):  # a local step (DiLoCo inner): nothing on the wire
                for mb in list(host.pending):
                    host.forget(mb)
                norm = await host.run(self.mode.apply, host, {}, dict(LOCAL_STEP))
                self.state_hash = await host.run(host.state_hash)
                return pb.StepDone(step=step, stage=host.stage, included=1,
                                   state_hash=self.state_hash, grad_norm=norm, stepped=True)
            if getattr(self.mode, "delayed", False):  # async DiLoCo: the round runs behind
                from peer.sync.diloco_delayed import outer_step_async

                return await outer_step_async(self, step)
            arrays, meta = await host.run(self.mode.contribution, host)
            meta = {**meta, "state_hash": self.state_hash}  # of step - 1: compared in the round
            try:
                result, rmeta = await self.rounds.run(step, (meta, arrays))
            except SyncFailed as exc:
                self.fall_behind(str(exc))
                return pb.StepDone(step=step, stage=host.stage, stepped=False, detail=str(exc))
            for mb in list(host.pending):  # graphs of this step cannot outlive its weights
                host.forget(mb)
            norm = await host.run(self.mode.apply, host, result, rmeta)
            self.state_hash = await host.run(host.state_hash)
            if self.peer_id in rmeta.get("diverged", "").split(","):
                self.fall_behind(f"round {step} began from other weights than the stage's "
                                 "lowest-id replica")
            return pb.StepDone(step=step, stage=host.stage, included=self.rounds.last_included,
                               state_hash=self.state_hash, grad_norm=norm, stepped=True)

    # ------------------------------------------------------------------ heartbeats

    async def heartbeat_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                res = await self.client.heartbeat(self.stats())
                view = res.view
                if view is not None:
                    self.view = view
                if res.action == "move" and self.host and res.stage != self.host.stage:
                    log.info("coordinator moves this peer to stage %d", res.stage)
                    async with self.step_lock:
                        await self._take_stage(res.stage)
                self._check_hash()
                await recovery.snapshot_if_due(self)
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("heartbeat failed: %s", exc)
            self._report_progress()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), self.spec.membership.heartbeat_s)
            self._write_metrics()

    def _report_progress(self) -> None:
        if self.host is None:
            return
        stats, now = self.stats(), time.monotonic()
        if self.progress.due(stats, now):
            fields = self.progress.take(self.host.stage, stats, now)
            log.info("%s", progress_text(fields), extra={"fields": fields})

    def _check_hash(self) -> None:
        """Replicas at the same step must hash equal; the one that is not the lowest id yields."""
        if (self.view is None or self.host is None or self.state not in READY_STATES
                or not self.state_hash):
            return
        peers = [p for p in self.view.replicas(self.host.stage)
                 if p.state in READY_STATES and p.stats.step == self.host.step
                 and p.stats.state_hash and p.peer_id != self.peer_id]
        differing = [p for p in peers if p.stats.state_hash != self.state_hash]
        if differing and min(p.peer_id for p in peers) < self.peer_id:
            self.fall_behind(f"state hash differs from {differing[0].peer_id[:8]} at step "
                             f"{self.host.step}")
            return
        # The two rules below act only on a replica whose step has not moved for a while: the
        # view's steps are heartbeat snapshots, and a swarm that steps several times a second
        # shows replicas "two steps apart" that are only reporting at different moments.
        now = time.monotonic()
        if self._step_seen[0] != self.host.step:
            self._step_seen = (self.host.step, now)
        if now - self._step_seen[1] < max(3 * self.spec.membership.heartbeat_s,
                                          self.spec.sync.timeout_s):
            return
        # A replica that joined mid-step (or missed rounds) may be steps behind the others of
        # its stage for good: callers refuse its step. Two steps is not a race of one round.
        ahead = [p for p in self.view.replicas(self.host.stage) if p.state in READY_STATES
                 and p.peer_id != self.peer_id and p.stats.step >= self.host.step + 2]
        if ahead:
            self.fall_behind(f"{ahead[0].peer_id[:8]} is at step {ahead[0].stats.step}, this "
                             f"replica after step {self.host.step}")
            return
        # No replica of this stage is newer, but the other stages are steps ahead (the newer
        # replicas of this stage died): no download can help, and every caller refuses this
        # step, so the swarm would stall. Carry on at the swarm's step with these weights.
        # (Never under SPSA: its replicas must replay the ledger's codes instead.)
        swarm_step = max((p.stats.step for p in self.view.peers if p.state in READY_STATES
                          and p.stage != self.host.stage), default=0)
        if swarm_step >= self.host.step + 2 and not hasattr(self.mode, "offer"):
            log.warning("stage %d: every replica is behind the swarm (after step %d, the others "
                        "after %d)", self.host.stage, self.host.step, swarm_step)
            self.catch_up(swarm_step)  # peer/recovery.catch_up: under the same conditions

    def _write_metrics(self) -> None:
        if not self.metrics_file or not self.driver:
            return
        rows = self.driver.take_metrics()
        if rows:
            with open(self.metrics_file, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")

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
        await self.start()
        tasks = [self._heartbeats]
        watcher = SpotWatcher(self.args.spot_url, on_notice=self.drain)
        tasks.append(asyncio.ensure_future(watcher.run(self.stopped)))
        if self.driver:
            tasks.append(asyncio.ensure_future(self.driver.run()))
        await self.stopped.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.stop(1.0)
        for ch in self._channels.values():
            await ch.close()
        await self.client.close()
        if self.host:
            self.host.close()
        log.info("peer %s stopped", self.peer_id[:8])
        return 0


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    return choice


def main(args: argparse.Namespace) -> int:
    threads = int(os.environ.get("SHOAL_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def _main() -> int:
        return await PeerDaemon(args).run()

    return asyncio.run(_main())
