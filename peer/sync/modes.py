"""The low-bandwidth sync modes of the peer daemon: DeMo, DiLoCo, and robust allreduce.

Each class implements peer/sync/rounds.py's `SyncMode` over the math in optim/ (nothing re-derived
here): `contribution` (this replica, compute thread) -> `aggregate` (the round's leader,
deterministic in peer-id order) -> `apply` (every replica, the same aggregate bytes).

- `DemoMode` (ALGORITHMS.md §5) replaces AdamW for the stage. contribution: this replica's mean
  gradient (gradient sums / samples, clipped to `optim.grad_clip`) through
  `optim.demo.DemoState.compress` (weight decay, momentum, top-k DCT, error feedback); packets go
  out as uint16 indices with fp32 values, or with packed sign bits and one scale per chunk
  (`sync.demo.sign_bits`, Psyche's encoding). DeMo is an all-gather, not an all-reduce (every
  replica picks its own indices), so the leader's aggregate is the valid replicas' packets
  relayed unchanged in peer-id order; apply decodes them with `optim.demo.aggregate` (mean over
  the replicas that chose each index) and steps with `optim.demo.apply` (p -= lr*sign).
  Weighting: each replica's packet counts once, as in the reference (a chooser-average has no
  weights); the gradient inside is a per-sample mean, so a replica that saw more samples is less
  noisy, not louder. A replica whose momentum is still all zero (new, no samples yet) does not
  vote; one that saw no samples this step but has momentum does, as in the reference. The
  decoupled momentum is local by design and a joining replica starts it at zero.
- `DilocoMode` (ALGORITHMS.md §6): every step is an inner AdamW step on this replica's own mean
  gradient (`sync.diloco.inner_lr`, `inner_weight_decay`, betas (0.9, 0.95)), with nothing on the
  wire (`exchanges` is False). Every H = `inner_steps` steps, after that step's inner step, an
  outer round: delta = theta_shared - theta_local, flattened and quantized
  (`optim.diloco.quantize`: int8 / fp16 / fp32), averaged by the leader (`optim.diloco.average`,
  optionally robust) and re-quantized with the same codec, so the reply is as small as the upload;
  every replica then takes the outer Nesterov step (`optim.diloco.OuterOptimizer`) on the shared
  weights, which become its parameters. The shared weights and the outer momentum live in
  `StageHost.mode_state` under `shared.`: they travel to a joining replica, and they are what
  `state_hash` covers (parameters differ between outer steps by design). The inner AdamW state
  travels as ordinary optimizer state. A round with no valid delta resets every replica to the
  shared weights without an outer step.
- `RobustAllreduceMode`: dense allreduce with `sync.allreduce.aggregator` = clipped_mean or
  trimmed_mean (`optim.robust.aggregate` over each replica's per-sample mean gradient, so the
  replicas count equally: the price of robustness).

Robust options (allreduce and diloco): `trim` is a fraction per side, rounded up to at least
one replica when > 0 (optim.robust lowers it for groups too small to trim); `clip_norm` bounds
one replica's update (L2) for clipped_mean, or <= 0 means the median of the replicas' norms.
Non-finite or malformed contributions are always dropped; meta says who is in an aggregate
(`included`) and who was dropped and why (`dropped`).

Invariant: `aggregate` never raises (no valid part -> meta `skip`), depends only on the parts by
peer id, and `apply` of the same bytes leaves every replica's stage bit-identical.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from optim import demo, diloco, robust
from optim.errors import OptimError, ShapeMismatch
from peer.pipeline.stage_host import StageHost
from peer.sync.rounds import AllreduceMode, Arrays, Meta
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.sync")
INT8_BLOCK = 4096  # elements per int8 scale of a pseudo-gradient (optim.diloco's default)
Parts = Mapping[str, tuple[Meta, Arrays]]
#: a DeMo packet's fields on the wire, as `<param index>.<key>` (shape and chunk are the stage's)
WIRE_KEYS = {"indices": "i", "values": "v", "signs": "b", "scales": "c"}


def trim_count(trim: float, replicas: int) -> int:
    """Replicas trimmed per side for a fraction `trim`: at least one when trim > 0."""
    return max(1, math.ceil(trim * replicas)) if trim > 0 else 0


def _samples(meta: Meta) -> int:
    try:
        return int(meta.get("samples", "0"))
    except ValueError:
        return 0


def _dropped(dropped: Mapping[str, str]) -> str:
    return "; ".join(f"{rid}: {why}" for rid, why in sorted(dropped.items()))


def _skip(dropped: Mapping[str, str], why: str) -> tuple[Arrays, Meta]:
    log.warning("sync round skipped: %s (dropped: %s)", why, _dropped(dropped) or "none")
    return {}, {"skip": "1", "included": "", "dropped": _dropped(dropped), "detail": why}


def delta_to_wire(q: diloco.QuantizedDelta) -> Arrays:
    """A quantized pseudo-gradient as arrays, without the zero codes that pad its last block."""
    arrays = q.to_arrays()
    if q.quant == "int8":
        arrays["data"] = arrays["data"][: math.prod(q.shape)]
    return arrays


def delta_from_wire(arrays: Arrays, block: int = INT8_BLOCK) -> torch.Tensor:
    """Inverse of `delta_to_wire`, validated by `QuantizedDelta.from_arrays`; float32, 1-D."""
    data = np.asarray(arrays["data"])
    if data.dtype == np.int8:  # restore the padding (exact: padded values quantize to 0)
        if int(np.asarray(arrays["block"]).reshape(-1)[0]) != block:
            raise ShapeMismatch(f"int8 blocks of {arrays['block']} values; this run uses {block}")
        data = np.concatenate([data, np.zeros(-data.size % block, dtype=np.int8)])
    q = diloco.QuantizedDelta.from_arrays({**arrays, "data": data})
    return diloco.dequantize(q).reshape(-1)


def _mean_grads(host: StageHost) -> list[torch.Tensor]:
    """This replica's per-sample mean gradient, one tensor per parameter (zeros if none)."""
    n = host.samples
    return [p.grad.detach() / n if p.grad is not None and n else
            torch.zeros_like(p, dtype=torch.float32) for p in host.module.parameters()]


