"""The pipeline bench.recovery trains: stage 0 and the block stages in one process, one AdamW
each, with the peer's clipping and the CheckFree+ copy of stage 0 an edge stage keeps."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from peer.pipeline.data import inputs_targets
from peer.pipeline.model import ModelConfig
from peer.pipeline.stages import BlockStage, StageZero, run_pipeline, split
from peer.recovery.edge_copy import REFRESH_EVERY_STEPS

BETAS = (0.9, 0.95)  # StageHost's AdamW


@dataclass
class Trainee:
    """The pipeline in one process: stage 0, the block stages, one AdamW per module.

    ``modules[0]`` is stage 0, ``modules[s]`` block stage s, so indices match stage numbers.
    ``edge_copy`` is the CheckFree+ copy of stage 0 an edge stage keeps (``edge_embedding``,
    ``edge_norm``), refreshed every REFRESH_EVERY_STEPS steps. Deep-copied as a whole (modules
    and optimizers together keep their parameter links).
    """

    modules: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    lr: float  # the base learning rate, before the schedule and a stage's boost
    grad_clip: float
    lr_scale: list[float] = field(default_factory=list)  # 1.0, or the boost of a rebuilt stage
    last_norms: list[float] = field(default_factory=list)  # pre-clip, per stage, last step
    edge_copy: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def build(cls, config: ModelConfig, n_stages: int, lr: float, grad_clip: float) -> Trainee:
        stage_zero, blocks = split(config, n_stages)
        modules: list[nn.Module] = [stage_zero, *blocks]
        t = cls(modules, [_adamw(m, lr) for m in modules], lr, grad_clip,
                [1.0] * len(modules), [0.0] * len(modules))
        t.refresh_edge_copy()
        return t

    def refresh_edge_copy(self) -> None:
        zero = self.modules[0]
        assert isinstance(zero, StageZero)
        self.edge_copy = {"edge_embedding": zero.embedding.weight.detach().clone(),
                          "edge_norm": zero.norm.weight.detach().clone()}

    def loss(self, batch: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        x, y = inputs_targets(batch)
        stage_zero = self.modules[0]
        assert isinstance(stage_zero, StageZero)
        blocks = [m for s, m in enumerate(self.modules) if isinstance(m, BlockStage) and s != skip]
        loss, _ = run_pipeline(stage_zero, blocks, x, y)
        return loss

    def train_step(self, batch: torch.Tensor, schedule: float = 1.0) -> float:
        """One optimizer step for every stage at ``lr * schedule * lr_scale[stage]``; each
        stage clips its own gradient and records its pre-clip norm (StageHost's order)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        for s, (module, opt) in enumerate(zip(self.modules, self.optimizers, strict=True)):
            norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), self.grad_clip)
            self.last_norms[s] = float(norm)
            for group in opt.param_groups:
                group["lr"] = self.lr * schedule * self.lr_scale[s]
            opt.step()
        self.steps += 1
        if self.steps % REFRESH_EVERY_STEPS == 0:
            self.refresh_edge_copy()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batches: Sequence[torch.Tensor], skip: int | None = None) -> float:
        """Mean held-out loss; ``skip`` leaves that block stage out of the path (SkipPipe)."""
        return statistics.fmean(float(self.loss(b, skip)) for b in batches)

    def replace(self, stage: int, state: dict[str, torch.Tensor], module: nn.Module,
                lr_scale: float) -> None:
        """Install a rebuilt stage: its new weights, a fresh optimizer, its lr boost."""
        module.load_state_dict(state, strict=True)
        self.modules[stage] = module
        self.lr_scale[stage] = lr_scale
        self.optimizers[stage] = _adamw(module, self.lr * lr_scale)


def _adamw(module: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0, betas=BETAS)


def _adamw(module: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0, betas=BETAS)
