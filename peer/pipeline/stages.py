"""The model cut into pipeline stages: the one place that knows how.

``StageZero`` holds the embedding, the final norm and the tied head (the data peer's part: it
runs both ends of every microbatch); ``BlockStage`` holds a contiguous run of blocks (every other
peer's part). ``split`` cuts a full ``Decoder`` into them; ``init_block_stage`` builds one slice
alone with exactly the weights ``split`` would cut out (weights are a pure function of the
config, peer/pipeline/model.py). Run in order, the stages are the ``Decoder``, bit for bit.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from peer.pipeline.model import (
    EDGE_COPY_KEYS,
    VOCAB_SIZE,
    Block,
    Decoder,
    ModelConfig,
    RMSNorm,
    byte_loss,
    embed_tokens,
    init_weights,
    tied_head,
)

# --------------------------------------------------------------------------- the partition


class StageZero(nn.Module):
    """Stage 0's model: the embedding, final norm and tied head. Its peer runs both ends."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            self.embedding = nn.Embedding(VOCAB_SIZE, config.d_model)
            self.norm = RMSNorm(config.d_model, config.norm_eps)
        init_weights(self, config)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.embedding, tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return tied_head(self.norm, self.embedding, h)

    def head_loss(
        self, h: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy in nats per byte, logits)."""
        logits = self.head(h)
        return byte_loss(logits, targets), logits


class BlockStage(nn.Module):
    """A contiguous run of blocks, keyed by their global layer index (``layers.5.attn...``).

    CheckFree+: with ``edge_copy`` the stage also keeps a snapshot of stage 0's embedding and
    norm (buffers ``edge_embedding``, ``edge_norm``), so stage 0 can be rebuilt when every
    replica of it is lost; ``split`` gives them to the first and last block stages. Buffers, not
    parameters: the stage's optimizer never touches them, ``refresh_edge_copy`` updates them from
    stage 0, and they travel in the stage's state dict.
    """

    def __init__(self, first_layer: int, blocks: Sequence[Block], edge_copy: bool = False) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a BlockStage needs at least one block")
        self.config = blocks[0].config
        self.first_layer = first_layer
        self.layers = nn.ModuleDict({str(first_layer + i): b for i, b in enumerate(blocks)})
        self.holds_edge_copy = edge_copy
        if edge_copy:
            self.register_buffer("edge_embedding", torch.zeros(VOCAB_SIZE, self.config.d_model))
            self.register_buffer("edge_norm", torch.ones(self.config.d_model))

    @property
    def layer_indices(self) -> range:
        return range(self.first_layer, self.first_layer + len(self.layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layers.values():
            h = block(h)
        return h

    def refresh_edge_copy(self, stage_zero: StageZero) -> None:
        self._need_edge_copy()
        with torch.no_grad():
            self.edge_embedding.copy_(stage_zero.embedding.weight)
            self.edge_norm.copy_(stage_zero.norm.weight)

    def restore_stage_zero(self) -> StageZero:
        """CheckFree+ recovery: a StageZero made of this stage's copy of the embedding and norm."""
        self._need_edge_copy()
        stage_zero = StageZero(self.config).to(self.edge_embedding.device)
        with torch.no_grad():
            stage_zero.embedding.weight.copy_(self.edge_embedding)
            stage_zero.norm.weight.copy_(self.edge_norm)
        return stage_zero

    def _need_edge_copy(self) -> None:
        if not self.holds_edge_copy:
            raise RuntimeError(f"the stage of layers {list(self.layer_indices)} holds no copy of "
                               "stage 0; build it with edge_copy=True (first and last stages)")


def stage_layers(n_layers: int, n_block_stages: int) -> list[range]:
    """Each block stage's global layers: as even as possible, the extra layers going to the
    earliest stages (8 layers over 3 stages: 3, 3, 2)."""
    if not 1 <= n_block_stages <= n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_block_stages} block stages; "
                         f"use 1 to {n_layers} stages")
    base, extra = divmod(n_layers, n_block_stages)
    starts = [s * base + min(s, extra) for s in range(n_block_stages + 1)]
    return [range(a, b) for a, b in itertools.pairwise(starts)]