# ---------------------------------------------------------------------------------- DeMo


@dataclass
class _DemoLocal:
    state: demo.DemoState
    norm: float = 0.0


class DemoMode:
    """DeMo over the leader-collects round: an all-gather of top-k DCT packets, sign step."""

    name = "demo"

    def __init__(self, spec: RunSpec) -> None:
        d = spec.sync.demo
        self.config = demo.DemoConfig(lr=d.lr, beta=d.beta, topk=d.topk, chunk=d.chunk,
                                      weight_decay=d.weight_decay, sign_bits=d.sign_bits,
                                      value_bound=d.value_bound)
        self.grad_clip = spec.optim.grad_clip
        self._local: weakref.WeakKeyDictionary[StageHost, _DemoLocal] = (
            weakref.WeakKeyDictionary())
        # The stage's parameter shapes, learned from this replica's own contribution (a leader
        # always contributes before it aggregates): lets the leader refuse bad packets early.
        self._shapes: list[tuple[int, ...]] | None = None

    def exchanges(self, step: int) -> bool:
        return True

    def _state(self, host: StageHost) -> _DemoLocal:
        local = self._local.get(host)
        if local is None:
            local = self._local[host] = _DemoLocal(
                demo.DemoState(list(host.module.parameters()), self.config))
        return local

    def contribution(self, host: StageHost) -> tuple[Arrays, Meta]:
        local = self._state(host)
        params = list(host.module.parameters())
        self._shapes = [tuple(p.shape) for p in params]
        grads = _mean_grads(host)
        local.norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        if local.norm > self.grad_clip:  # the local clip DeMo's reference (OLMo) applies
            grads = [g * (self.grad_clip / (local.norm + 1e-6)) for g in grads]
        packets = local.state.compress(params, grads, self.config.lr * host.lr_scale)
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
            return _skip(dropped, "no replica sent a usable DeMo packet")
        if dropped:
            log.warning("demo round: relaying %d replicas; dropped %s", len(relayed),
                        _dropped(dropped))
        return out, {"included": ",".join(relayed), "dropped": _dropped(dropped)}

    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        local = self._state(host)
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
                agg = demo.aggregate(packets, shapes, self.config)
                demo.apply(params, agg, self.config.lr * host.lr_scale)
            except OptimError as exc:
                log.warning("demo step %d applies nothing: %s", host.step + 1, exc)
        host.finish_step(local.norm)
        return local.norm


# ---------------------------------------------------------------------------------- DiLoCo


