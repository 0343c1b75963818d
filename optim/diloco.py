"""DiLoCo (Douillard et al. 2023): H local AdamW steps, then an outer Nesterov step on the average
pseudo-gradient (ALGORITHMS.md §6).

A round, for every replica of a stage:
    theta_local <- H steps of `inner_optimizer` from the shared theta
    delta       <- pseudo_gradient(theta, theta_local)          # theta - theta_local
    wire        <- quantize(delta)   ... exchanged ...   dequantize(wire)
    avg         <- average({replica: delta})                    # robust.Aggregate
    OuterOptimizer.step(theta, avg)                              # SGD, Nesterov, lr 0.7, mom 0.9
    theta_local <- theta                                         # every replica starts equal

Invariants:
- `OuterOptimizer.step` is bit-identical to `torch.optim.SGD(lr, momentum, nesterov=True)` fed
  grad = avg (it issues the same torch ops in the same order), and its momentum buffers are the
  outer state a joining replica downloads (`state_dict` / `load_state_dict`).
- Quantisation is deterministic elementwise math: fp16 is a cast (refused, not silently inf,
  when a value exceeds fp16's range); int8 is per-block absmax, scale = absmax/127 in float32,
  q = round-half-even(x/scale) in [-127, 127], error <= scale/2 per element. Blocks are runs of
  `int8_block` elements of the flattened tensor (default 4096: 4 bytes of scale per 4096 bytes).
  int4 is the same with scale = absmax/7 and q in [-7, 7], two codes per byte (even index in the
  low nibble, two's complement), so 0.5 byte per value plus the scales (Streaming DiLoCo's 4-bit
  outer gradients; the paper's E3M0 is a 4-bit float, this is the uniform 4-bit grid).
  Quantised deltas are wire objects and always live on the CPU.
- `DelayedOuter` is the one-round-delayed (async) variant: the update computed from round r's
  average is applied at the end of round r+1, so the exchange of round r overlaps round r+1's
  inner steps. Exactly: at the end of round r, with theta_r the weights round r started from,
      delta_r      = theta_r - theta_local            (sent in the background)
      theta_{r+1}  = outer_step(theta_r, avg(delta_{r-1}))   (theta_1 = theta_0 at r = 0)
  and `flush` applies the last pending average when the run stops.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from optim import robust
from optim.errors import ConfigError, NonFiniteValues, ShapeMismatch, StateMismatch

Quant = Literal["fp32", "fp16", "int8", "int4"]
QUANTS = ("fp32", "fp16", "int8", "int4")
LEVELS = {"int8": 127, "int4": 7}  # largest code of each integer format
FP16_MAX = 65504.0


@dataclass(frozen=True)
class OuterConfig:
    """Outer optimizer and wire format of the pseudo-gradients (DiLoCo paper defaults)."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    quant: Quant = "fp32"
    int8_block: int = 4096

    def __post_init__(self) -> None:
        if not self.lr > 0.0:
            raise ConfigError(f"outer lr must be > 0, got {self.lr}; DiLoCo uses 0.7")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"outer momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError("Nesterov needs momentum > 0; set nesterov=False or momentum=0.9")
        if self.quant not in QUANTS:
            raise ConfigError(f"unknown quant {self.quant!r}; use one of {QUANTS}")
        if self.int8_block < 1 or (self.quant == "int4" and self.int8_block % 2):
            raise ConfigError(f"int8_block must be >= 1 (even for int4), got {self.int8_block}")


