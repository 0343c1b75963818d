"""Hugging Face decoders in, cut into pipeline stages: Llama and Qwen2 from a local folder.

A folder with ``config.json`` (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``) and, optionally,
safetensors weights (``model.safetensors`` or shards with ``model.safetensors.index.json``).
``HFConfig.read`` checks the config; ``build_stage`` makes one stage of ``stages`` block stages
plus stage 0 (the same cut as the built-in decoder: ``peer.pipeline.stages.stage_layers``),
reading only that stage's tensors (``safe_open``: one tensor at a time, no other stage's bytes
are loaded) or, from the config alone, initialising them from (seed, tensor name).

The math is transformers' (modeling_llama / modeling_qwen2) re-written over plain torch, so no
transformers is needed to train: RMSNorm in fp32 with the gain after; rotary in the rotate-half
layout with inv_freq = 1 / theta^(arange(0, d, 2) / d) in fp32 as transformers builds it;
grouped-query attention (each key/value head serves n_heads / n_kv_heads query heads, as
``repeat_kv``), scaled by head_dim^-0.5 and causal; SwiGLU; biases where the config has them
(Llama: ``attention_bias`` on q/k/v/o, ``mlp_bias``; Qwen2: on q/k/v); the head tied to the
embedding or its own ``lm_head.weight``. Parameter names are transformers' own, with global layer
indices, so stage state dicts merge back into a loadable state dict by union.
tests/peer/test_hf_stages.py checks the stage-split forward against transformers' forward.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from peer.pipeline.hf_format import INDEX_FILE, SINGLE_FILE
from peer.pipeline.model import RMSNorm
from peer.pipeline.stages import copy_checked, stage_layers

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class HFModelError(ValueError):
    """A Hugging Face folder Shoal cannot train: unsupported, inconsistent or missing tensors."""


@dataclass(frozen=True)
class HFConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, c: dict) -> HFConfig:
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED:
            raise HFModelError(f"architecture {arch!r} is not supported; Shoal trains "
                               f"{', '.join(SUPPORTED)}")
        if c.get("hidden_act", "silu") != "silu":
            raise HFModelError(f"hidden_act {c.get('hidden_act')!r}: only silu (SwiGLU) is "
                               "supported")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise HFModelError(f"rope type {rope.get('rope_type', rope.get('type'))!r}: only "
                               "the default rotary embedding is supported")
        if c.get("use_sliding_window"):
            raise HFModelError("sliding-window attention is not supported; set "
                               "use_sliding_window to false")
        heads = int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        if heads % kv:
            raise HFModelError(f"num_attention_heads={heads} is not a multiple of "
                               f"num_key_value_heads={kv}")
        qwen = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch, vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
            n_layers=int(c["num_hidden_layers"]), n_heads=heads, n_kv_heads=kv,
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=True if qwen else bool(c.get("attention_bias", False)),
            o_bias=False if qwen else bool(c.get("attention_bias", False)),
            mlp_bias=False if qwen else bool(c.get("mlp_bias", False)),
            init_std=float(c.get("initializer_range", 0.02)))

    @classmethod
    def read(cls, directory: str | Path) -> HFConfig:
        path = Path(directory) / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise HFModelError(f"{path} does not exist: name a Hugging Face model folder "
                               "(config.json + safetensors)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, HFModelError):
                raise
            raise HFModelError(f"{path}: not a usable model config ({exc!r})") from exc


# --------------------------------------------------------------------------- the pieces


def rope_tables(config: HFConfig, t: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos, sin [t, head_dim] as transformers' default rotary embedding computes them."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64)
                                            .to(device=device, dtype=torch.float) / d))
    freqs = torch.arange(t, device=device, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HFAttention(nn.Module):
    def __init__(self, c: HFConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.head_dim ** -0.5)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class HFMLP(nn.Module):
    def __init__(self, c: HFConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HFLayer(nn.Module):
    def __init__(self, c: HFConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = HFAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = HFMLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------- the stages


class HFStageZero(nn.Module):
    """Stage 0: the token embedding, the final norm and the head (tied or ``lm_head``)."""

    def __init__(self, c: HFConfig) -> None:
        super().__init__()
        self.c = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if not c.tied:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens.long())

    def head(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.c.tied else self.lm_head.weight
        return F.linear(self.model.norm(h), weight)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy in nats per token, logits), as ``StageZero.head_loss``."""
        logits = self.head(h)
        loss = F.cross_entropy(logits.reshape(-1, self.c.vocab_size).float(),
                               targets.reshape(-1).long())
        return loss, logits