@dataclass
class _DilocoLocal:
    round_samples: int = 0  # samples this replica trained on since the last outer step
    norm: float = 0.0  # last inner gradient norm (pre-clip)


class DilocoMode:
    """DiLoCo: H local inner AdamW steps, then one quantized outer round (see the docstring)."""

    name = "diloco"

    def __init__(self, spec: RunSpec) -> None:
        d = spec.sync.diloco
        self.inner_steps, self.inner_lr = d.inner_steps, d.inner_lr
        self.inner_weight_decay = d.inner_weight_decay
        self.outer = diloco.OuterConfig(
            lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.outer_momentum > 0,
            quant=d.quant, int8_block=INT8_BLOCK)  # type: ignore[arg-type]
        self.aggregator, self.trim, self.clip_norm = d.aggregator, d.trim, d.clip_norm
        self.grad_clip = spec.optim.grad_clip
        self._local: weakref.WeakKeyDictionary[StageHost, _DilocoLocal] = (
            weakref.WeakKeyDictionary())
        self._numel: int | None = None  # the stage's parameter count, from own contribution

    def exchanges(self, step: int) -> bool:
        return step % self.inner_steps == 0

    def _state(self, host: StageHost) -> _DilocoLocal:
        return self._local.setdefault(host, _DilocoLocal())

    @staticmethod
    def shared_params(host: StageHost) -> list[torch.Tensor]:
        """The shared weights of the last outer step (taken from the parameters at first use)."""
        names = [n for n, _ in host.module.named_parameters()]
        if any(f"shared.param.{n}" not in host.mode_state for n in names):
            for n, p in host.module.named_parameters():
                host.mode_state[f"shared.param.{n}"] = p.detach().clone()
        return [host.mode_state[f"shared.param.{n}"] for n in names]

    def _inner_step(self, host: StageHost) -> float:
        """One local AdamW step on this replica's mean gradient; the step is not finished."""
        self.shared_params(host)  # the round's starting point exists before anything moves
        local = self._state(host)
        if host.samples == 0:
            local.norm = 0.0
            return 0.0
        params = list(host.module.parameters())
        for p in params:
            if p.grad is not None:
                p.grad.div_(host.samples)
        local.norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        for group in host.optimizer.param_groups:  # the mode owns the inner hyperparameters
            group["lr"] = self.inner_lr * host.lr_scale
            group["weight_decay"] = self.inner_weight_decay
        host.optimizer.step()
        local.round_samples += host.samples
        return local.norm

    def contribution(self, host: StageHost) -> tuple[Arrays, Meta]:
        self._inner_step(host)
        local = self._state(host)
        params = list(host.module.parameters())
        delta = diloco.pseudo_gradient(self.shared_params(host), params)
        flat = torch.cat([d.reshape(-1) for d in delta])
        self._numel = flat.numel()
        meta = {"samples": str(local.round_samples)}
        try:
            q = diloco.quantize(flat, self.outer.quant, self.outer.int8_block)
        except OptimError as exc:  # diverged inner steps: say so instead of sending garbage
            return {}, {**meta, "invalid": str(exc)}
        return delta_to_wire(q), meta

    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        deltas: dict[str, list[torch.Tensor]] = {}
        dropped: dict[str, str] = {}
        for rid in sorted(parts):
            meta, arrays = parts[rid]
            if meta.get("invalid"):
                dropped[rid] = meta["invalid"]
            elif _samples(meta) <= 0:
                dropped[rid] = "no samples this round"
            else:
                try:
                    deltas[rid] = [delta_from_wire(arrays, self.outer.int8_block)]
                except (ValueError, KeyError, IndexError) as exc:
                    dropped[rid] = f"bad pseudo-gradient: {exc}"
        if not deltas:
            return _skip(dropped, "no replica sent a usable pseudo-gradient")
        shapes = [(self._numel,)] if self._numel is not None else None
        try:
            agg = diloco.average(deltas, shapes, self.aggregator,  # type: ignore[arg-type]
                                 trim=trim_count(self.trim, len(deltas)),
                                 max_norm=self.clip_norm if self.clip_norm > 0 else None)
            q = diloco.quantize(agg.tensors[0], self.outer.quant, self.outer.int8_block)
        except OptimError as exc:
            return _skip(dropped, str(exc))
        dropped.update(agg.dropped)
        if dropped:
            log.warning("diloco round: averaged %d replicas; dropped %s", agg.count,
                        _dropped(dropped))
        samples = sum(_samples(parts[r][0]) for r in agg.included)
        return delta_to_wire(q), {"included": ",".join(agg.included),
                                  "dropped": _dropped(dropped),
                                  "detail": agg.detail, "samples": str(samples)}

    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        if meta.get("local") == "1":  # an inner step: nothing was exchanged
            norm = self._inner_step(host)
            host.finish_step(norm)
            return norm
        self.outer_step(host, result, meta)
        return self.restart_round(host)

    def restart_round(self, host: StageHost) -> float:
        """Every replica starts the next round from the shared weights; the step is over."""
        local = self._state(host)
        with torch.no_grad():
            for p, s in zip(host.module.parameters(), self.shared_params(host), strict=True):
                p.copy_(s)
        local.round_samples = 0
        host.finish_step(local.norm)
        return local.norm

    def outer_step(self, host: StageHost, result: Arrays, meta: Meta) -> None:
        """The outer Nesterov step of the shared weights on one round's average (none when the
        round was skipped or its average is unusable: every replica decides alike)."""
        params = list(host.module.parameters())
        shared = self.shared_params(host)
        avg = None
        if meta.get("skip") != "1" and result:
            try:
                flat = delta_from_wire(result, self.outer.int8_block)
                sizes = [p.numel() for p in params]
                if flat.numel() != sum(sizes):
                    raise ShapeMismatch(f"{flat.numel()} values for {sum(sizes)} parameters")
                avg = [t.reshape(p.shape) for t, p in zip(
                    torch.split(flat.to(params[0].device), sizes), params, strict=True)]
            except (ValueError, KeyError, IndexError) as exc:  # every replica decides alike
                log.warning("diloco step %d: average unusable (%s); no outer step",
                            host.step + 1, exc)
        if avg is not None:
            outer = diloco.OuterOptimizer(shared, self.outer)
            state = {k[13:]: v for k, v in host.mode_state.items()
                     if k.startswith("shared.outer.")}
            if state:
                outer.load_state_dict(state)
            outer.step(shared, avg)  # mutates the shared weights in place
            for key, value in outer.state_dict().items():
                # 1-element, not 0-d: the state hash views every tensor as bytes
                host.mode_state[f"shared.outer.{key}"] = value.reshape(value.shape or (1,)).to(
                    params[0].device)


