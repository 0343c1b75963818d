"""How much memory each stage of a run needs: plain arithmetic on the run spec, no torch.

The coordinator places a stage only on a peer whose device has room for it (coordinator/
placement.py), so it needs each stage's footprint before any peer has built one. The estimate:

    parameters x bytes per parameter  (fp32 weights, fp32 grads, the sync mode's optimizer
                                        state, autocast's bf16 weight copies)
  + an activation allowance           (the forward graphs a block stage keeps for their
                                        backward, stage 0's logits)
  + RUNTIME_BYTES, then x (1 + MARGIN)

Parameters per stage follow the same cut as the peers (peer/pipeline/stages.py `stage_layers`:
even, the extra layers to the earliest stages; stage 0 holds the embedding, the final norm and
the head when it is not tied). The built-in decoder's shape comes from the spec; a Hugging Face
model's (`model.hf`) from its config.json when the coordinator can read it (kv heads,
intermediate size, biases, tied head), else from the spec's numbers with a Llama-like MLP and an
untied head. It is an estimate, deliberately on the generous side: a stage that is refused
somewhere it would have fit costs a peer, one placed where it does not fit costs an OOM.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from protocols.runspec import RunSpec

RUNTIME_BYTES = 64 << 20  # kernels' workspaces, allocator slack, the compute thread's buffers
MARGIN = 0.10
FP32 = 4
# Bytes per parameter a replica holds, by sync mode (beyond the fp32 weights): grads, optimizer
# state and the mode's own copies (peer/sync/*): AdamW's two moments; DeMo's momentum; DiLoCo's
# inner AdamW plus the shared parameters and the outer momentum; SPSA has no gradient but keeps a
# copy of the weights while it perturbs them and a hash-checked checkpoint.
MODE_BYTES_PER_PARAM = {"allreduce": 4 + 8, "demo": 4 + 4, "diloco": 4 + 8 + 4 + 4,
                        "spsa": 4 + 4}
AUTOCAST_BYTES_PER_PARAM = 2  # bf16 copies of the weights autocast caches within a pass


@dataclass(frozen=True)
class ModelShape:
    """The numbers a decoder's parameter count and activations depend on."""

    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    source: str = "run spec"  # where the numbers came from (said in refusals)

    def layer_params(self) -> int:
        d, q, kv, i = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, \
            self.intermediate
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0) + \
            (d if self.o_bias else 0)
        mlp = 3 * d * i + (2 * i + d if self.mlp_bias else 0)
        return attn + mlp + 2 * d  # two RMSNorm gains

    def stage_zero_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def llama_ffn(d_model: int, multiple_of: int = 64) -> int:
    """The built-in decoder's SwiGLU width (peer/pipeline/model.py ModelConfig.ffn_hidden)."""
    return -(-int(8 * d_model / 3) // multiple_of) * multiple_of


def shape_of(spec: RunSpec) -> ModelShape:
    """The model's shape: the built-in decoder's from the spec, a Hugging Face model's from its
    config.json when readable here (see the module docstring)."""
    m = spec.model
    if not m.hf:
        return ModelShape(m.d_model, llama_ffn(m.d_model), m.n_layers, m.n_heads, m.n_heads,
                          m.d_model // m.n_heads, m.vocab, tied=True)
    try:
        c = json.loads((Path(m.hf) / "config.json").read_text())
        heads = int(c["num_attention_heads"])
        qwen = (c.get("architectures") or [""])[0] == "Qwen2ForCausalLM"
        return ModelShape(
            int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"]),
            heads, int(c.get("num_key_value_heads") or heads),
            int(c.get("head_dim") or int(c["hidden_size"]) // heads), int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qwen or bool(c.get("attention_bias", False)),
            o_bias=not qwen and bool(c.get("attention_bias", False)),
            mlp_bias=not qwen and bool(c.get("mlp_bias", False)),
            source=f"{m.hf}/config.json")
    except (OSError, ValueError, KeyError, TypeError):
        return ModelShape(m.d_model, llama_ffn(m.d_model), m.n_layers, m.n_heads, m.n_heads,
                          m.d_model // m.n_heads, m.vocab, tied=False,
                          source="run spec (model.hf's config.json not readable here)")


def layers_per_stage(n_layers: int, n_block_stages: int) -> list[int]:
    """Each block stage's layer count (peer/pipeline/stages.py `stage_layers`)."""
    base, extra = divmod(n_layers, max(1, n_block_stages))
    return [base + (1 if s < extra else 0) for s in range(n_block_stages)]


def stage_params(spec: RunSpec, shape: ModelShape | None = None) -> list[int]:
    """Trainable parameters of stages 0..S (CheckFree+'s edge copies are counted in
    `stage_bytes`: buffers, not parameters)."""
    shape = shape or shape_of(spec)
    layers = layers_per_stage(shape.n_layers, spec.pipeline.stages)
    return [shape.stage_zero_params()] + [n * shape.layer_params() for n in layers]


def pending_samples(spec: RunSpec) -> int:
    """Samples a block replica may hold forward graphs for (stage_host.PendingLimits.of)."""
    p = spec.pipeline
    return 2 * max(p.target_batch, p.microbatch) + p.microbatch


def activation_bytes(spec: RunSpec, stage: int, shape: ModelShape | None = None) -> int:
    """The activation allowance of `stage`, in fp32 (bf16 halves most of it: not counted).

    A block layer keeps about 12 x hidden + 4 x intermediate values per position for its
    backward (norms, q/k/v, attention output, the MLP's three projections; SDPA keeps no T x T
    matrix), for every sample it holds a graph of. Stage 0 holds each pending sample's embedding
    and, for one microbatch at a time, the logits with their softmax and gradient."""
    shape = shape or shape_of(spec)
    t, d = spec.model.seq_len, shape.hidden
    if stage == 0:
        return FP32 * t * (pending_samples(spec) * d + 3 * spec.pipeline.microbatch * shape.vocab)
    layers = layers_per_stage(shape.n_layers, spec.pipeline.stages)[stage - 1]
    per_position = 12 * d + 4 * shape.intermediate
    return FP32 * pending_samples(spec) * t * per_position * layers


def stage_bytes(spec: RunSpec) -> list[int]:
    """Estimated bytes each stage 0..S needs on a replica's device (see the module docstring)."""
    shape = shape_of(spec)
    per_param = FP32 + MODE_BYTES_PER_PARAM.get(spec.sync.mode, 12) + AUTOCAST_BYTES_PER_PARAM
    out = []
    for i, n in enumerate(stage_params(spec, shape)):
        edge = 0
        if i in (1, spec.pipeline.stages) and i > 0 and spec.pipeline.checkfree_plus:
            edge = FP32 * (shape.vocab * shape.hidden + shape.hidden)
        raw = n * per_param + edge + activation_bytes(spec, i, shape) + RUNTIME_BYTES
        out.append(math.ceil(raw * (1.0 + MARGIN)))
    return out


def gib(n: int) -> str:
    """`n` bytes for a message: "1.50 GiB" (MiB below one GiB)."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"
