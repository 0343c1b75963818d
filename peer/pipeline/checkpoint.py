"""A trained model out of the swarm and back into one process: assembling, files, sampling.

``shoal export`` pulls one state dict per stage from live peers, ``assemble`` merges them into a
``Decoder`` state dict, and ``save_model`` writes the directory ``shoal generate`` reads, in
Hugging Face's Llama layout (peer/pipeline/hf_format.py: ``transformers`` loads it as it is):

    model.safetensors   the weights under Llama's names (the tied head is stored once, as
                        model.embed_tokens.weight; rotary tables are recomputed, never stored);
                        sharded with model.safetensors.index.json past 2 GB
    config.json         LlamaForCausalLM's config; its "shoal" section is
                        {"format": "shoal-decoder", "version": 2, "model": {ModelConfig}, ...}
    generation_config.json, tokenizer.json, tokenizer_config.json (bytes are ids 0-255)

``load_config`` / ``load_model`` also read the version-1 layout of earlier exports (config.json
is the {"format": "shoal-decoder", "version": 1, ...} description, Shoal's own tensor names).

Invariants: ``load_model`` trusts nothing on disk (no pickle, ever: safetensors only) and refuses,
with a message that says what to do, a file that is corrupt, a tensor that is missing, extra,
mis-shaped against config.json, not floating point, or not finite. ``save_model`` runs the same
checks before writing, and writes each file under a temporary name and renames it into place,
so a crash never leaves a half-written file with the final name. ``generate`` is a pure function
of (model, prompt, settings, seed): sampling uses its own CPU generator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peer.pipeline import hf_format
from peer.pipeline.model import EDGE_COPY_KEYS, Decoder, ModelConfig
from peer.pipeline.stages import count_params, layer_of

FORMAT = "shoal-decoder"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ExportError(ValueError):
    """A model directory or state dict that cannot be written or loaded as a Shoal model."""


def assemble(
    stage_zero_state: Mapping[str, torch.Tensor],
    block_stage_states: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Merge stage 0's state and one state per block stage into a Decoder state dict.

    Keys are global already (``layers.<i>.``), so this is a checked union: each layer must come
    from exactly one stage and together they must cover 0..L-1. CheckFree+ edge copies are
    dropped: stage 0's own embedding and norm are the ones exported.
    """
    full: dict[str, torch.Tensor] = {}
    owner: dict[int, int] = {}
    for s, state in enumerate(block_stage_states):
        for key, value in state.items():
            if key in EDGE_COPY_KEYS:
                continue
            if (i := layer_of(key)) is None:
                raise ExportError(f"block stage {s} holds unexpected key {key!r}")
            if owner.setdefault(i, s) != s:
                raise ExportError(f"layer {i} comes from both block stage {owner[i]} and {s}; "
                                  "pass one replica of each stage")
            full[key] = value
    if missing := sorted(set(range(max(owner, default=0) + 1)) - set(owner)):
        raise ExportError(f"no block stage holds layers {missing}; pass every stage")
    for key in ("embedding.weight", "norm.weight"):
        if key not in stage_zero_state:
            raise ExportError(f"stage 0's state lacks {key!r}; pass stage 0's state dict first")
        full[key] = stage_zero_state[key]
    return full


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def validate_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor]) -> None:
    """Raise ExportError unless ``state`` is exactly a finite float Decoder state for ``config``."""
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in Decoder(config).state_dict().items()}
    if missing := sorted(set(expected) - set(state)):
        raise ExportError(f"missing tensors {_names(missing)}: the model is incomplete; export "
                          "it again with every stage live")
    if extra := sorted(set(state) - set(expected)):
        raise ExportError(f"unexpected tensors {_names(extra)}: not a Shoal decoder of this "
                          "config (another program, or another version, wrote them)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ExportError(f"tensor {name} has shape {tuple(tensor.shape)} but the config "
                              f"(d_model={config.d_model}, n_heads={config.n_heads}) needs "
                              f"{expected[name]}: the weights and config.json are from "
                              "different models")
        if not tensor.is_floating_point():
            raise ExportError(f"tensor {name} has dtype {tensor.dtype}; weights must be float")
        if bad := int((~torch.isfinite(tensor)).sum()):
            raise ExportError(f"tensor {name} holds {bad} non-finite values (NaN or inf): the "
                              "run diverged; export an earlier state instead")


def save_model(
    directory: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int = hf_format.MAX_SHARD_BYTES,
) -> Path:
    """Validate and write the model into ``directory`` in Hugging Face's Llama layout
    (peer/pipeline/hf_format.py): weights, config, generation config, byte tokenizer.

    ``metadata`` (e.g. run id, step) goes into config.json's "shoal" section and the weight
    files' headers, as strings. Past ``max_shard_bytes`` the weights are sharded with an index.
    """
    validate_state_dict(config, state_dict)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {hf_format.to_hf_name(k): v.detach().to("cpu").contiguous()
               for k, v in state_dict.items()}
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    section = {"format": FORMAT, "version": hf_format.HF_VERSION, "model": config.to_dict(),
               "parameters": sum(v.numel() for v in tensors.values()), "metadata": extra}
    header = {**extra, "format": "pt", "shoal_format": FORMAT}  # transformers wants "pt"
    groups = hf_format.shard(tensors, max_shard_bytes)
    written = set()
    if len(groups) == 1:
        names = [hf_format.SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        tmp = out / f".{name}.tmp"
        save_file(group, str(tmp), metadata=header)
        os.replace(tmp, out / name)
        written.add(name)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {k: n for n, g in zip(names, groups, strict=True) for k in g}}
        hf_format.write_atomic(out / hf_format.INDEX_FILE, json.dumps(index, indent=2) + "\n")
        written.add(hf_format.INDEX_FILE)
    for stale in hf_format.stale_weight_files(out, written):
        stale.unlink()
    files = {"generation_config.json": hf_format.generation_config(),
             **hf_format.tokenizer_files(config.seq_len),
             CONFIG_FILE: hf_format.hf_config(config, section)}  # config.json last
    for name, content in files.items():
        hf_format.write_atomic(out / name, json.dumps(content, indent=2) + "\n")
    return out


