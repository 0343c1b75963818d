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

Verified SPSA (`sync.spsa.verify` > 0, coordinator/spsa_verify.py): at the start of a step the
driver asks the ledger which contributions it recomputes there (`check_peers`), runs each
contributor's batch (its shard as this driver's view of the stage-0 set places it) under the
contributor's seeds alongside its own microbatches (Forward meta `of`), encodes them exactly as
the contributor must have, and posts them with its own codes (`SpsaPost.checks`, with its own
shard). A contribution whose microbatches did not all finish abstains, so every posted one is
checkable.

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
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch

from optim import spsa
from optim.errors import NonFiniteValues
from peer.consistency import joined_at, winning_hash
from peer.context import PeerContext
from peer.pipeline.data import Shard, inputs_targets, shard
from peer.pipeline.driver import Driver, MicrobatchDropped
from peer.pipeline.router import NoReplicaAvailable
from peer.sync.spsa import (
    FORWARD_KIND,
    KIND,
    OF_KEY,
    SpsaMode,
    fetch_ledger,
    from_codes,
    to_codes,
)
from protocols import shoal_pb2 as pb

log = logging.getLogger("shoal.spsa")
POLL_S = 0.05
#: test/bench hook (bench/spsa_verify.py): a stage-0 peer started with this set posts uniformly
#: random codes instead of its own (it still computes them, and verifies others honestly)
LIE_ENV = "SHOAL_TEST_SPSA_LIE"