class HFBlockStage(nn.Module):
    """A contiguous run of layers, named ``model.layers.<global index>``."""

    def __init__(self, c: HFConfig, layers: range) -> None:
        super().__init__()
        self.c = c
        self.layer_indices = layers
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): HFLayer(c) for i in layers})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_tables(self.c, h.shape[1], h.device)
        for layer in self.model.layers.values():
            h = layer(h, cos, sin)
        return h


def build_stage(directory: str | Path, stage: int, stages: int, *, weights: bool = True,
                seed: int = 0) -> HFStageZero | HFBlockStage:
    """Stage ``stage`` (0 = embedding and head, 1..stages = block stages) of the model in
    ``directory``: its tensors read from the folder's safetensors (``weights``), else drawn
    from (seed, name): normal(0, initializer_range), norm gains 1, biases 0."""
    c = HFConfig.read(directory)
    if not 0 <= stage <= stages:
        raise HFModelError(f"stage {stage} is outside 0..{stages}")
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move torch's RNG
        module = (HFStageZero(c) if stage == 0
                  else HFBlockStage(c, stage_layers(c.n_layers, stages)[stage - 1]))
    if weights:
        load_into(module, directory)
    else:
        init_from_seed(module, seed, c.init_std)
    return module


def tensor_shapes(c: HFConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the whole model and its shape (no memory: built on the meta device)."""
    with torch.device("meta"):
        parts = (HFStageZero(c), HFBlockStage(c, range(c.n_layers)))
    return {k: tuple(v.shape) for part in parts for k, v in part.state_dict().items()}


def init_from_seed(module: nn.Module, seed: int, std: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


def _file_of(directory: Path) -> dict[str, Path] | Path:
    index = directory / INDEX_FILE
    if (directory / SINGLE_FILE).exists() or not index.exists():
        return directory / SINGLE_FILE
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise HFModelError(f"{index} is not a readable safetensors index ({exc!r})") from exc
    return {name: directory / f for name, f in weight_map.items()}


def read_tensors(directory: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the tensors ``names`` from the folder's safetensors (one file or shards)."""
    files = _file_of(Path(directory))
    by_file: dict[Path, list[str]] = {}
    for name in names:
        path = files if isinstance(files, Path) else files.get(name)
        if path is None:
            raise HFModelError(f"{directory}: the index names no file for {name}")
        by_file.setdefault(path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, wanted in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                have = set(f.keys())
                if missing := [n for n in wanted if n not in have]:
                    raise HFModelError(f"{path} lacks {missing[:3]}: the weights do not match "
                                       "config.json")
                for n in wanted:
                    out[n] = f.get_tensor(n)
        except FileNotFoundError:
            raise HFModelError(f"{path} does not exist: the folder has no weights (use "
                               "weights=False to start from the config alone)") from None
        except (OSError, RuntimeError) as exc:
            raise HFModelError(f"{path} is corrupt or unreadable ({exc})") from exc
    return out


def load_into(module: nn.Module, directory: str | Path) -> None:
    """Fill ``module``'s parameters from the folder, checking shapes and finiteness."""
    params = dict(module.named_parameters())
    copy_checked(params, read_tensors(directory, list(params)), HFModelError, "", "config.json")


def run_stages(stage_zero: HFStageZero, blocks: list[HFBlockStage],
               tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``tokens`` through stage 0's embedding, every block stage in order, the head."""
    h = stage_zero.embed(tokens)
    for block in blocks:
        h = block(h)
    return stage_zero.head(h)