# ---------------------------------------------------------------------------------- allreduce


class RobustAllreduceMode(AllreduceMode):
    """Dense allreduce whose average is clipped_mean or trimmed_mean over per-replica means."""

    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        usable = {r: p for r, p in parts.items() if _samples(p[0]) > 0}
        dropped = {r: "no samples this step" for r in set(parts) - set(usable)}
        if not usable:
            return _skip(dropped, "no replica saw a sample")
        # the parameter names most replicas sent (ties: the smallest id's) define the stage
        names_of = {r: tuple(sorted(usable[r][1])) for r in sorted(usable)}
        counts = Counter(names_of.values())
        names = next(n for r, n in names_of.items() if counts[n] == max(counts.values()))
        means: dict[str, list[torch.Tensor]] = {}
        for rid in sorted(usable):
            if names_of[rid] != names:
                dropped[rid] = "sent other parameters than the stage's"
                continue
            meta, arrays = usable[rid]
            n = np.float32(_samples(meta))
            means[rid] = [torch.from_numpy(np.asarray(arrays[k], dtype=np.float32) / n)
                          for k in names]
        try:
            agg = robust.aggregate(means, self.aggregator,  # type: ignore[arg-type]
                                   trim=trim_count(self.trim, len(means)),
                                   max_norm=self.clip_norm if self.clip_norm > 0 else None)
        except OptimError as exc:
            return _skip(dropped, str(exc))
        dropped.update(agg.dropped)
        if dropped:
            log.warning("allreduce round: %s of %d replicas; dropped %s", self.aggregator,
                        agg.count, _dropped(dropped))
        total = sum(_samples(parts[r][0]) for r in agg.included)
        out = {k: t.numpy() for k, t in zip(names, agg.tensors, strict=True)}
        return out, {"included": ",".join(agg.included), "dropped": _dropped(dropped),
                     "detail": agg.detail, "samples": str(total)}
