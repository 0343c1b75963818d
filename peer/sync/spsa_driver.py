"""The stage-0 step loop of `sync.mode = "spsa"`: forward passes only, one byte per direction.

`SpsaDriver` takes the place of peer/pipeline/driver.py's `Driver` on a stage-0 replica of an SPSA
run and reuses its loop, swarm view refresh and data shard; one step is (design in
peer/sync/spsa.py):
1. catch up first: if the coordinator's ledger already closed steps this replica has not
   applied (it joined late, or a post of its own came too late), apply them;
2. for each direction j and microbatch: embed under +-eps z (stacked [h+; h-]), one Forward
   hop per block stage of the path (the replica with the smallest expected finish time; a
   failed hop goes to the next best), then L+ and L-; a microbatch that cannot finish is dropped
   and counted;
3. g_j = (mean L+ - mean L-) / 2eps over the finished microbatches, one int8 code each (a
   non-finite g abstains: the post carries no codes), posted to the coordinator, which answers
   the step's closed set; a step in which no microbatch finished is not posted at all but
   retried (the loop waits a second): the other stage-0 replicas close it without this one;
4. EndStep with the closed set to every live block replica, and the same set applied here.

Paths are always full depth, whatever `pipeline.skip_ratio` says: every replica of every stage
applies every code, which is right only for stages the direction's streams went through (a
skipped stage would need the route in the message; not built).

Bytes on the wire under kind `sync:spsa` (peer/pipeline/wire.py's counter, in heartbeats and
summary.json): the serialized PostSpsa request and its reply, and per block replica the `spsa`
field of StepEnd (tag, length and J bytes per peer). The rest of StepEnd (step, sender, the
replica lists) is the step barrier every sync mode sends, counted nowhere, as for the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch

from optim import spsa
from optim.errors import NonFiniteValues
from peer.pipeline import wire
from peer.pipeline.data import inputs_targets
from peer.pipeline.driver import MAX_HOP_ATTEMPTS, Driver, MicrobatchDropped
from peer.pipeline.router import NoReplicaAvailable
from peer.sync.spsa import KIND, SpsaMode, from_codes
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg

if TYPE_CHECKING:
    from peer.daemon import PeerDaemon

log = logging.getLogger("shoal.spsa")
POLL_S = 0.05


async def fetch_ledger(d: PeerDaemon, from_step: int, to_step: int = 0) -> pb.SpsaLedgerReply:
    """Closed steps [from_step, to_step) from the coordinator (counted under sync:spsa)."""
    req = pb.SpsaLedgerRequest(from_step=from_step, to_step=to_step)
    reply = await d.client._call("GetSpsaLedger", req, 30.0, 2.0)
    d.counter.add(KIND, sent=req.ByteSize(), received=reply.ByteSize())
    return reply


async def post_codes(d: PeerDaemon, step: int, codes: bytes, expect: list[str],
                     timeout: float) -> tuple[pb.SpsaLedgerStep, int]:
    """Post this replica's codes of `step`; wait until the coordinator closes the step.

    Returns the closed step and the ledger's next step. With `expect` empty (what the driver
    sends) the coordinator waits for the stage-0 replicas its membership sees training, so a
    post is a step and its codes.
    """
    req = pb.SpsaPost(step=step, codes=codes, expect=expect)
    reply = await d.client._call("PostSpsa", req, 30.0, 2.0)
    d.counter.add(KIND, sent=req.ByteSize(), received=reply.ByteSize())
    deadline = time.monotonic() + timeout + 10
    while True:
        for st in reply.steps:
            if st.step == step:
                return st, reply.next_step
        if reply.next_step > step or time.monotonic() > deadline:
            raise RuntimeError(f"spsa step {step} is not in the coordinator's ledger "
                               f"(holds {reply.base_step}..{reply.next_step - 1})")
        await asyncio.sleep(POLL_S)
        reply = await fetch_ledger(d, step, step + 1)


def majority_hash(hashes: dict[str, str]) -> str:
    """The hash most replicas report; a tie goes to the lowest peer id's hash."""
    counts: dict[str, int] = {}
    for h in hashes.values():
        counts[h] = counts.get(h, 0) + 1
    best = max(counts.values())
    return next(hashes[p] for p in sorted(hashes) if counts[hashes[p]] == best)


