"""`sync.mode = "spsa"` on a replica: forward-only shared-seed SPSA (ALGORITHMS.md §4).

The math is optim/spsa.py (counter-hash Rademacher z, int8 codes on a ledger-derived scale,
int32 accumulation); this module is what a replica of any stage does with it. The step loop of
stage 0 is peer/sync/spsa_driver.py; the store that fixes each step's message set is
coordinator/ledger.py.

How one step t goes (design):
1. Each stage-0 replica p draws seeds sigma_j = seed_for(run, t, p, j), j < J
   (`sync.spsa.samples_per_step`). Per microbatch it embeds the tokens twice, under theta0 + eps*z
   and theta0 - eps*z, and sends both streams, stacked on the batch axis ([h+; h-]), down the
   path; the Forward call carries meta mode=spsa and j, never the seed: a block replica derives
   sigma_j from (run, t, sender, j) itself. Each block replica perturbs only its own slice
   (`block_pair`), runs h+ under +eps z and h- under -eps z, and restores the exact saved bytes of
   its fp32 weights after each (never +eps, -2eps, +eps). Tensor ids are "<stage>:<parameter
   name>" (block names hold the global layer index), the same on every replica of a stage.
   The Forward header's meta "mode" is `FORWARD_KIND`: the mode owns the name of its stream.
   A verifier recomputing another peer's contribution (verified SPSA, peer/sync/spsa_driver.py)
   adds meta `OF_KEY` = that peer's id, and the replica derives the seed from it instead of the
   sender: the same path machinery, the contributor's stream bit for bit.
2. Stage 0 computes L+ and L- (`loss_pair`), averages them over its microbatches, takes
   g = (L+ - L-) / 2eps and encodes it as one int8 code on the ledger's scale for step t, with
   the seed's dither (unbiased stochastic rounding).
3. It posts its J codes to the coordinator (PostSpsa); the coordinator closes step t once every
   expected stage-0 replica posted (or after sync.timeout_s) and answers the closed set M_t.
4. It sends M_t with EndStep (field `spsa`: peers = stage0_replicas, J bytes each) to every
   replica of every block stage, and applies M_t to its own stage. Every replica `offer`s M_t and
   `apply`s it: int32 sum of code*z over M_t, one float multiply and one subtraction, so
   replicas stay bit-identical whatever order messages arrive in; the scale for t+1 is then
   derived from M_t (optim.spsa.Ledger) and kept in `mode_state["spsa.scale"]` so it travels
   with a snapshot. An EndStep needs no other replica's: the closed set is the whole agreement.

Catching up and checking: every `sync.spsa.hash_every` (K) steps a replica keeps a checkpoint of
its state and its hash, and reports the hash in its StepDone. The stage-0 driver takes each
block stage's majority hash (a tie goes to the lowest peer id's) and sends its first 16 bytes
with the next EndStep (`spsa_check_step`, `spsa_check_hash`); a replica whose hash at that step
differs has drifted: it re-downloads (the daemon's `fall_behind`).
A joiner or a drifted replica downloads a live replica's checkpoint (StateRequest
ledger_snapshot) and replays the coordinator's ledger from it (`catch_up`); a replica that
receives EndStep(t) while after step s < t - 1 replays s+1..t-1 the same way instead of
re-downloading.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from optim import spsa
from peer.context import PeerContext
from peer.pipeline.stage_host import StageError, StageHost
from peer.sync.base import Checkpoint, SyncMode
from peer.sync.rounds import LOCAL_STEP, Arrays, Meta
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.spsa")
KIND = "sync:spsa"
FORWARD_KIND = "spsa"  # the Forward meta "mode" of a perturbed [h+; h-] stream
OF_KEY = "of"  # Forward meta: the contributor whose direction a verifier recomputes
SCALE_KEY = "spsa.scale"
Z_CACHE_SEEDS = 4  # seeds whose z a replica keeps (one step's J directions, plus slack)
Z_CACHE_MAX_NUMEL = 50_000_000  # above this, regenerate z per use instead of caching it
#: test hook (tests/test_spsa_swarm.py): after this step, this replica corrupts one weight once
DRIFT_ENV = "SHOAL_TEST_SPSA_DRIFT_AT"


class CatchUpFailed(RuntimeError):
    """The ledger no longer holds the steps this replica misses: re-download the stage."""


def run_id(spec: RunSpec) -> str:
    """The run's name in every seed: replicas of one run draw the same z."""
    return f"{spec.run.name}/{spec.run.seed}"


