"""Streaming DiLoCo in the peer (`sync.diloco.streaming_fragments = P > 0`): the stage's
parameters in P fragments that sync in turn, each round overlapped with the next inner steps and
merged tau steps later (ALGORITHMS.md §6b; the math is optim/diloco_streaming.py).

Every step is DiLoCo's inner AdamW step (peer/sync/diloco.py). After inner step t, with
H = `inner_steps`, tau = `streaming_delay`, alpha = `streaming_alpha`:
- if fragment p syncs at t (`Schedule.fragment_at`): delta_p = theta_global_p - theta_local_p is
  quantized (`sync.diloco.quant`, int4 for the paper's 4-bit wire) and round t starts in the
  background: an ordinary leader-collects round (peer/sync/rounds.py) keyed by its step, whose
  parts and aggregate carry meta `fragment` = p (one fragment syncs per step at most, so the
  step names the round; nothing new on the wire);
- if round t - tau is due (`Schedule.merge_at`; at the run's last step every pending round):
  it is awaited, the fragment's shared weights take the outer Nesterov step on its average with
  the fragment's own momentum, and the local fragment is merged:
  theta_local_p <- (1 - alpha) theta_local_p + alpha theta_global_p.
So each round moves 1/P of the stage, one every H/P steps, and costs the step loop nothing unless
it takes longer than tau steps.

State: the shared (global) weights `shared.param.<name>` and per fragment p the outer state
`shared.outer.<p>.steps` / `shared.outer.<p>.momentum.<j>` (one buffer per piece of a parameter
in the fragment) live in `StageHost.mode_state`, which a joining replica downloads and
`state_hash` covers. The local weights differ between replicas by design (alpha < 1 keeps part
of each replica's own drift). Merged rounds are kept (`SyncRounds.keep`) for replicas that missed
them.

Invariants: every replica applies the same aggregate bytes to the same fragment after the same
inner step, so the shared state and the outer momenta are bit-identical on every replica at every
step (the hash check in rounds and heartbeats relies on it). A replica whose round failed falls
behind and re-downloads. A replica that downloaded its stage mid-flight keeps only the pending
rounds the download does not already contain, and fetches a due round it never took part in from
a replica that kept it (else it re-downloads).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence

import torch

from optim import diloco
from optim.diloco_streaming import (
    FragmentOuter,
    Piece,
    Schedule,
    fragment_ranges,
    gather,
    merge,
    pieces,
)
from optim.errors import OptimError, ShapeMismatch
from peer.context import PeerContext
from peer.pipeline.stage_host import StageHost
from peer.sync.base import Parts, forget_pending
from peer.sync.diloco import DilocoMode, delta_from_wire, delta_to_wire
from peer.sync.rounds import Arrays, Meta, SyncFailed, SyncRounds
from protocols import shoal_pb2 as pb
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.sync")
RoundResult = tuple[Arrays, Meta]


class StreamingDilocoMode(DilocoMode):
    """Streaming DiLoCo: staggered fragment rounds, overlapped and merged (see the docstring)."""

    # a round is merged tau steps after it ran: a laggard fetches due rounds or downloads
    replays_rounds = False

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        d = spec.sync.diloco
        self.schedule = Schedule(d.inner_steps, d.streaming_fragments, d.streaming_delay,
                                 d.streaming_alpha)
        self.total_steps = spec.run.steps
        self.pending: dict[int, tuple[int, asyncio.Future]] = {}  # round step -> (fragment, run)
        self._frags: list[list[Piece]] | None = None
        # samples each fragment's local copy trained on since its last sync, per replica
        self._since: weakref.WeakKeyDictionary[StageHost, list[int]] = (
            weakref.WeakKeyDictionary())

    def exchanges(self, step: int) -> bool:
        return self.schedule.fragment_at(step) is not None

    def fragments(self, host: StageHost) -> list[list[Piece]]:
        """Each fragment's pieces of the stage's parameters (`optim.diloco_streaming`)."""
        if self._frags is None:
            sizes = [p.numel() for p in host.module.parameters()]
            self._frags = [pieces(sizes, s, e)
                           for s, e in fragment_ranges(sum(sizes), self.schedule.fragments)]
        return self._frags

    # ------------------------------------------------------------------ compute thread

    def inner_step(self, host: StageHost) -> float:
        """DiLoCo's inner step; every fragment's local copy counts the samples."""
        norm = self._inner_step(host)
        since = self._since.setdefault(host, [0] * self.schedule.fragments)
        for p in range(len(since)):
            since[p] += host.samples
        return norm

    def fragment_contribution(self, host: StageHost, fragment: int) -> tuple[Arrays, Meta]:
        """The inner step, then fragment `fragment`'s quantized pseudo-gradient (or `invalid`)."""
        self.inner_step(host)
        frag = self.fragments(host)[fragment]
        delta = (gather(self.shared_params(host), frag)
                 - gather(list(host.module.parameters()), frag))
        since = self._since[host]
        meta = {"samples": str(since[fragment]), "fragment": str(fragment)}
        since[fragment] = 0
        try:
            q = diloco.quantize(delta, self.outer.quant, self.outer.int8_block)
        except OptimError as exc:
            return {}, {**meta, "invalid": str(exc)}
        return delta_to_wire(q), meta

    def contribution(self, host: StageHost) -> tuple[Arrays, Meta]:
        raise NotImplementedError("streaming DiLoCo contributes per fragment: "
                                  "fragment_contribution(host, schedule.fragment_at(step))")

    def merge_rounds(self, host: StageHost, results: Sequence[tuple[int, RoundResult]]) -> float:
        """Outer-step each due fragment on its round's average and merge it into the local
        weights (in round order), then finish the step."""
        params = list(host.module.parameters())
        shared = self.shared_params(host)
        for fragment, (result, meta) in results:
            frag = self.fragments(host)[fragment]
            avg = self._average_of(host, fragment, result, meta)
            if avg is not None:
                prefix = f"shared.outer.{fragment}."
                # sync.diloco.outer_schedule, counted in whole-model rounds (H steps)
                outer = FragmentOuter(frag, self.scheduled_outer(host))
                state = {k[len(prefix):]: v for k, v in host.mode_state.items()
                         if k.startswith(prefix)}
                if state:
                    outer.load_state_dict(state)
                outer.step(shared, avg.to(shared[0].device))
                for key, value in outer.state_dict().items():
                    host.mode_state[prefix + key] = value.reshape(value.shape or (1,)).to(
                        shared[0].device)
            merge(params, shared, frag, self.schedule.alpha)
        norm = self._state(host).norm
        host.finish_step(norm)
        return norm

    def _average_of(self, host: StageHost, fragment: int, result: Arrays,
                    meta: Meta) -> torch.Tensor | None:
        """A round's decoded average, or None when it was skipped or is unusable (every replica
        decides alike from the same bytes)."""
        if meta.get("skip") == "1" or not result:
            return None
        try:
            if meta.get("fragment") != str(fragment):
                raise ShapeMismatch(f"the aggregate is of fragment {meta.get('fragment')!r}")
            flat = delta_from_wire(result, self.outer.int8_block)
            numel = sum(b - a for _, a, b in self.fragments(host)[fragment])
            if flat.numel() != numel:
                raise ShapeMismatch(f"{flat.numel()} values for a fragment of {numel}")
            return flat
        except (ValueError, KeyError, IndexError) as exc:
            log.warning("diloco step %d: fragment %d average unusable (%s); no outer step",
                        host.step + 1, fragment, exc)
            return None

    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        """A local step (no round, nothing due): the inner step alone."""
        if meta.get("local") != "1":
            raise ValueError("streaming DiLoCo applies its rounds in `step`, not in `apply`")
        self.inner_step(host)
        return self.merge_rounds(host, [])

    # ------------------------------------------------------------------ leader

    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        """The average of the parts of the round's fragment (the one most parts name, ties to
        the lowest id); a part of another fragment is dropped."""
        named: dict[str, int] = {}
        for meta, _ in parts.values():
            named[meta.get("fragment", "")] = named.get(meta.get("fragment", ""), 0) + 1
        fragment = min(named, key=lambda f: (-named[f], f)) if named else ""
        kept = {rid: (meta if meta.get("fragment") == fragment else
                      {**meta, "invalid": f"fragment {meta.get('fragment')!r}, the round's is "
                                          f"{fragment!r}"}, arrays)
                for rid, (meta, arrays) in parts.items()}
        numel = None
        if self._frags is not None and fragment.isdigit() and int(fragment) < len(self._frags):
            numel = sum(b - a for _, a, b in self._frags[int(fragment)])
        arrays, meta = self.average_parts(kept, numel)
        return arrays, {**meta, "fragment": fragment}

    # ------------------------------------------------------------------ event loop

    async def step(self, ctx: PeerContext, rounds: SyncRounds, step: int) -> pb.StepDone:
        """Inner step `step`; start this step's fragment round, merge the due ones."""
        host = ctx.host
        assert host is not None
        fragment = self.schedule.fragment_at(step)
        if fragment is None:
            await host.run(self.inner_step, host)
        else:
            arrays, meta = await host.run(self.fragment_contribution, host, fragment)
            meta = {**meta, "state_hash": ctx.state_hash}  # of step - 1: compared in the round
            task = asyncio.ensure_future(rounds.run(step, (meta, arrays)))
            task.add_done_callback(lambda t, s=step: _keep(rounds, s, t))
            self.pending[step] = (fragment, task)
        last = 0 < self.total_steps <= step
        due = sorted(s for s in self.pending if last or s + self.schedule.delay <= step)
        missed = self.schedule.merge_at(step)
        results: list[tuple[int, int, RoundResult]] = []
        if missed is not None and missed not in self.pending:
            got, _ = await rounds.fetch(missed)  # a round this replica did not take part in
            frag = self.schedule.fragment_at(missed)
            if got is None or frag is None:
                return self._behind(ctx, step, f"fragment round of step {missed} was not "
                                    "taken part in nor kept by any replica")
            results.append((missed, frag, got))
        for s in due:
            frag, task = self.pending.pop(s)
            try:
                results.append((s, frag, await task))
            except SyncFailed as exc:
                return self._behind(ctx, step, f"fragment {frag} round of step {s}: {exc}")
        forget_pending(host)  # graphs of this step cannot outlive its weights
        norm = await host.run(self.merge_rounds, host, [(f, r) for _, f, r in results])
        ctx.state_hash = await host.run(host.state_hash)
        for s, _, (_result, rmeta) in results:
            if ctx.peer_id in rmeta.get("diverged", "").split(","):
                ctx.fall_behind(f"round {s} began from other weights than the stage's "
                                "lowest-id replica")
                break
        return pb.StepDone(step=step, stage=host.stage,
                           included=rounds.last_included if results else 1,
                           state_hash=ctx.state_hash, grad_norm=norm, stepped=True)

    def _behind(self, ctx: PeerContext, step: int, why: str) -> pb.StepDone:
        """Drop every pending round (the download replaces the state they were for) and fall
        behind."""
        for _, task in self.pending.values():
            task.add_done_callback(_retrieve)
        self.pending.clear()
        ctx.fall_behind(why)
        assert ctx.host is not None
        return pb.StepDone(step=step, stage=ctx.host.stage, stepped=False, detail=why)

    async def after_download(self, ctx: PeerContext) -> None:
        """Forget the pending rounds the downloaded state already merged (due at or before its
        step); the later ones are this stage's still."""
        host = ctx.host
        assert host is not None
        for s in [s for s in self.pending if s + self.schedule.delay <= host.step]:
            self.pending.pop(s)[1].add_done_callback(_retrieve)


def _keep(rounds: SyncRounds, step: int, task: asyncio.Future) -> None:
    """Keep a completed round for the replicas that missed it (`SyncRounds.fetch`), as soon as
    it completes: one that joined meanwhile asks for it when it is due, which is when the
    others merge it."""
    if not task.cancelled() and task.exception() is None:
        rounds.keep(step, task.result(), "")


def _retrieve(task: asyncio.Future) -> None:
    """Read a dropped round's outcome, so that its failure is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()