def inner_optimizer(
    params: Iterable[Tensor],
    lr: float = 4e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """The inner optimizer of DiLoCo: plain AdamW with the paper's hyperparameters."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


@torch.no_grad()
def pseudo_gradient(
    global_params: Sequence[Tensor], local_params: Sequence[Tensor]
) -> list[Tensor]:
    """Delta = theta_global - theta_local (old minus new), float32, one tensor per parameter."""
    _check_shapes(global_params, local_params, "local params")
    return [g.detach().to(torch.float32) - loc.detach().to(device=g.device, dtype=torch.float32)
            for g, loc in zip(global_params, local_params, strict=True)]


@dataclass(frozen=True)
class QuantizedDelta:
    """One pseudo-gradient tensor in its wire format.

    Attributes:
        quant: "fp32", "fp16", "int8" or "int4".
        shape: the tensor's shape.
        data: flattened values (float32, float16, int8 codes padded to whole blocks, or for
            int4 uint8 bytes of two codes each, padded to whole blocks).
        scales: float32 [n_blocks] for int8/int4, None otherwise.
        block: int8/int4 block length in elements (0 for fp32/fp16).
    """

    quant: Quant
    shape: tuple[int, ...]
    data: Tensor
    scales: Tensor | None = None
    block: int = 0

    def nbytes(self) -> int:
        extra = 0 if self.scales is None else self.scales.numel() * 4
        return self.data.numel() * self.data.element_size() + extra

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"shape": np.asarray(self.shape, dtype=np.int64), "data": self.data.numpy(),
               "block": np.asarray([self.block], dtype=np.int64)}
        if self.scales is not None:
            out["scales"] = self.scales.numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> QuantizedDelta:
        kinds: dict[np.dtype, Quant] = {np.dtype(np.float32): "fp32",
                                        np.dtype(np.float16): "fp16", np.dtype(np.int8): "int8",
                                        np.dtype(np.uint8): "int4"}
        data = np.asarray(arrays["data"])
        if data.dtype not in kinds or data.ndim != 1:
            raise ShapeMismatch(f"pseudo-gradient data must be 1-D fp32/fp16/int8/uint8 (int4), "
                                f"got {data.dtype} {data.shape}")
        quant = kinds[data.dtype]
        shape = tuple(int(d) for d in arrays["shape"])
        block = int(np.asarray(arrays["block"])[0])
        scales = arrays.get("scales")
        n = int(np.prod(shape)) if shape else 1
        if quant in LEVELS:
            per_byte = 2 if quant == "int4" else 1
            if (block < 1 or block % per_byte or scales is None
                    or np.asarray(scales).dtype != np.float32):
                raise ShapeMismatch(f"{quant} pseudo-gradient needs block >= 1 (even for int4) "
                                    "and float32 scales")
            n_blocks = -(-n // block)
            if (data.size != n_blocks * block // per_byte
                    or np.asarray(scales).shape != (n_blocks,)):
                raise ShapeMismatch(f"{quant} pseudo-gradient of shape {shape}: expected "
                                    f"{n_blocks * block // per_byte} bytes of codes and "
                                    f"{n_blocks} scales")
        elif data.size != n or scales is not None:
            raise ShapeMismatch(f"{quant} pseudo-gradient of shape {shape} needs {n} values")
        sc = None if scales is None else torch.from_numpy(np.array(scales))
        return cls(quant, shape, torch.from_numpy(np.array(data)), sc, block)


def quantize(delta: Tensor, quant: Quant, block: int = 4096) -> QuantizedDelta:
    """Encode one pseudo-gradient tensor for the wire (see the module docstring)."""
    if not bool(torch.isfinite(delta).all()):
        raise NonFiniteValues("pseudo-gradient holds NaN/inf; the inner steps diverged: "
                              "lower the inner lr or clip, and do not send this round")
    flat = delta.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    shape = tuple(delta.shape)
    if quant == "fp32":
        return QuantizedDelta("fp32", shape, flat.clone())
    if quant == "fp16":
        if flat.numel() and float(flat.abs().max()) > FP16_MAX:
            raise NonFiniteValues(f"pseudo-gradient exceeds the fp16 range ({FP16_MAX}); "
                                  "use quant='int8' or 'fp32' for this run")
        return QuantizedDelta("fp16", shape, flat.to(torch.float16))
    if quant not in LEVELS:
        raise ConfigError(f"unknown quant {quant!r}; use one of {QUANTS}")
    if block < 1 or (quant == "int4" and block % 2):
        raise ConfigError(f"{quant} block must be >= 1 element (even for int4), got {block}")
    level = LEVELS[quant]
    n_blocks = -(-flat.numel() // block)
    padded = torch.zeros(n_blocks * block, dtype=torch.float32)
    padded[: flat.numel()] = flat
    blocks = padded.reshape(n_blocks, block)
    scales = blocks.abs().amax(dim=1) / float(level)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp(-level, level).to(torch.int8).reshape(-1)
    if quant == "int4":
        nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8).reshape(-1, 2)
        codes = nibbles[:, 0] | (nibbles[:, 1] << 4)
    return QuantizedDelta(quant, shape, codes, scales, block)


def dequantize(q: QuantizedDelta) -> Tensor:
    """Decode to float32 of the original shape."""
    n = 1
    for d in q.shape:
        n *= d
    if q.quant in LEVELS:
        assert q.scales is not None
        codes = q.data
        if q.quant == "int4":
            nibbles = torch.stack([q.data & 0xF, q.data >> 4], dim=1).reshape(-1).to(torch.int16)
            codes = torch.where(nibbles >= 8, nibbles - 16, nibbles)
        blocks = codes.reshape(-1, q.block).to(torch.float32) * q.scales[:, None]
        return blocks.reshape(-1)[:n].reshape(q.shape)
    return q.data.to(torch.float32).reshape(q.shape)


def average(
    deltas_by_replica: Mapping[str, Sequence[Tensor]],
    shapes: Sequence[Sequence[int]] | None = None,
    method: robust.Method = "mean",
    *,
    trim: int = 1,
    max_norm: float | None = None,
) -> robust.Aggregate:
    """Average the replicas' (dequantised) pseudo-gradients; deterministic, reports who counted.

    Thin wrapper over `robust.aggregate`: `method`, `trim` and `max_norm` choose a robust rule.
    """
    return robust.aggregate(deltas_by_replica, method, trim=trim, max_norm=max_norm,
                            shapes=shapes)


class OuterOptimizer:
    """Outer SGD with (Nesterov) momentum over the shared weights, with exportable state."""

    def __init__(self, params: Sequence[Tensor], config: OuterConfig | None = None) -> None:
        self.config = config or OuterConfig()
        self.shapes = [tuple(p.shape) for p in params]
        self.momentum: list[Tensor | None] = [None] * len(params)
        self.steps = 0

    @torch.no_grad()
    def step(self, global_params: Sequence[Tensor], avg_delta: Sequence[Tensor]) -> None:
        """theta <- SGD-Nesterov step on theta with grad = avg_delta; mutates `global_params`."""
        _check_shapes(global_params, avg_delta, "average pseudo-gradient")
        for d in avg_delta:
            if not bool(torch.isfinite(d).all()):
                raise NonFiniteValues("average pseudo-gradient holds NaN/inf; skip this round "
                                      "(robust.aggregate drops such replicas before averaging)")
        cfg = self.config
        for i, (p, d) in enumerate(zip(global_params, avg_delta, strict=True)):
            grad = d.detach().to(device=p.device, dtype=p.dtype)
            if cfg.momentum != 0.0:
                buf = self.momentum[i]
                if buf is None:
                    buf = torch.clone(grad).detach()
                    self.momentum[i] = buf
                else:
                    buf.mul_(cfg.momentum).add_(grad, alpha=1.0)
                grad = grad.add(buf, alpha=cfg.momentum) if cfg.nesterov else buf
            p.add_(grad, alpha=-cfg.lr)
        self.steps += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Outer state as flat tensors: 'steps' and 'momentum.<i>' for each buffer that exists."""
        out = {"steps": torch.tensor(self.steps, dtype=torch.int64)}
        for i, buf in enumerate(self.momentum):
            if buf is not None:
                out[f"momentum.{i}"] = buf.clone()
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Adopt a live replica's outer state; every key and shape is checked first."""
        if "steps" not in state:
            raise StateMismatch("outer state has no 'steps'; download it again from a live replica")
        buffers: list[Tensor | None] = [None] * len(self.shapes)
        for key, value in state.items():
            if key == "steps":
                continue
            prefix, _, index = key.partition(".")
            if prefix != "momentum" or not index.isdigit() or int(index) >= len(self.shapes):
                raise StateMismatch(f"unexpected outer-state key {key!r} for {len(self.shapes)} "
                                    "parameters; is it from another stage?")
            i = int(index)
            if tuple(value.shape) != self.shapes[i]:
                raise StateMismatch(f"{key} has shape {tuple(value.shape)}, expected "
                                    f"{self.shapes[i]}; is it from another stage?")
            buffers[i] = value.detach().clone()
        steps = int(state["steps"].item())
        if steps > 0 and self.config.momentum != 0.0 and any(b is None for b in buffers):
            raise StateMismatch(f"outer state at step {steps} lacks momentum buffers")
        self.momentum, self.steps = buffers, steps


class DelayedOuter:
    """One-round-delayed outer updates (async DiLoCo); see the module docstring for the timing."""

    def __init__(self, outer: OuterOptimizer) -> None:
        self.outer = outer
        self.round = 0
        self.flushed = False

    def end_round(self, global_params: Sequence[Tensor],
                  previous_average: Sequence[Tensor] | None) -> None:
        """End round `self.round`: apply the average of the round before (None only at round 0)."""
        if self.flushed:
            raise ConfigError("DelayedOuter was flushed; build a new one to continue training")
        if self.round == 0:
            if previous_average is not None:
                raise ConfigError("round 0 has no previous round; pass None")
        else:
            if previous_average is None:
                raise ConfigError(f"round {self.round} needs the average of round "
                                  f"{self.round - 1}; wait for it (or skip the round)")
            self.outer.step(global_params, previous_average)
        self.round += 1

    def flush(self, global_params: Sequence[Tensor], last_average: Sequence[Tensor]) -> None:
        """Apply the still-pending average of the final round when training stops."""
        if self.round == 0 or self.flushed:
            raise ConfigError("nothing to flush: no round has ended, or flush already ran")
        self.outer.step(global_params, last_average)
        self.flushed = True

    def state_dict(self) -> dict[str, Tensor]:
        out = self.outer.state_dict()
        out["round"] = torch.tensor(self.round, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if "round" not in state:
            raise StateMismatch("delayed outer state has no 'round'")
        self.outer.load_state_dict({k: v for k, v in state.items() if k != "round"})
        self.round = int(state["round"].item())


def _check_shapes(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    sa, sb = [tuple(t.shape) for t in a], [tuple(t.shape) for t in b]
    if sa != sb:
        raise ShapeMismatch(f"{what} shapes {sb} do not match the global params {sa}")
