"""`sync.mode = "diloco"`: DiLoCo, H local inner steps and one quantized outer round
(ALGORITHMS.md §6).

Every step is an inner AdamW step on this replica's own mean gradient (`sync.diloco.inner_lr`,
`inner_weight_decay`, betas (0.9, 0.95)), with nothing on the wire (`exchanges` is False). Every
H = `inner_steps` steps, after that step's inner step, an outer round: delta = theta_shared -
theta_local, flattened and quantized (`optim.diloco.quantize`: int8 / fp16 / fp32), averaged by
the leader (`optim.diloco.average`, optionally robust: `aggregator`, `trim`, `clip_norm` as in
peer/sync/allreduce.py) and re-quantized with the same codec, so the reply is as small as the
upload; every replica then takes the outer Nesterov step (`optim.diloco.OuterOptimizer`) on the
shared weights, which become its parameters. The shared weights and the outer momentum live in
`StageHost.mode_state` under `shared.`: they travel to a joining replica, and they are what
`state_hash` covers (parameters differ between outer steps by design). The inner AdamW state
travels as ordinary optimizer state. A round with no valid delta resets every replica to the
shared weights without an outer step. The delayed variant is peer/sync/diloco_delayed.py.

Invariant: `aggregate` never raises (no valid part -> meta `skip`), depends only on the parts by
peer id, and `apply` of the same bytes leaves every replica's stage bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from optim import diloco
from optim.errors import OptimError, ShapeMismatch
from peer.pipeline import lr
from peer.pipeline.stage_host import StageHost
from peer.sync.base import Parts, RoundMode, dropped_text, samples_of, skipped, trim_count
from peer.sync.rounds import Arrays, Meta
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.sync")
INT8_BLOCK = 4096  # elements per int8 scale of a pseudo-gradient (optim.diloco's default)
INT4_BLOCK = 1024  # elements per int4 scale: 4 bytes of scale per 512 bytes of codes


def quant_block(quant: str, block: int = 0) -> int:
    """Values per scale of an int8/int4 pseudo-gradient (`sync.diloco.quant_block`, 0: default)."""
    return block or (INT4_BLOCK if quant == "int4" else INT8_BLOCK)


def delta_to_wire(q: diloco.QuantizedDelta) -> Arrays:
    """A quantized pseudo-gradient as arrays, without the zero codes that pad its last block."""
    arrays = q.to_arrays()
    if q.quant == "int8":
        arrays["data"] = arrays["data"][: math.prod(q.shape)]
    elif q.quant == "int4":  # two codes per byte
        arrays["data"] = arrays["data"][: -(-math.prod(q.shape) // 2)]
    return arrays


def delta_from_wire(arrays: Arrays, block: int = INT8_BLOCK) -> torch.Tensor:
    """Inverse of `delta_to_wire`, validated by `QuantizedDelta.from_arrays`; float32, 1-D."""
    data = np.asarray(arrays["data"])
    if data.dtype in (np.int8, np.uint8):  # restore the padding (exact: pads quantize to 0)
        if int(np.asarray(arrays["block"]).reshape(-1)[0]) != block:
            raise ShapeMismatch(f"blocks of {arrays['block']} values; this run uses {block}")
        per_block = block // 2 if data.dtype == np.uint8 else block
        data = np.concatenate([data, np.zeros(-data.size % per_block, dtype=data.dtype)])
    q = diloco.QuantizedDelta.from_arrays({**arrays, "data": data})
    return diloco.dequantize(q).reshape(-1)


@dataclass
class _DilocoLocal:
    round_samples: int = 0  # samples this replica trained on since the last outer step
    norm: float = 0.0  # last inner gradient norm (pre-clip)


class DilocoMode(RoundMode):
    """DiLoCo: H local inner AdamW steps, then one quantized outer round (see the docstring)."""

    name = "diloco"

    def __init__(self, spec: RunSpec) -> None:
        d = spec.sync.diloco
        self.inner_steps, self.inner_lr = d.inner_steps, d.inner_lr
        self.inner_weight_decay = d.inner_weight_decay
        self.outer = diloco.OuterConfig(
            lr=d.outer_lr, momentum=d.outer_momentum, nesterov=d.outer_momentum > 0,
            quant=d.quant, int8_block=quant_block(d.quant, d.quant_block))  # type: ignore[arg-type]
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
            group["lr"] = (self.inner_lr * host.lr_scale
                           * lr.factor(host.spec, "sync.diloco.inner_schedule", host.step + 1))
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
        return self.average_parts(parts, self._numel)

    def average_parts(self, parts: Parts, numel: int | None) -> tuple[Arrays, Meta]:
        """The quantized average of the parts' pseudo-gradients of `numel` values (None: not
        checked), or a skip; never raises."""
        deltas: dict[str, list[torch.Tensor]] = {}
        dropped: dict[str, str] = {}
        for rid in sorted(parts):
            meta, arrays = parts[rid]
            if meta.get("invalid"):
                dropped[rid] = meta["invalid"]
            elif samples_of(meta) <= 0:
                dropped[rid] = "no samples this round"
            else:
                try:
                    deltas[rid] = [delta_from_wire(arrays, self.outer.int8_block)]
                except (ValueError, KeyError, IndexError) as exc:
                    dropped[rid] = f"bad pseudo-gradient: {exc}"
        if not deltas:
            return skipped(dropped, "no replica sent a usable pseudo-gradient")
        shapes = [(numel,)] if numel is not None else None
        try:
            agg = diloco.average(deltas, shapes, self.aggregator,  # type: ignore[arg-type]
                                 trim=trim_count(self.trim, len(deltas)),
                                 max_norm=self.clip_norm if self.clip_norm > 0 else None)
            q = diloco.quantize(agg.tensors[0], self.outer.quant, self.outer.int8_block)
        except OptimError as exc:
            return skipped(dropped, str(exc))
        dropped.update(agg.dropped)
        if dropped:
            log.warning("diloco round: averaged %d replicas; dropped %s", agg.count,
                        dropped_text(dropped))
        samples = sum(samples_of(parts[r][0]) for r in agg.included)
        return delta_to_wire(q), {"included": ",".join(agg.included),
                                  "dropped": dropped_text(dropped),
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

    def scheduled_outer(self, host: StageHost) -> diloco.OuterConfig:
        """The outer optimizer's settings for the round ending at step host.step + 1, its rate
        following sync.diloco.outer_schedule (counted in outer rounds)."""
        rounds = max(1, (host.step + 1) // self.inner_steps)
        factor = lr.factor(host.spec, "sync.diloco.outer_schedule", rounds)
        return dataclasses.replace(self.outer, lr=self.outer.lr * factor)

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
            outer = diloco.OuterOptimizer(shared, self.scheduled_outer(host))
            state = {k[13:]: v for k, v in host.mode_state.items()
                     if k.startswith("shared.outer.")}
            if state:
                outer.load_state_dict(state)
            outer.step(shared, avg)  # mutates the shared weights in place
            for key, value in outer.state_dict().items():
                # 1-element, not 0-d: the state hash views every tensor as bytes
                host.mode_state[f"shared.outer.{key}"] = value.reshape(value.shape or (1,)).to(
                    params[0].device)