def tensor_ids(host: StageHost) -> list[str]:
    return [f"{host.stage}:{name}" for name, _ in host.module.named_parameters()]


def to_codes(data: bytes) -> list[int]:
    """int8 codes (two's complement) from the wire."""
    return [int(c) for c in np.frombuffer(data, dtype=np.int8)]


def from_codes(codes: Sequence[int]) -> bytes:
    return np.asarray(codes, dtype=np.int8).tobytes()


async def fetch_ledger(ctx: PeerContext, from_step: int, to_step: int = 0
                       ) -> pb.SpsaLedgerReply:
    """Closed steps [from_step, to_step) from the coordinator (counted under sync:spsa)."""
    req = pb.SpsaLedgerRequest(from_step=from_step, to_step=to_step)
    reply = await ctx.client.spsa_ledger(req)
    ctx.counter.add(KIND, sent=req.ByteSize(), received=reply.ByteSize())
    return reply


class SpsaMode(SyncMode):
    """The replica side of shared-seed SPSA (see the module docstring): no rounds; each step's
    closed message set comes with EndStep (`carries_step`, `take_step_end`) and every step is
    applied locally (`exchanges` stays False), so it never fast-forwards; joiners start from a
    hash-checked checkpoint and replay the ledger (`joiner_checkpoint`, `after_download`)."""

    name = "spsa"
    joins_from_checkpoint = True
    fast_forwards = False
    forward_kinds = frozenset({FORWARD_KIND})

    def __init__(self, spec: RunSpec) -> None:
        s = spec.sync.spsa
        sched, total = spec.schedule("sync.spsa.schedule")
        self.config = spsa.SpsaConfig(lr=s.lr, eps=s.eps, initial_scale=s.initial_scale,
                                      perturbation=s.perturbation,
                                      schedule=(sched.warmup_steps, sched.decay, total,
                                                sched.final))
        self.run_id = run_id(spec)
        self.directions = s.samples_per_step
        self.hash_every = s.hash_every
        self._ledgers: weakref.WeakKeyDictionary[StageHost, spsa.Ledger] = (
            weakref.WeakKeyDictionary())
        self._z: weakref.WeakKeyDictionary[StageHost, OrderedDict[int, list[torch.Tensor]]] = (
            weakref.WeakKeyDictionary())
        self._offered: dict[int, tuple[tuple[str, ...], bytes]] = {}
        self.checkpoint: tuple[int, dict[str, np.ndarray], str] | None = None
        self.check_hashes: dict[int, str] = {}  # K-multiple step -> this replica's hash there
        self.replayed = 0  # steps applied from the coordinator's ledger (catch-up)
        self._drift_at = int(os.environ.get(DRIFT_ENV, "0") or 0)

    # ------------------------------------------------------------------ SyncMode hooks

    def joiner_checkpoint(self) -> Checkpoint | None:
        """The last checkpoint (step, state arrays, hash), served to joiners (ledger_snapshot)."""
        return self.checkpoint

    async def after_download(self, ctx: PeerContext) -> None:
        """Replay the ledger from the downloaded checkpoint; old checkpoints are void."""
        self.forget_checkpoints()
        await self.catch_up(ctx, 0)

    def carries_step(self, request: pb.StepEnd) -> bool:
        return request.HasField("spsa")

    async def replay(self, ctx: PeerContext, to_step: int) -> int:
        return await self.catch_up(ctx, to_step)

    def take_step_end(self, ctx: PeerContext, request: pb.StepEnd) -> str | None:
        """Offer the closed set; count its bytes; check the hash the driver sent along."""
        self.offer(request.step, list(request.stage0_replicas), request.spsa.codes)
        check = pb.StepEnd(spsa_check_step=request.spsa_check_step,
                           spsa_check_hash=request.spsa_check_hash)
        ctx.counter.add(KIND, received=pb.StepEnd(spsa=request.spsa).ByteSize()
                        + check.ByteSize())
        if request.spsa_check_step and self.drifted(request.spsa_check_step,
                                                    request.spsa_check_hash):
            return (f"spsa hash check: state after step {request.spsa_check_step} differs "
                    "from the stage's majority")
        return None

    def serve_forward(self, host: StageHost, header: pb.CallHeader, x: torch.Tensor
                      ) -> torch.Tensor:
        """A block stage's [h+; h-] under +-eps z of direction j (the seed is derived here)."""
        if header.meta.get("mode") != FORWARD_KIND or not header.meta.get("j", "0").isdigit():
            return super().serve_forward(host, header, x)
        of = header.meta.get(OF_KEY) or header.sender  # a verifier recomputes `of`'s direction
        if len(of) > 128:
            raise StageError(f"spsa forward: meta {OF_KEY!r} is not a peer id")
        seed = self.seed(header.step, of, int(header.meta.get("j", "0")))
        return self.block_pair(host, seed, x)

    # ------------------------------------------------------------------ the ledger

    def seed(self, step: int, peer: str, j: int) -> int:
        return spsa.seed_for(self.run_id, step, peer, j)

    def offer(self, step: int, peers: Sequence[str], codes: bytes) -> None:
        """The closed message set of `step`, for `apply`; the first offer of a step stands."""
        if len(codes) != len(peers) * self.directions:
            raise StageError(f"spsa step {step}: {len(codes)} code bytes for {len(peers)} peers "
                             f"x {self.directions} directions")
        self._offered.setdefault(step, (tuple(peers), bytes(codes)))
        for old in [s for s in self._offered if s < step - 64]:
            del self._offered[old]

    def has_offer(self, step: int) -> bool:
        return step in self._offered

    def _ledger(self, host: StageHost) -> spsa.Ledger:
        """This replica's ledger view, rebuilt from the stage's state when they disagree."""
        led = self._ledgers.get(host)
        if led is None or led.next_step != host.step + 1:
            t = host.mode_state.get(SCALE_KEY)
            scale = float(t.reshape(-1)[0]) if t is not None else self.config.initial_scale
            led = self._ledgers[host] = spsa.Ledger(self.run_id, self.config,
                                                    base_step=host.step + 1, base_scale=scale)
        return led

    def scale_for(self, host: StageHost) -> float:
        """The scale of the codes of the next step (host.step + 1)."""
        return self._ledger(host).scale_at(host.step + 1)

    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        """Apply the offered closed set of step host.step + 1 (compute thread)."""
        step = host.step + 1
        closed = self._offered.pop(step, None)
        if closed is None:
            raise StageError(f"spsa step {step}: no closed message set was offered")
        peers, data = closed
        codes, j_of = to_codes(data), self.directions
        messages = [spsa.Message(step, peer, codes[i * j_of + j], j)
                    for i, peer in enumerate(peers) for j in range(j_of)]
        led = self._ledger(host)
        scale = led.scale_at(step)
        led.record(step, messages)
        params = list(host.module.parameters())
        led.apply_step(params, step, tensor_ids(host))
        led.compact(step + 1)
        host.mode_state[SCALE_KEY] = torch.tensor([led.scale_at(step + 1)], dtype=torch.float64)
        norm = math.sqrt(sum(spsa.decode(c, scale) ** 2 for c in codes) / len(codes)
                         ) if codes else 0.0
        host.finish_step(norm)
        self._z.pop(host, None)
        if self._drift_at and host.step == self._drift_at:  # the drift a hash check must catch
            self._drift_at = 0
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-3
            log.warning("test hook %s: corrupted one weight after step %d", DRIFT_ENV, host.step)
        if host.step % self.hash_every == 0:
            arrays = {k: np.array(v, copy=True) for k, v in host.state_arrays(True).items()}
            self.checkpoint = (host.step, arrays, host.state_hash())
            self.check_hashes[host.step] = self.checkpoint[2]
            for old in sorted(self.check_hashes)[:-4]:
                del self.check_hashes[old]
        return norm

    def drifted(self, step: int, majority: bytes) -> bool:
        """Whether this replica's hash after `step` differs from the stage's majority."""
        own = self.check_hashes.get(step)
        return own is not None and bytes.fromhex(own)[: len(majority)] != majority

    def forget_checkpoints(self) -> None:
        """After a download: this replica's old checkpoints must not be served any more."""
        self.checkpoint = None
        self.check_hashes.clear()

    # ------------------------------------------------------------------ catching up

    async def catch_up(self, ctx: PeerContext, to_step: int) -> int:
        """Replay the coordinator's ledger until this replica is after `to_step` (0: newest).

        Call with the daemon's step lock held (or before the replica serves). Returns the steps
        replayed; raises CatchUpFailed when the ledger lacks them.
        """
        host, done = ctx.host, 0
        assert host is not None
        while True:
            reply = await fetch_ledger(ctx, host.step + 1, to_step + 1 if to_step else 0)
            if to_step == 0:
                to_step = reply.next_step - 1
            if host.step >= to_step:
                break
            if not reply.steps or reply.steps[0].step != host.step + 1:
                raise CatchUpFailed(f"the ledger holds steps {reply.base_step}.."
                                    f"{reply.next_step - 1}, this replica needs {host.step + 1}")
            for st in reply.steps:
                if st.step != host.step + 1 or st.step > to_step:
                    break
                self.offer(st.step, list(st.peers), st.codes.codes)
                await host.run(self.apply, host, {}, dict(LOCAL_STEP))
                done += 1
        if done:
            self.replayed += done
            log.info("stage %d: replayed %d steps from the ledger, now after step %d",
                     host.stage, done, host.step)
        return done

    # ------------------------------------------------------------------ perturbed compute

    def _zs(self, host: StageHost, seed: int) -> list[torch.Tensor]:
        cache = self._z.setdefault(host, OrderedDict())
        zs = cache.get(seed)
        if zs is None:
            kind = self.config.perturbation
            zs = [spsa.direction(kind, seed, tid, p.numel(), 0, p.device).view_as(p)
                  for tid, p in zip(tensor_ids(host), host.module.parameters(),
                                                strict=True)]
            if sum(p.numel() for p in host.module.parameters()) <= Z_CACHE_MAX_NUMEL:
                cache[seed] = zs
                while len(cache) > Z_CACHE_SEEDS:
                    cache.popitem(last=False)
        return zs

    @contextmanager
    def perturbed(self, host: StageHost, seed: int, sign: int) -> Iterator[None]:
        """theta <- theta + sign*eps*z for the body; then the exact saved bytes come back."""
        params = list(host.module.parameters())
        for p in params:
            if p.dtype != torch.float32:
                raise StageError(f"spsa needs float32 master weights, stage has {p.dtype}")
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, z in zip(params, self._zs(host, seed), strict=True):
                    p.add_(z * float(sign * self.config.eps))
            yield
        finally:
            spsa.restore(params, saved)

    @torch.no_grad()
    def block_pair(self, host: StageHost, seed: int, x2: torch.Tensor) -> torch.Tensor:
        """A block stage on [h+; h-]: h+ under theta + eps z, h- under theta - eps z."""
        host.check_activation(x2, "spsa forward input")
        if x2.shape[0] % 2:
            raise StageError(f"spsa forward needs [h+; h-] stacked, got batch {x2.shape[0]}")
        n = x2.shape[0] // 2
        x = x2.to(host.device, torch.float32)
        outs = []
        for sign, half in ((1, x[:n]), (-1, x[n:])):
            with self.perturbed(host, seed, sign), host.autocast():
                outs.append(host.module(half).float())
        return torch.cat(outs).cpu()

    @torch.no_grad()
    def embed_pair(self, host: StageHost, seed: int, tokens: torch.Tensor) -> torch.Tensor:
        """Stage 0: [embed+(tokens); embed-(tokens)]."""
        outs = []
        for sign in (1, -1):
            with self.perturbed(host, seed, sign), host.autocast():
                outs.append(host.module.embed(tokens.to(host.device)).float())
        return torch.cat(outs).cpu()

    @torch.no_grad()
    def loss_pair(self, host: StageHost, seed: int, h2: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[float, float]:
        """Stage 0: (L+, L-) of [h+; h-], each head under its own perturbation."""
        host.check_activation(h2, "spsa last activation")
        n = targets.shape[0]
        if h2.shape[0] != 2 * n:
            raise StageError(f"spsa head got batch {h2.shape[0]} for {n} targets")
        h = h2.to(host.device, torch.float32)
        t = targets.to(host.device).long()
        losses = []
        for sign, half in ((1, h[:n]), (-1, h[n:])):
            with self.perturbed(host, seed, sign), host.autocast():
                loss, _ = host.module.head_loss(half, t)
            losses.append(float(loss))
        return losses[0], losses[1]