def split(
    config: ModelConfig, n_block_stages: int, edge_copies: bool = False
) -> tuple[StageZero, list[BlockStage]]:
    """Cut one deterministically initialised Decoder into stage 0 and ``n_block_stages`` stages.

    With ``edge_copies`` the first and last block stages hold CheckFree+ copies of stage 0.
    """
    full = Decoder(config)
    stage_zero = StageZero(config)
    stage_zero.embedding, stage_zero.norm = full.embedding, full.norm
    ranges = stage_layers(config.n_layers, n_block_stages)
    stages = [BlockStage(r.start, [full.layers[i] for i in r],
                         edge_copy=edge_copies and s in (0, len(ranges) - 1))
              for s, r in enumerate(ranges)]
    for stage in stages:
        if stage.holds_edge_copy:
            stage.refresh_edge_copy(stage_zero)
    return stage_zero, stages


def run_pipeline(
    stage_zero: StageZero, stages: Iterable[BlockStage], tokens: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One path in one process, block stages in the order given (any subset): (loss, logits)."""
    h = stage_zero.embed(tokens)
    for stage in stages:
        h = stage(h)
    return stage_zero.head_loss(h, targets)


def init_block_stage(config: ModelConfig, layers: range, edge_copy: bool = False) -> BlockStage:
    """A fresh stage of ``layers``, equal to what ``split`` cuts out, without the full model."""
    with torch.random.fork_rng(devices=[]):
        stage = BlockStage(layers.start, [Block(config) for _ in layers], edge_copy=edge_copy)
    init_weights(stage, config)
    if edge_copy:
        stage.refresh_edge_copy(StageZero(config))
    return stage


# --------------------------------------------------------------------------- state dicts


def layer_of(key: str) -> int | None:
    """The global layer index in a state dict key (``layers.5.mlp.up.weight`` -> 5), or None."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def block_stage_from_state(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> BlockStage:
    """Rebuild a BlockStage from its state dict; its layer range is read from the keys."""
    indices = sorted({i for key in state if (i := layer_of(key)) is not None})
    if not indices or indices != list(range(indices[0], indices[-1] + 1)):
        raise ValueError(f"a block stage state needs contiguous 'layers.<i>.' keys; got layers "
                         f"{indices}")
    stage = init_block_stage(config, range(indices[0], indices[-1] + 1),
                             edge_copy=EDGE_COPY_KEYS[0] in state)
    try:
        stage.load_state_dict(state, strict=True)  # names and shapes must match exactly
    except RuntimeError as exc:
        raise ValueError(f"the state of layers {indices[0]}..{indices[-1]} does not fit this "
                         f"model config; was it made by another run? {exc}") from exc
    return stage


# --------------------------------------------------------------------------- measurements


def count_params(module: nn.Module) -> int:
    """Trainable parameters, the tied head once; CheckFree+ edge copies are buffers, not counted."""
    return sum(p.numel() for p in module.parameters())


def measure_throughput(stage: nn.Module, microbatch: int, seq_len: int, repeats: int = 3) -> float:
    """Samples/s of forward + backward on random input: the number a peer reports at join.

    Works for a StageZero (embed + head + loss), a BlockStage or a Decoder. One untimed warm-up
    pass, then ``repeats`` timed ones. Gradients come from ``torch.autograd.grad``, so the
    stage's ``.grad`` fields are left untouched.
    """
    device = next(stage.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, VOCAB_SIZE, (microbatch, seq_len + 1), generator=gen).to(device)
    h = torch.randn(microbatch, seq_len, stage.config.d_model, generator=gen).to(device)
    params = [p for p in stage.parameters() if p.requires_grad]

    def one_pass() -> None:
        if isinstance(stage, StageZero):
            loss, _ = stage.head_loss(stage.embed(tokens[:, :-1]), tokens[:, 1:])
        elif isinstance(stage, Decoder):
            loss, _ = stage.loss(tokens[:, :-1], tokens[:, 1:])
        else:
            loss = stage(h).float().square().mean()
        torch.autograd.grad(loss, params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_pass()
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return microbatch * repeats / (time.perf_counter() - start)


def copy_checked(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                 error: type[Exception], what: str, needs: str) -> None:
    """Copy `tensors[name]` into each of `params` (no grad), refusing with `error` a tensor of
    another shape or one holding NaN/Inf before anything after it is copied. `what` prefixes
    the tensor's name in the message ("rebuilt "), `needs` names who needs the shape."""
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise error(f"{what}{name} has shape {tuple(t.shape)}, {needs} needs "
                            f"{tuple(p.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise error(f"{what}{name} holds NaN or Inf")
            p.copy_(t.to(p.device, p.dtype))