class SpsaDriver(Driver):
    """Stage 0 of an SPSA run (see the module docstring)."""

    def __init__(self, daemon: PeerDaemon) -> None:
        super().__init__(daemon)
        assert isinstance(daemon.mode, SpsaMode)
        self.mode: SpsaMode = daemon.mode
        self._ledger_next = 0  # the ledger's next step, as of this replica's last post
        self._check: dict[int, tuple[int, bytes]] = {}  # stage -> (K-step, majority hash[:16])

    async def _one_step(self) -> None:
        d = self.d
        spec = d.spec
        await self._refresh()
        if self._ledger_next != d.host.step + 1:  # 1. steps the ledger closed without us
            async with d.step_lock:
                await self.mode.catch_up(d, 0)
        data, stage0 = self._my_shard()
        step = d.host.step + 1
        mb = spec.pipeline.microbatch
        n_mb = max(1, math.ceil(spec.pipeline.target_batch / (len(stage0) * mb)))
        bytes0 = d.counter.total_sent() + d.counter.total_received()
        t0 = time.monotonic()
        window = max(2, 2 * (spec.pipeline.stages + 1))
        sem = asyncio.Semaphore(window)
        scale = self.mode.scale_for(d.host)

        async def one(i: int, j: int) -> tuple[float, float] | None:
            async with sem:
                if self._stop:
                    return None
                batch = data.batch(mb, spec.run.seed, step * 10007 + i)
                return await self._microbatch(step, i, j, batch)

        codes: list[int] = []
        done = 0  # forward pairs finished, over every direction
        unique = 0  # microbatches seen (each direction evaluates the same ones)
        losses: list[float] = []
        for j in range(self.mode.directions):
            pairs = [x for x in await asyncio.gather(*(one(i, j) for i in range(n_mb)))
                     if x is not None]
            done += len(pairs)
            unique = max(unique, len(pairs))
            if not pairs:
                codes = []
                break
            lp = float(np.mean([p for p, _ in pairs]))
            lm = float(np.mean([m for _, m in pairs]))
            losses.append((lp + lm) / 2)
            try:
                g = spsa.projected_gradient(lp, lm, spec.sync.spsa.eps)
            except NonFiniteValues as exc:
                log.warning("step %d direction %d abstains: %s", step, j, exc)
                codes = []
                break
            seed = self.mode.seed(step, d.peer_id, j)
            codes.append(spsa.encode(g, scale, spsa.dither_for(seed)))
        if not losses:  # nothing finished: a step without data must not advance the swarm
            if self._stop:
                return
            raise NoReplicaAvailable(f"no microbatch of step {step} finished ({self.dropped} "
                                     "dropped so far); waiting for the block replicas")
        closed, self._ledger_next = await post_codes(d, step, from_codes(codes), [],
                                                     spec.sync.timeout_s)
        await self._end_step(step, closed)
        dt = time.monotonic() - t0
        tokens = unique * mb * spec.model.seq_len
        self.tokens_per_s = tokens / max(dt, 1e-6)
        if losses:
            self.last_loss = float(np.mean(losses))
        wire_bytes = d.counter.total_sent() + d.counter.total_received() - bytes0
        self._metrics.append({
            "t": time.time(), "step": step, "loss": self.last_loss if losses else None,
            "microbatches": n_mb * self.mode.directions, "completed": done, "tokens": tokens,
            "seconds": dt, "tokens_per_s": self.tokens_per_s, "bytes": wire_bytes,
            "dropped": self.dropped, "spsa_codes": codes, "spsa_scale": scale,
        })

    # ------------------------------------------------------------------ one microbatch

    async def _microbatch(self, step: int, i: int, j: int, batch: torch.Tensor
                          ) -> tuple[float, float] | None:
        d = self.d
        host = d.host
        mode = self.mode
        mb_id = f"{d.peer_id[:12]}-{step}-{i}-{j}"
        tokens, targets = inputs_targets(batch)
        seed = mode.seed(step, d.peer_id, j)
        self._inflight += 1
        try:
            t0 = time.monotonic()
            h = await host.run(mode.embed_pair, host, seed, tokens)
            compute = time.monotonic() - t0
            path = list(range(1, d.spec.pipeline.stages + 1))
            for hop, s in enumerate(path):
                h = await self._spsa_hop(s, step, j, mb_id, path, hop, h)
            t0 = time.monotonic()
            pair = await host.run(mode.loss_pair, host, seed, h, targets)
            d.note_compute(int(tokens.shape[0]), compute + time.monotonic() - t0)
            self.done += 1
            return pair
        except MicrobatchDropped as exc:
            self.dropped += 1
            log.info("microbatch %s dropped: %s", mb_id, exc)
            return None
        finally:
            self._inflight -= 1

    async def _spsa_hop(self, stage: int, step: int, j: int, mb_id: str, path: list[int],
                        hop: int, x: torch.Tensor) -> torch.Tensor:
        d = self.d
        samples = int(x.shape[0])
        tried: set[str] = set()
        for _ in range(MAX_HOP_ATTEMPTS):
            now = time.monotonic()
            try:
                target = self.router.choose(stage, samples, now, exclude=tried)
                address = d.address_of(target)
            except (KeyError, NoReplicaAvailable) as exc:
                raise MicrobatchDropped(f"stage {stage}: {exc}") from exc
            header = pb.CallHeader(kind="forward", microbatch_id=mb_id, step=step, stage=stage,
                                   path=path, hop=hop, sender=d.peer_id, sent_at=time.time())
            header.meta["mode"] = "spsa"
            header.meta["j"] = str(j)
            t0 = time.monotonic()
            try:
                _, arrays = await wire.call_tensors(
                    pbg.StageStub(d.channel(address)).Forward, header,
                    {"x": x.float().numpy()},
                    encoding=wire.ACTIVATION_ENCODINGS[d.spec.pipeline.activations],
                    limits=d.activation_limits(), counter=d.counter, kind="activations",
                    timeout=self.router.timeout_for(target, samples, backward=False))
                self.router.record(target, samples, time.monotonic() - t0, time.monotonic())
                return torch.from_numpy(arrays["x"].copy())
            except grpc.aio.AioRpcError as exc:
                tried.add(target)
                self.hop_failed(target, samples, t0, exc)
                log.info("spsa forward of %s on %s failed: %s", mb_id, target[:8],
                         exc.code().name)
        raise MicrobatchDropped(f"stage {stage}: no replica answered ({len(tried)} tried)")

    # ------------------------------------------------------------------ end of step

    async def _end_step(self, step: int, closed: pb.SpsaLedgerStep) -> None:
        d = self.d
        timeout = d.spec.sync.timeout_s * 3 + 10
        replicas = {s: d.live_replicas(s) for s in range(1, d.spec.pipeline.stages + 1)}
        stage_of = {pid: s for s, pids in replicas.items() for pid in pids}
        peers = list(closed.peers)
        field_bytes = pb.StepEnd(spsa=closed.codes).ByteSize()

        checks = dict(self._check)
        self._check.clear()

        async def end(pid: str) -> pb.StepDone | None:
            req = pb.StepEnd(step=step, sender=d.peer_id, stage0_replicas=peers,
                             stage_replicas=replicas[stage_of[pid]], spsa=closed.codes)
            check = pb.StepEnd()
            if stage_of[pid] in checks:
                check.spsa_check_step, check.spsa_check_hash = checks[stage_of[pid]]
                req.MergeFrom(check)
            try:
                stub = pbg.StageStub(d.channel(d.address_of(pid)))
                d.counter.add(KIND, sent=field_bytes + check.ByteSize())
                return await stub.EndStep(req, timeout=timeout)
            except (grpc.aio.AioRpcError, KeyError) as exc:
                log.warning("EndStep(%d) to %s failed: %s", step, pid[:8], exc)
                return None

        self.mode.offer(step, peers, closed.codes.codes)
        pids = list(stage_of)
        results = await asyncio.gather(d.sync_step(step), *(end(p) for p in pids))
        own = results[0]
        if not own.stepped:
            log.warning("stage 0 did not step at %d: %s", step, own.detail)
        if step % self.mode.hash_every == 0:  # the K-step hash check
            for s in replicas:
                got = {p: r.state_hash for p, r in zip(pids, results[1:], strict=True)
                       if r is not None and r.stepped and stage_of[p] == s and r.state_hash}
                if got:
                    self._check[s] = (step, bytes.fromhex(majority_hash(got))[:16])
                if len(set(got.values())) > 1:
                    log.warning("spsa step %d: stage %d replicas hash differently (%d hashes); "
                                "the minority re-downloads", step, s, len(set(got.values())))
