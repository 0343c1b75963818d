"""One replica's stage: its module, its optimizer, and the graphs of its in-flight microbatches.

A `StageHost` is the compute side of a peer, with no network in it: the gRPC services call it,
and every call that runs torch goes through its single compute thread, so the event loop never
blocks behind a forward pass and two backward passes never race on `.grad`.

Gradient bookkeeping (what makes the replicas' average correct):
- every microbatch's loss is backpropagated as a *sum over its samples* (mean loss x batch size),
  so each replica's `.grad` holds a gradient sum and `samples` counts what went into it;
- a sync round divides the replicas' summed gradients by their summed sample counts, so the
  stage steps with the mean gradient of every sample it saw this step, whichever replica saw it.

Invariant: two replicas that start from the same state and apply the same aggregate bytes end
bit-identical (same ops, same order, on CPU), which `state_hash` lets anyone check.

Sync-mode state (`mode_state`, the one hook a sync mode gets here): named tensors that a mode
keeps beside the stage and that must travel with it to a joining replica, e.g. DiLoCo's shared
weights of the last outer step and its outer momentum (peer/sync/diloco.py). They go out as
`mode.<name>` arrays in `state_arrays` and come back in `load_state_arrays`, dtype kept. Names
under `shared.` are what the replicas agree on while their parameters legitimately differ
(DiLoCo between outer steps): when any exist, `state_hash` covers them instead of the parameters.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from peer.device import autocast as device_autocast
from peer.pipeline import lr
from peer.pipeline.model import ModelConfig
from peer.pipeline.stage_state import StageError, StageState
from peer.pipeline.stages import StageZero, init_block_stage, stage_layers
from protocols.runspec import RunSpec

log = logging.getLogger("shoal.stage")
T = TypeVar("T")
PENDING_TTL_S = 120.0  # how long a microbatch's graph waits for its backward before it is dropped


class PendingQuota(StageError):
    """A caller holds as many pending graphs (or samples in them) as it may: its Forward is
    refused (RESOURCE_EXHAUSTED) until its backwards come or its step ends."""


class NotYours(StageError):
    """A Backward for a microbatch whose Forward another caller sent (PERMISSION_DENIED)."""


@dataclass
class Pending:
    """A forward pass waiting for its backward: the input leaf and the output with its graph."""

    inp: torch.Tensor
    out: torch.Tensor
    samples: int
    step: int
    created: float
    owner: str = ""  # the peer id whose Forward made it (its Backward must come from it)
    # peer-to-peer hops (peer/pipeline/p2p.py): the other peers whose Backward is taken, those
    # this replica sent its output to (the next stage's replicas it tried, or the route's origin)
    backers: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class PendingLimits:
    """What one caller may keep pending here: `graphs` forward graphs holding at most `samples`
    samples. An honest stage-0 driver keeps at most one step of its microbatches here (about
    target_batch samples in ceil(target_batch / microbatch) graphs, fewer with several drivers);
    the limits give twice that and a few graphs of slack (hops resent after a timeout)."""

    graphs: int
    samples: int

    @classmethod
    def of(cls, spec: RunSpec) -> PendingLimits:
        p = spec.pipeline
        per_step = math.ceil(p.target_batch / max(1, p.microbatch))
        return cls(graphs=2 * per_step + 4,
                   samples=2 * max(p.target_batch, p.microbatch) + p.microbatch)


def model_config(spec: RunSpec) -> ModelConfig:
    m = spec.model
    return ModelConfig(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                       seq_len=m.seq_len, seed=spec.run.seed)


def build_stage_module(spec: RunSpec, stage: int) -> nn.Module:
    """The deterministic initial weights of `stage` (0 = embedding/head, 1..S = blocks)."""
    if spec.model.hf:  # a Hugging Face folder: only this stage's tensors are read
        from peer.pipeline.hf import HFModelError, build_stage

        try:
            return build_stage(spec.model.hf, stage, spec.pipeline.stages,
                               weights=spec.model.hf_weights, seed=spec.run.seed)
        except HFModelError as exc:
            raise StageError(f"model.hf: {exc}") from exc
    config = model_config(spec)
    if stage == 0:
        return StageZero(config)
    ranges = stage_layers(config.n_layers, spec.pipeline.stages)
    if not 1 <= stage <= len(ranges):
        raise StageError(f"stage {stage} does not exist: the run has stages 0..{len(ranges)}")
    edge = spec.pipeline.checkfree_plus and stage in (1, len(ranges))
    return init_block_stage(config, ranges[stage - 1], edge_copy=edge)


class StageHost(StageState):
    """The module of one stage on one replica, plus everything that changes it."""

    def __init__(self, spec: RunSpec, stage: int, device: str = "cpu") -> None:
        self.spec = spec
        self.stage = stage
        self.device = torch.device(device)
        self.module = build_stage_module(spec, stage).to(self.device)
        self.step = 0  # optimizer steps applied: the state is "after step `step`"
        self.lr_scale = 1.0  # CheckFree rebuilds raise it (ALGORITHMS.md §3)
        self.optimizer = self._make_optimizer()
        self.pending: dict[str, Pending] = {}
        self.pending_limits = PendingLimits.of(spec)
        self.samples = 0  # samples whose gradient is in .grad since the last step
        self.microbatches = 0
        self.last_grad_norm = 0.0
        self.dropped = 0
        self.throttle = 1.0  # > 1 makes this replica that many times slower (tests, benchmarks)
        # Emulated machine speed (samples/s of forward; backward counts double): on a shared
        # 2-core box the peers' real compute contends for one CPU, so a benchmark of routing
        # gives each replica a fixed compute time per sample, as if it had its own machine.
        self.simulated_rate = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stage{stage}")
        # A sync mode's own tensors that travel with the stage (see the module docstring).
        self.mode_state: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ plumbing

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.spec.optim
        return torch.optim.AdamW(self.module.parameters(), lr=o.lr * self.lr_scale,
                                 weight_decay=o.weight_decay, betas=(0.9, 0.95))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the compute thread (torch off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn,
                                                                 args)

    async def run_timed(self, fn: Callable[..., T], *args: Any) -> tuple[T, float]:
        """`run`, and the seconds the compute thread spent on it (a slowed machine's too), not
        counting the wait for the thread."""
        def timed() -> tuple[T, float]:
            t0 = time.perf_counter()
            return self._timed(fn, args), time.perf_counter() - t0
        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    def _timed(self, fn: Callable[..., T], args: tuple) -> T:
        t0 = self._call_started = time.perf_counter()
        out = fn(*args)
        if self.throttle > 1.0:  # a slow machine: the thread stays busy, as real work would
            time.sleep((self.throttle - 1.0) * (time.perf_counter() - t0))
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.module.named_parameters())

    # ------------------------------------------------------------------ block stages

    def forward(self, mb_id: str, x: torch.Tensor, step: int, owner: str = "") -> torch.Tensor:
        """Block stage forward; keeps the graph for `backward` (of `owner`, within its quota:
        `reserve`). Returns the output, detached."""
        self.check_activation(x, "forward input")
        self.reserve(owner, mb_id, int(x.shape[0]))
        inp = x.to(self.device, torch.float32).requires_grad_(True)
        with torch.enable_grad(), self.autocast():
            out = self.module(inp).float()
        self.pending[mb_id] = Pending(inp, out, int(x.shape[0]), step, time.monotonic(), owner)
        self._pad(inp, 1.0)
        return out.detach().cpu()

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without keeping a graph (inspection, generation through the swarm)."""
        self.check_activation(x, "forward input")
        with self.autocast():
            return self.module(x.to(self.device, torch.float32)).float().cpu()

    def reserve(self, owner: str, mb_id: str, samples: int) -> None:
        """Make room for one more graph of `owner` (`samples` samples) or refuse it
        (PendingQuota): expired graphs go first; a microbatch id already held by another caller
        is refused (NotYours), one held by `owner` is replaced (a resent hop)."""
        self.expire_pending()
        self.check_quota(owner, mb_id, samples)

    def check_quota(self, owner: str, mb_id: str, samples: int) -> None:
        """`reserve`'s check alone (any thread: it reads a snapshot of the pending graphs)."""
        pending = list(self.pending.items())
        held = dict(pending).get(mb_id)
        if held is not None and held.owner != owner:
            raise NotYours(f"microbatch id {mb_id} is in use by another sender here; pick "
                           "another id")
        mine = [p for k, p in pending if p.owner == owner and k != mb_id
                and not (p.step and p.step <= self.step)]
        lim = self.pending_limits
        if len(mine) + 1 > lim.graphs or sum(p.samples for p in mine) + samples > lim.samples:
            raise PendingQuota(
                f"this replica already holds {len(mine)} forward graphs "
                f"({sum(p.samples for p in mine)} samples) of yours waiting for their backward; "
                f"the limit is {lim.graphs} graphs / {lim.samples} samples per sender: send the "
                "backwards (or end the step) before more forwards")

    def handed_to(self, mb_id: str, backer: str) -> str | None:
        """Peer to peer: `mb_id`'s output is being sent on to `backer`, whose Backward is then
        taken too (before the send: its backward may come before the send's answer). Returns
        the graph's owner (where its input gradient goes), None when it is not held."""
        p = self.pending.get(mb_id)
        if p is None:
            return None
        p.backers.add(backer)
        return p.owner

    def owner_of(self, mb_id: str) -> str | None:
        p = self.pending.get(mb_id)
        return None if p is None else p.owner

    def forget_owner(self, owners: set[str]) -> int:
        """Drop the graphs of senders that left the swarm (their backward will not come)."""
        gone = [k for k, p in self.pending.items() if p.owner and p.owner in owners]
        for k in gone:
            self.forget(k)
        return len(gone)

    def backward(self, mb_id: str, grad_out: torch.Tensor, owner: str | None = None
                 ) -> torch.Tensor:
        """Backpropagate `grad_out` through the kept graph; returns the gradient of the input.
        `owner` (when given) must be who sent the Forward (NotYours otherwise)."""
        p = self.pending.pop(mb_id, None)
        if p is None:
            raise StageError(f"no forward pass of microbatch {mb_id} is held here (dropped or "
                             "never seen): resend the whole microbatch")
        if owner is not None and owner != p.owner and owner not in p.backers:
            self.pending[mb_id] = p
            raise NotYours(f"microbatch {mb_id} was sent here by another peer; only its sender "
                           "(or, peer to peer, the replica it went on to) may send its backward")
        if tuple(grad_out.shape) != tuple(p.out.shape):
            self.pending[mb_id] = p
            raise StageError(f"gradient shape {tuple(grad_out.shape)} does not match the "
                             f"output {tuple(p.out.shape)} of microbatch {mb_id}")
        self.check_activation(grad_out, "gradient")
        p.out.backward(grad_out.to(self.device, torch.float32))
        self.samples += p.samples
        self.microbatches += 1
        assert p.inp.grad is not None
        self._pad(p.inp, 2.0)
        return p.inp.grad.detach().cpu()

    def _pad(self, x: torch.Tensor, cost: float) -> None:
        """With a simulated speed, hold the compute thread until the call took its share."""
        if self.simulated_rate > 0:
            started = getattr(self, "_call_started", None)
            if started is not None:
                wait = cost * x.shape[0] / self.simulated_rate - (time.perf_counter() - started)
                if wait > 0:
                    time.sleep(wait)

    # ------------------------------------------------------------------ stage 0

    def embed(self, mb_id: str, tokens: torch.Tensor, step: int) -> torch.Tensor:
        assert hasattr(self.module, "head_loss"), "stage 0 only"
        with torch.enable_grad(), self.autocast():
            h = self.module.embed(tokens.to(self.device)).float()
        self.pending[mb_id] = Pending(tokens, h, int(tokens.shape[0]), step, time.monotonic())
        return h.detach().cpu()

    def head(self, mb_id: str, h: torch.Tensor, targets: torch.Tensor
             ) -> tuple[float, torch.Tensor]:
        """Loss of the microbatch and the gradient of its summed loss w.r.t. the last activation."""
        assert hasattr(self.module, "head_loss"), "stage 0 only"
        self.check_activation(h, "last activation")
        leaf = h.to(self.device, torch.float32).requires_grad_(True)
        with torch.enable_grad(), self.autocast():
            loss, _ = self.module.head_loss(leaf, targets.to(self.device).long())
            (loss * h.shape[0]).backward()
        assert leaf.grad is not None
        return float(loss.detach()), leaf.grad.detach().cpu()

    def embed_backward(self, mb_id: str, grad_h: torch.Tensor) -> None:
        p = self.pending.pop(mb_id, None)
        if p is None:
            raise StageError(f"microbatch {mb_id} has no embedding graph here")
        self.check_activation(grad_h, "gradient")
        p.out.backward(grad_h.to(self.device, torch.float32))
        self.samples += p.samples
        self.microbatches += 1

    def forget(self, mb_id: str) -> None:
        """Drop a microbatch's graph (its backward will not come)."""
        if self.pending.pop(mb_id, None) is not None:
            self.dropped += 1

    def expire_pending(self, now: float | None = None) -> int:
        """Drop graphs older than PENDING_TTL_S and those of a step this stage already ended
        (their backward can no longer count). Returns how many were dropped."""
        now = time.monotonic() if now is None else now
        old = [k for k, p in self.pending.items()
               if now - p.created > PENDING_TTL_S or (p.step and p.step <= self.step)]
        for k in old:
            self.forget(k)
        return len(old)

    def autocast(self):
        """The run's compute precision (pipeline.precision, peer/device.py): under "auto" bf16
        on a GPU with the fp32 master weights, plain fp32 on CPU (so CPU replicas stay
        bit-exact). The wire format never depends on it: activations leave as fp32 and the
        codec encodes them."""
        return device_autocast(self.device, self.spec.pipeline.precision)

    def check_activation(self, x: torch.Tensor, what: str) -> None:
        """Refuse (StageError) an activation or gradient that does not fit this run (any thread)."""
        d = self.spec.model.d_model
        if x.dim() != 3 or x.shape[-1] != d or x.shape[1] > self.spec.model.seq_len:
            raise StageError(f"{what} has shape {tuple(x.shape)}; this run expects "
                             f"[batch, <= {self.spec.model.seq_len}, {d}]")
        if x.shape[0] > 4 * self.spec.pipeline.target_batch:
            raise StageError(f"{what} batch {x.shape[0]} exceeds the run's limits")
        if not torch.isfinite(x).all():
            raise StageError(f"{what} contains NaN or Inf")

    # ------------------------------------------------------------------ steps

    def grad_sums(self) -> dict[str, torch.Tensor]:
        """This replica's gradient sums since the last step (zeros where nothing flowed)."""
        out = {}
        for name, p in self.module.named_parameters():
            out[name] = (p.grad.detach().clone() if p.grad is not None
                         else torch.zeros_like(p, dtype=torch.float32))
        return out

    def apply_gradient(self, mean_grad: Mapping[str, torch.Tensor]) -> float:
        """One optimizer step with the stage's averaged gradient; returns its norm (pre-clip)."""
        params = self.params()
        if set(mean_grad) != set(params):
            raise StageError(f"aggregate names {sorted(set(mean_grad) ^ set(params))[:3]} do "
                             "not match this stage")
        for name, p in params.items():
            g = mean_grad[name]
            if g.shape != p.shape:
                raise StageError(f"aggregate {name} has shape {tuple(g.shape)}, expected "
                                 f"{tuple(p.shape)}")
            p.grad = g.to(p.device, p.dtype).clone()
        norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                    self.spec.optim.grad_clip))
        rate = (self.spec.optim.lr * self.lr_scale
                * lr.factor(self.spec, "optim.schedule", self.step + 1))
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()
        self.finish_step(norm)
        return norm

    def finish_step(self, grad_norm: float | None = None) -> None:
        """Close a step: clear gradients and counters, advance the step (also for no-op steps)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.samples = 0
        self.microbatches = 0
        self.step += 1
        if grad_norm is not None:
            self.last_grad_norm = grad_norm
