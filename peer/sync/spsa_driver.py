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

import numpy as np
import torch

from optim import spsa
from optim.errors import NonFiniteValues
from peer.consistency import joined_at, winning_hash
from peer.context import PeerContext
from peer.pipeline.data import inputs_targets
from peer.pipeline.driver import Driver, MicrobatchDropped
from peer.pipeline.router import NoReplicaAvailable
from peer.sync.spsa import FORWARD_KIND, KIND, SpsaMode, fetch_ledger, from_codes
from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.spsa")
POLL_S = 0.05


async def post_codes(d: PeerContext, step: int, codes: bytes, expect: list[str],
                     timeout: float) -> tuple[pb.SpsaLedgerStep, int]:
    """Post this replica's codes of `step`; wait until the coordinator closes the step.

    Returns the closed step and the ledger's next step. With `expect` empty (what the driver
    sends) the coordinator waits for the stage-0 replicas its membership sees training, so a
    post is a step and its codes.
    """
    req = pb.SpsaPost(step=step, codes=codes, expect=expect)
    reply = await d.client.post_spsa(req)
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


class SpsaDriver(Driver):
    """Stage 0 of an SPSA run (see the module docstring)."""

    def __init__(self, ctx: PeerContext, mode: SpsaMode, data: str | None = None,
                 router_kind: str = "swarm") -> None:
        super().__init__(ctx, data, router_kind)
        self.d: PeerContext = ctx
        self.mode = mode
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
            meta = {"mode": FORWARD_KIND, "j": str(j)}
            for hop, s in enumerate(path):
                h, _ = await self._hop("forward", s, step, mb_id, path, hop, h, meta=meta)
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

    # ------------------------------------------------------------------ end of step

    async def _end_step(self, step: int, closed: pb.SpsaLedgerStep) -> None:
        d = self.d
        replicas = self.block_replicas()
        peers = list(closed.peers)
        field_bytes = pb.StepEnd(spsa=closed.codes).ByteSize()
        checks = dict(self._check)
        self._check.clear()

        def request(pid: str, stage: int) -> pb.StepEnd:
            req = pb.StepEnd(step=step, sender=d.peer_id, stage0_replicas=peers,
                             stage_replicas=replicas[stage], spsa=closed.codes)
            if stage in checks:
                req.spsa_check_step, req.spsa_check_hash = checks[stage]
            return req

        def count(pid: str, req: pb.StepEnd) -> None:
            check = pb.StepEnd(spsa_check_step=req.spsa_check_step,
                               spsa_check_hash=req.spsa_check_hash)
            d.counter.add(KIND, sent=field_bytes + check.ByteSize())

        self.mode.offer(step, peers, closed.codes.codes)
        answers = await self.close_step(step, replicas, request, d.sync_step(step), count)
        if step % self.mode.hash_every == 0:  # the K-step hash check
            for s, pids in replicas.items():
                got = {p: r.state_hash for p, r in answers.items()
                       if r is not None and r.stepped and p in pids and r.state_hash}
                if got:
                    agreed = winning_hash(got, joined_at(self.d.view))
                    self._check[s] = (step, bytes.fromhex(agreed)[:16])
                if len(set(got.values())) > 1:
                    log.warning("spsa step %d: stage %d replicas hash differently (%d hashes); "
                                "the minority re-downloads", step, s, len(set(got.values())))
