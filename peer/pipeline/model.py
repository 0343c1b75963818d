"""The model Shoal trains (its cut into pipeline stages is beside it, in peer/pipeline/stages.py).

A small Llama-style decoder over raw bytes (vocabulary 256, no tokenizer): token embedding,
``n_layers`` pre-norm blocks (RMSNorm, causal self-attention with rotary positions, SwiGLU MLP),
a final RMSNorm and an LM head tied to the embedding. Read top to bottom: config, pieces, block,
the full ``Decoder``. peer/pipeline/stages.py cuts it: ``StageZero`` (embedding, final norm,
head, loss: the data peer's part), ``BlockStage`` (a contiguous run of blocks: every other
peer's part) and ``split``, which makes them.

Invariants the rest of Shoal relies on:

- Weights are a pure function of the config: each parameter is drawn from its own CPU
  ``torch.Generator`` seeded by ``(config.seed, parameter name)``. Every machine builds the same
  weights, and a peer can build only its slice (``init_block_stage``) and get exactly what
  ``split`` cuts out of the full model.
- Parameter names are global: ``embedding.weight``, ``norm.weight``, ``layers.<i>.<...>`` with
  ``i`` the layer's index in the full model, wherever the tensor lives. Stage state dicts merge
  back into a full one by union (``peer.pipeline.checkpoint.assemble``).
- Stages run in order are the ``Decoder``: the same modules, the same ops in the same order, so
  logits and gradients are bit-identical on CPU.
- Rotary cos/sin tables are non-persistent buffers: recomputed, never saved or sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256  # bytes; Shoal never tokenizes
EDGE_COPY_KEYS = ("edge_embedding", "edge_norm")  # CheckFree+ copies on edge block stages


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    seq_len: int = 128  # longest context; the rotary tables cover this many positions
    ffn_multiple_of: int = 64  # the SwiGLU width is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    seed: int = 0  # part of the config: the weights are a pure function of it

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), (int,) if f.type == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"ModelConfig.{f.name} must be {f.type}, got {value!r}")
            if f.type == "int" and f.name != "seed" and value < 1:
                raise ValueError(f"ModelConfig.{f.name} must be >= 1, got {value}")
        if self.d_model % (2 * self.n_heads):
            raise ValueError(f"ModelConfig: d_model={self.d_model} must split into n_heads="
                             f"{self.n_heads} heads of even width; use a multiple of "
                             f"{2 * self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Llama's SwiGLU width: 2/3 of 4 * d_model, rounded up to ``ffn_multiple_of``."""
        return -(-int(8 * self.d_model / 3) // self.ffn_multiple_of) * self.ffn_multiple_of

    def to_dict(self) -> dict[str, int | float]:
        return {**asdict(self), "vocab_size": VOCAB_SIZE}

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> ModelConfig:
        """Inverse of ``to_dict``: unknown keys are errors, missing ones take the defaults."""
        values = dict(values)
        if (vocab := values.pop("vocab_size", VOCAB_SIZE)) != VOCAB_SIZE:
            raise ValueError(f"vocab_size={vocab}: Shoal models are byte-level, it must be 256")
        if unknown := sorted(set(values) - {f.name for f in fields(cls)}):
            raise ValueError(f"unknown model config keys {unknown}; known: "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the pieces


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32 even under bf16 autocast
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding in the "rotate half" layout, tables built for seq_len."""

    def __init__(self, head_dim: int, seq_len: int, theta: float) -> None:
        super().__init__()
        # Built in float64 on CPU, then rounded: the same tables on every machine.
        inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, heads, T, head_dim]
        t = x.shape[-2]
        if t > self.cos.shape[0]:
            raise ValueError(f"a sequence of {t} positions exceeds seq_len={self.cos.shape[0]}; "
                             "crop the input to the model's context")
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.rotary = Rotary(config.head_dim, config.seq_len, config.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(self.rotary(q), self.rotary(k), v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """Fill every parameter from its own generator, seeded by (config.seed, global name).

    Norm gains start at 1. The two projections that write into the residual stream (attn.wo,
    mlp.down) get std / sqrt(2 * n_layers), so the stream's variance does not grow with depth.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = config.init_std
            if name.endswith(("attn.wo.weight", "mlp.down.weight")):
                std /= (2 * config.n_layers) ** 0.5
            digest = hashlib.blake2b(f"{config.seed}:{name}".encode(), digest_size=8).digest()
            gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)
            p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


# The ends of the model, shared by Decoder and StageZero so both run the very same ops.


def embed_tokens(embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dtype.is_floating_point or tokens.dim() != 2:
        raise ValueError(f"tokens must be an integer tensor [batch, time], got {tokens.dtype} "
                         f"of shape {tuple(tokens.shape)}")
    return embedding(tokens.long())


def tied_head(norm: RMSNorm, embedding: nn.Embedding, h: torch.Tensor) -> torch.Tensor:
    return F.linear(norm(h), embedding.weight)  # the head is the embedding, transposed


def byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), targets.reshape(-1).long())


# --------------------------------------------------------------------------- the full model


class Decoder(nn.Module):
    """The whole model in one process: export, generation, tests, the single-machine baseline."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move torch's RNG
            self.embedding = nn.Embedding(VOCAB_SIZE, config.d_model)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.d_model, config.norm_eps)
        init_weights(self, config)

    def forward(self, tokens: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, T, 256] for byte tokens [B, T].

        ``layers``: the global layer indices to run, in order (default: all). Any subset and order
        is accepted; that is how SkipPipe paths (skips, adjacent swaps) and ``shoal generate
        --skip`` run. The path planner, not the model, enforces SkipPipe's rules.
        """
        n = self.config.n_layers
        order = range(n) if layers is None else [int(i) for i in layers]
        if bad := [i for i in order if not 0 <= i < n]:
            raise ValueError(f"layer indices {bad} are out of range for a {n}-layer model; "
                             f"use 0..{n - 1}")
        h = embed_tokens(self.embedding, tokens)
        for i in order:
            h = self.layers[i](h)
        return tied_head(self.norm, self.embedding, h)

    def loss(
        self, tokens: torch.Tensor, targets: torch.Tensor, layers: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy in nats per byte, logits)."""
        logits = self(tokens, layers)
        return byte_loss(logits, targets), logits