def _description(directory: str | os.PathLike[str]) -> dict:
    """Shoal's description of a model directory: config.json's "shoal" section (the Hugging Face
    layout, version 2) or config.json itself (Shoal's own layout, version 1)."""
    path = Path(directory) / CONFIG_FILE
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist: {directory} is not an exported model; "
                          "make one with `shoal export`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not readable JSON ({exc}); export the model again") from exc
    if isinstance(description, dict) and isinstance(description.get(hf_format.SHOAL_KEY), dict):
        description = description[hf_format.SHOAL_KEY]
        version = hf_format.HF_VERSION
    else:
        version = VERSION
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ExportError(f"{path} does not describe a Shoal model (format != {FORMAT!r}, and "
                          f"no {hf_format.SHOAL_KEY!r} section)")
    if description.get("version") != version:
        raise ExportError(f"{path} has format version {description.get('version')}; this "
                          f"Shoal reads version {version} there")
    return description


def load_config(directory: str | os.PathLike[str]) -> ModelConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(_description(directory).get("model", {}))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path}: bad model config: {exc}") from exc


def load_state(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The weights of an exported model under Shoal's names (either layout), unchecked."""
    hf = _description(directory)["version"] == hf_format.HF_VERSION
    try:
        files = (hf_format.weight_files(Path(directory)) if hf
                 else [Path(directory) / WEIGHTS_FILE])
    except ValueError as exc:
        raise ExportError(f"{exc}; export the model again") from exc
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(str(path))
        except FileNotFoundError:
            raise ExportError(f"{path} does not exist; export the model again") from None
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"{path} is corrupt or truncated ({exc}); export the model again "
                              "or copy it over once more") from exc
        state.update({hf_format.from_hf_name(k) if hf else k: v for k, v in part.items()})
    return state


def load_model(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> Decoder:
    """Read and validate an exported model (either layout); returns a Decoder on ``device``."""
    config = load_config(directory)
    state = load_state(directory)
    validate_state_dict(config, state)
    model = Decoder(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device)


def describe(model: Decoder) -> str:
    c = model.config
    return (f"Shoal decoder: {count_params(model):,} parameters, {c.n_layers} layers, "
            f"d_model {c.d_model}, {c.n_heads} heads, context {c.seq_len} bytes")


# --------------------------------------------------------------------------- sampling


def kept_layers(n_layers: int, skip_ratio: float) -> list[int]:
    """The layers ``shoal generate --skip R`` runs: round(n * (1 - R)) of them, spread evenly,
    in order, the first and last always among them when two or more are kept."""
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"skip ratio must be in [0, 1), got {skip_ratio}")
    keep = max(1, round(n_layers * (1.0 - skip_ratio)))
    if keep == 1:
        return [0]
    return sorted({round(j * (n_layers - 1) / (keep - 1)) for j in range(keep)})


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    context: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    *,
    seq_len: int,
    vocab: int = 256,
) -> list[int]:
    """Sample ``max_new_tokens`` token ids after ``context`` (not empty); returns the new ids.

    ``model(window, layers)`` gives logits [1, T, vocab] (a ``Decoder``, or
    ``shoal.generate``'s wrapper of a transformers model, which takes ``layers=None`` only).
    ``temperature`` 0 is greedy. ``top_k`` keeps the k likeliest. The window is the last
    ``seq_len`` ids. No KV cache: each id recomputes its window, which is fine at these sizes.
    """
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and not 1 <= top_k <= vocab):
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and top_k in 1..{vocab}; "
                         f"got {max_new_tokens}, {temperature}, {top_k}")
    if not context:
        raise ValueError("generation needs a context of at least one token")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    context = list(context)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([context[-seq_len:]], device=device)
        logits = model(window, layers)[0, -1].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                logits[logits < torch.topk(logits, top_k).values[-1]] = float("-inf")
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        context.append(token)
        new.append(token)
    return new


def generate(
    model: Decoder,
    prompt: bytes,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> bytes:
    """Sample ``max_new_tokens`` bytes after ``prompt``; returns only the new bytes.

    ``generate_ids`` over bytes: ``layers`` runs a subset or reordering of the layers
    (``kept_layers`` for ``--skip``); the context is the last ``seq_len`` bytes; an empty prompt
    starts from a newline. A pure function of (model, prompt, settings, seed).
    """
    return bytes(generate_ids(model, list(prompt) or [ord("\n")], max_new_tokens, temperature,
                              top_k, seed, layers, seq_len=model.config.seq_len))


def decode(data: bytes) -> str:
    """Bytes to text for display; invalid UTF-8 (a model can emit any byte) becomes U+FFFD."""
    return data.decode("utf-8", errors="replace")