async def post_codes(d: PeerContext, step: int, codes: bytes, expect: list[str],
                     timeout: float, shard: tuple[int, int] = (0, 0),
                     checks: list[pb.SpsaCheck] | None = None,
                     on_reply: Callable[[pb.SpsaLedgerReply], None] | None = None
                     ) -> tuple[pb.SpsaLedgerStep, int]:
    """Post this replica's codes of `step`; wait until the coordinator closes the step.

    Returns the closed step and the ledger's next step; `on_reply` sees the reply that had it
    (verified SPSA: it carries the caller's checks of the next step). With `expect` empty (what
    the driver sends) the coordinator waits for the stage-0 replicas its membership sees
    training, so a post is a step and its codes.
    """
    req = pb.SpsaPost(step=step, codes=codes, expect=expect, shard=shard[0], shards=shard[1],
                      checks=checks or [])
    reply = await d.client.post_spsa(req)
    d.counter.add(KIND, sent=req.ByteSize(), received=reply.ByteSize())
    deadline = time.monotonic() + timeout + 10
    while True:
        for st in reply.steps:
            if st.step == step:
                if on_reply is not None:
                    on_reply(reply)
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
        self._other_shards: dict[tuple[int, int], Shard] = {}  # verified contributors' shards
        self._next_checks: tuple[int, list[str]] = (0, [])  # (step, contributors to verify)
        lie = os.environ.get(LIE_ENV, "")
        self._lie = random.Random(f"{lie}/{ctx.peer_id}") if lie else None

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
        verify = spec.sync.spsa.verify > 0
        checks = await self._checks_to_do(step, stage0) if verify else []

        async def one(of: str, batches: Shard, i: int, j: int) -> tuple[float, float] | None:
            async with sem:
                if self._stop:
                    return None
                batch = batches.batch(mb, spec.run.seed, step * 10007 + i)
                return await self._microbatch(step, i, j, batch, of)

        async def contribution(of: str, batches: Shard) -> list[list[tuple[float, float]]]:
            return [[x for x in await asyncio.gather(*(one(of, batches, i, j)
                                                       for i in range(n_mb))) if x is not None]
                    for j in range(self.mode.directions)]

        me = d.peer_id
        results = await asyncio.gather(contribution(me, data),
                                       *(contribution(x, self._shard_of(x, stage0))
                                         for x in checks))
        own = results[0]
        done = sum(len(pairs) for pairs in own)  # forward pairs finished, over every direction
        unique = max(len(pairs) for pairs in own)  # each direction evaluates the same batches
        codes, losses = self._encode(step, me, own, scale, n_mb if verify else 0)
        if not losses:  # nothing finished: a step without data must not advance the swarm
            if self._stop:
                return
            raise NoReplicaAvailable(f"no microbatch of step {step} finished ({self.dropped} "
                                     "dropped so far); waiting for the block replicas")
        honest = list(codes)
        if self._lie is not None and codes:  # test/bench hook: this peer posts random scalars
            codes = [self._lie.randint(-spsa.CODE_MAX, spsa.CODE_MAX) for _ in codes]
        recomputed = []
        for x, pairs in zip(checks, results[1:], strict=True):
            got, _ = self._encode(step, x, pairs, scale, n_mb)
            if got:  # every microbatch of the contributor's batch finished: comparable
                recomputed.append(pb.SpsaCheck(peer=x, codes=from_codes(got),
                                               shard=stage0.index(x), shards=len(stage0)))
        closed, self._ledger_next = await post_codes(
            d, step, from_codes(codes), [], spec.sync.timeout_s,
            (stage0.index(me), len(stage0)), recomputed, self._keep_checks)
        if closed.flagged:
            log.warning("spsa step %d: verification struck the codes of %s", step,
                        ", ".join(p[:12] for p in closed.flagged))
        await self._end_step(step, closed)
        diffs = self._check_diffs(closed, recomputed)
        dt = time.monotonic() - t0
        tokens = unique * mb * spec.model.seq_len
        self.tokens_per_s = tokens / max(dt, 1e-6)
        self.last_loss = float(np.mean(losses))
        wire_bytes = d.counter.total_sent() + d.counter.total_received() - bytes0
        self._metrics.append({
            "t": time.time(), "step": step, "loss": self.last_loss,
            "microbatches": n_mb * self.mode.directions, "completed": done, "tokens": tokens,
            "seconds": dt, "tokens_per_s": self.tokens_per_s, "bytes": wire_bytes,
            "dropped": self.dropped, "spsa_codes": codes, "spsa_scale": scale,
            "spsa_honest_codes": honest, "spsa_checked": checks,
            "spsa_recomputed": [len(c.codes) > 0 for c in recomputed],
            "spsa_flagged": list(closed.flagged), "spsa_peers": list(closed.peers),
            "spsa_check_diff": diffs,
        })

    def _check_diffs(self, closed: pb.SpsaLedgerStep, recomputed: list[pb.SpsaCheck]
                     ) -> dict[str, int]:
        """For the contributions this peer recomputed and the step kept: the largest code
        difference between what they posted and what this peer got (fp noise; measured)."""
        out = {}
        j_of = self.mode.directions
        posted = to_codes(closed.codes.codes)
        for c in recomputed:
            if c.peer in closed.peers:
                i = list(closed.peers).index(c.peer)
                out[c.peer] = max(abs(a - b) for a, b in
                                  zip(posted[i * j_of:(i + 1) * j_of], to_codes(c.codes),
                                      strict=True))
        return out

    def _encode(self, step: int, of: str, pairs_by_j: list[list[tuple[float, float]]],
                scale: float, need: int) -> tuple[list[int], list[float]]:
        """The J codes of `of`'s contribution from its (L+, L-) pairs per direction, and the
        mean losses; no codes (abstain) if a direction has no pair, fewer than `need` pairs or a
        non-finite g."""
        codes: list[int] = []
        losses: list[float] = []
        abstain = False
        for j, pairs in enumerate(pairs_by_j):
            if not pairs:
                return [], losses
            lp = float(np.mean([p for p, _ in pairs]))
            lm = float(np.mean([m for _, m in pairs]))
            losses.append((lp + lm) / 2)
            try:
                g = spsa.projected_gradient(lp, lm, self.d.spec.sync.spsa.eps)
            except NonFiniteValues as exc:
                log.warning("step %d direction %d of %s abstains: %s", step, j, of[:12], exc)
                abstain = True
                continue
            abstain = abstain or len(pairs) < need  # verified: only a whole batch is checkable
            codes.append(spsa.encode(g, scale, spsa.dither_for(self.mode.seed(step, of, j))))
        return ([] if abstain else codes), losses

    def _keep_checks(self, reply: pb.SpsaLedgerReply) -> None:
        self._next_checks = (reply.check_step, list(reply.check_peers))

    async def _checks_to_do(self, step: int, stage0: list[str]) -> list[str]:
        """Verified SPSA: the contributions the coordinator assigned this peer at `step` (from
        the reply that closed the previous step, else asked for)."""
        check_step, peers = self._next_checks
        if check_step != step:
            reply = await fetch_ledger(self.d, step, step)
            check_step, peers = reply.check_step, list(reply.check_peers)
        if check_step != step:
            return []
        return [x for x in peers if x in stage0 and x != self.d.peer_id]

    def _shard_of(self, peer: str, stage0: list[str]) -> Shard:
        """`peer`'s data shard as this replica's view of the stage-0 set places it."""
        key = (stage0.index(peer), len(stage0))
        got = self._other_shards.get(key)
        if got is None:
            if len(self._other_shards) > 16:
                self._other_shards.clear()
            got = self._other_shards[key] = shard(self.corpus, key[0], key[1],
                                                  self.d.spec.model.seq_len)
        return got

    # ------------------------------------------------------------------ one microbatch

    async def _microbatch(self, step: int, i: int, j: int, batch: torch.Tensor, of: str = ""
                          ) -> tuple[float, float] | None:
        """(L+, L-) of one microbatch of direction j of `of`'s contribution (default: ours;
        another peer's when verifying it: the block replicas derive its seed from meta "of")."""
        d = self.d
        host = d.host
        mode = self.mode
        of = of or d.peer_id
        mb_id = f"{d.peer_id[:12]}-{step}-{i}-{j}" + ("" if of == d.peer_id else f"-v{of[:12]}")
        tokens, targets = inputs_targets(batch)
        seed = mode.seed(step, of, j)
        self._inflight += 1
        try:
            t0 = time.monotonic()
            h = await host.run(mode.embed_pair, host, seed, tokens)
            compute = time.monotonic() - t0
            path = list(range(1, d.spec.pipeline.stages + 1))
            meta = {"mode": FORWARD_KIND, "j": str(j)}
            if of != d.peer_id:
                meta[OF_KEY] = of
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
