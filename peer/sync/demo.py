"""`sync.mode = "demo"`: DeMo, the decoupled-momentum optimizer (ALGORITHMS.md §5).

Not to be confused with `shoal demo` (shoal/local.py), the local swarm of the command line.

`DemoMode` replaces AdamW for the stage. contribution: this replica's mean gradient (gradient
sums / samples, clipped to `optim.grad_clip`) through `optim.demo.DemoState.compress` (weight
decay, momentum, top-k DCT, error feedback); packets go out as uint16 indices with fp32 values, or
with packed sign bits and one scale per chunk (`sync.demo.sign_bits`, Psyche's encoding). DeMo is
an all-gather, not an all-reduce (every replica picks its own indices), so the leader's aggregate
is the valid replicas' packets relayed unchanged in peer-id order; apply decodes them with
`optim.demo.aggregate` (mean over the replicas that chose each index) and steps with
`optim.demo.apply` (p -= lr*sign).

Robust rule (`sync.demo.aggregator`, default "mean" = the paper's chooser mean): with
"trimmed_mean" or "clipped_mean", apply combines the replicas' own decodes with
`optim.robust.aggregate` (optim/demo.py `aggregate`), `trim` a fraction per side rounded up to
at least one replica when > 0 (lowered by optim.robust for groups too small to trim) and
`clip_norm` the L2 bound (<= 0: the median of the replicas' norms), so one replica's packets
cannot set the sign of a weight alone. Every replica decides on the same relayed bytes.

Weighting: each replica's packet counts once, as in the reference (a chooser-average has no
weights); the gradient inside is a per-sample mean, so a replica that saw more samples is less
noisy, not louder. A replica whose momentum is still all zero (new, no samples yet) does not
vote; one that saw no samples this step but has momentum does, as in the reference. The
decoupled momentum is local by design and a joining replica starts it at zero.

Invariant: `aggregate` never raises (no valid part -> meta `skip`), depends only on the parts by
peer id, and `apply` of the same bytes leaves every replica's stage bit-identical.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from optim import demo
from optim.errors import OptimError
from peer.pipeline import lr
from peer.pipeline.stage_host import StageHost
from peer.sync.base import Parts, RoundMode, dropped_text, mean_grads, skipped, trim_count
from peer.sync.rounds import Arrays, Meta
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.sync")
#: a DeMo packet's fields on the wire, as `<param index>.<key>` (shape and chunk are the stage's)
WIRE_KEYS = {"indices": "i", "values": "v", "signs": "b", "scales": "c"}


@dataclass
class _DemoLocal:
    state: demo.DemoState
    norm: float = 0.0


class DemoMode(RoundMode):
    """DeMo, the decoupled-momentum optimizer (not `shoal demo`, the local swarm), over the
    leader-collects round: an all-gather of top-k DCT packets, sign step."""

    name = "demo"

    def __init__(self, spec: RunSpec) -> None:
        d = spec.sync.demo
        self.config = demo.DemoConfig(lr=d.lr, beta=d.beta, topk=d.topk, chunk=d.chunk,
                                      weight_decay=d.weight_decay, sign_bits=d.sign_bits,
                                      value_bound=d.value_bound)
        self.aggregator, self.trim, self.clip_norm = d.aggregator, d.trim, d.clip_norm
        self.grad_clip = spec.optim.grad_clip
        self._local: weakref.WeakKeyDictionary[StageHost, _DemoLocal] = (
            weakref.WeakKeyDictionary())
        # The stage's parameter shapes, learned from this replica's own contribution (a leader
        # always contributes before it aggregates): lets the leader refuse bad packets early.
        self._shapes: list[tuple[int, ...]] | None = None

    def _state(self, host: StageHost) -> _DemoLocal:
        local = self._local.get(host)
        if local is None:
            local = self._local[host] = _DemoLocal(
                demo.DemoState(list(host.module.parameters()), self.config))
        return local

    def _lr(self, host: StageHost) -> float:
        """This step's learning rate: the base, CheckFree's scale, the schedule's factor."""
        return (self.config.lr * host.lr_scale
                * lr.factor(host.spec, "sync.demo.schedule", host.step + 1))

    def contribution(self, host: StageHost) -> tuple[Arrays, Meta]:
        local = self._state(host)
        params = list(host.module.parameters())
        self._shapes = [tuple(p.shape) for p in params]
        grads = mean_grads(host)
        local.norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        if local.norm > self.grad_clip:  # the local clip DeMo's reference (OLMo) applies
            grads = [g * (self.grad_clip / (local.norm + 1e-6)) for g in grads]
        packets = local.state.compress(params, grads, self._lr(host))
        arrays: Arrays = {}
        for i, pk in enumerate(packets):
            arrays.update({f"{i}.{WIRE_KEYS[k]}": v for k, v in pk.to_arrays().items()
                           if k in WIRE_KEYS})
        meta = {"samples": str(host.samples)}
        if not any(bool(pk.decoded().any()) for pk in packets):
            meta["empty"] = "1"  # zero momentum (a fresh replica that saw nothing): no vote
        return arrays, meta

    def _packet(self, arrays: Arrays, prefix: str, shape: tuple[int, ...]) -> demo.DemoPacket:
        ch = demo.Chunking.of(shape, self.config.chunk)
        fields = {"shape": np.asarray(shape, dtype=np.int64),
                  "chunk": np.asarray((ch.c1, ch.c2), dtype=np.int64)}
        for key, short in WIRE_KEYS.items():
            if f"{prefix}{short}" in arrays:
                fields[key] = arrays[f"{prefix}{short}"]
        packet = demo.DemoPacket.from_arrays(fields)
        demo.validate_packet(packet, shape, self.config)
        return packet

    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        relayed: list[str] = []
        dropped: dict[str, str] = {}
        out: Arrays = {}
        for rid in sorted(parts):
            meta, arrays = parts[rid]
            if meta.get("empty") == "1":
                dropped[rid] = "zero momentum (no samples yet)"
                continue
            if self._shapes is not None:
                try:
                    for i, shape in enumerate(self._shapes):
                        self._packet(arrays, f"{i}.", shape)
                except (ValueError, KeyError) as exc:
                    dropped[rid] = f"bad packet: {exc}"
                    continue
            j = len(relayed)
            relayed.append(rid)
            out.update({f"{j}/{name}": a for name, a in arrays.items()})
        if not relayed:
            return skipped(dropped, "no replica sent a usable DeMo packet")
        if dropped:
            log.warning("demo round: relaying %d replicas; dropped %s", len(relayed),
                        dropped_text(dropped))
        return out, {"included": ",".join(relayed), "dropped": dropped_text(dropped)}

    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        self.update(host, result, meta)
        local = self._state(host)
        host.finish_step(local.norm)
        return local.norm

    def update(self, host: StageHost, result: Arrays, meta: Meta) -> None:
        """The sign step of one round's relayed packets (nothing for a skipped round), without
        closing the step. Compute thread."""
        params = list(host.module.parameters())
        relayed = [r for r in meta.get("included", "").split(",") if r]
        if meta.get("skip") != "1" and result and relayed:
            shapes = [tuple(p.shape) for p in params]
            packets: dict[str, list[demo.DemoPacket]] = {}
            for j, rid in enumerate(relayed):
                try:
                    packets[rid] = [self._packet(result, f"{j}/{i}.", s)
                                    for i, s in enumerate(shapes)]
                except (ValueError, KeyError) as exc:  # same bytes: every replica drops it too
                    log.warning("demo: packets of %s dropped: %s", rid, exc)
            try:
                agg = demo.aggregate(packets, shapes, self.config,
                                     self.aggregator,  # type: ignore[arg-type]
                                     trim=trim_count(self.trim, len(packets)),
                                     max_norm=self.clip_norm if self.clip_norm > 0 else None)
                demo.apply(params, agg, self._lr(host))
            except OptimError as exc:
                log.warning("demo step %d applies nothing: %s", host.step + 1, exc)
