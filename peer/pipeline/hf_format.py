"""The Hugging Face layout of an exported Shoal model: names, config, shards, tokenizer files.

``peer.pipeline.checkpoint.save_model`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load
as they are (no transformers needed to write it):

    config.json                   LlamaForCausalLM's config, plus a "shoal" section (Shoal's
                                  ModelConfig, the export's metadata) that Shoal reads back
    model.safetensors             the weights under Llama's names; past ``max_shard_bytes``
    (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    generation_config.json        no BOS/EOS: a byte-level model stops at max_new_tokens
    tokenizer.json                bytes 0-255 are ids 0-255 (a BPE with no merges over GPT-2's
    tokenizer_config.json         byte-to-character table, so any text round-trips as UTF-8)

Why the built-in decoder *is* a Llama (peer/pipeline/model.py against transformers'
modeling_llama): RMSNorm in fp32 with eps inside the root and the gain after; rotary in the
"rotate half" layout (the first half of a head's features pairs with the second, as HF's
``rotate_half``), so q/k rows need no permutation; inv_freq = theta^(-2i/d); SwiGLU
down(silu(gate(x)) * up(x)); no biases anywhere; as many key/value heads as query heads; the head
tied to the embedding (``tie_word_embeddings``: only ``model.embed_tokens.weight`` is stored).
tests/peer/test_hf_export.py checks the logits against transformers'.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from peer.pipeline.model import VOCAB_SIZE, ModelConfig

SHOAL_KEY = "shoal"  # config.json's section with Shoal's own config
HF_VERSION = 2  # the shoal-decoder format's version in this layout (1: Shoal's own names)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_SHARD_BYTES = 2 * 10**9

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_ENDS = {"embedding.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_ENDS_BACK = {v: k for k, v in _ENDS.items()}


def to_hf_name(name: str) -> str:
    """Shoal's parameter name -> Llama's (``layers.3.attn.wq.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); an unknown name is returned as it is."""
    if name in _ENDS:
        return _ENDS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
    return name


def from_hf_name(name: str) -> str:
    """Inverse of ``to_hf_name``; a name Shoal does not know is returned as it is."""
    if name in _ENDS_BACK:
        return _ENDS_BACK[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_BACK:
        return f"layers.{parts[2]}.{_LAYER_BACK[parts[3]]}"
    return name


def hf_config(config: ModelConfig, shoal_section: Mapping[str, object]) -> dict[str, object]:
    """config.json for LlamaForCausalLM with ``config``'s numbers (both the transformers 4
    ``rope_theta`` and the 5 ``rope_parameters`` spelling), Shoal's own under "shoal"."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "initializer_range": config.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
        SHOAL_KEY: dict(shoal_section),
    }


def generation_config() -> dict[str, object]:
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
            "do_sample": False}


# --------------------------------------------------------------------------- the tokenizer


def byte_chars() -> list[str]:
    """GPT-2's printable character for each byte (ByteLevel's table): byte b is ``chars[b]``."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_files(seq_len: int) -> dict[str, dict[str, object]]:
    """tokenizer.json and tokenizer_config.json: text -> its UTF-8 bytes as ids 0-255, ids ->
    bytes -> text (invalid UTF-8 decodes to U+FFFD, as ``checkpoint.decode``)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: b for b, c in enumerate(byte_chars())}, "merges": []},
    }
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
                "clean_up_tokenization_spaces": False, "add_bos_token": False,
                "add_eos_token": False, "added_tokens_decoder": {}}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": settings}


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def shard(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most ``max_bytes`` (a bigger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: model.safetensors, or the shards its index
    names (in order)."""
    single = directory / SINGLE_FILE
    index = directory / INDEX_FILE
    if single.exists() or not index.exists():
        return [single]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index} is not a readable safetensors index ({exc})") from exc


def stale_weight_files(directory: Path, written: set[str]) -> list[Path]:
    """Weight files of an earlier export in ``directory`` that this one did not write."""
    return [p for p in directory.iterdir()
            if (p.name in (SINGLE_FILE, INDEX_FILE) or SHARD_RE.fullmatch(p.name))
            and p.name not in written]
