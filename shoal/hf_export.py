"""Export of a run that trained a Hugging Face model (run spec ``model.hf``): the stages' state
dicts (transformers' names already, peer/pipeline/hf.py) merged by union into
``model.safetensors`` (sharded past 2 GB, as ``save_model``), with the source folder's
config.json, generation config and tokenizer files copied beside it, so transformers loads the
trained model as it loaded the original. A source without tokenizer files gets Shoal's byte
tokenizer (peer/pipeline/hf_format.py): until a tokenizer feeds the data, the run trained on bytes
as ids 0-255."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from peer.pipeline import hf_format
from peer.pipeline.checkpoint import ExportError
from peer.pipeline.hf import HFConfig, HFModelError, tensor_shapes

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def save_hf_model(out: str | os.PathLike[str], source: str,
                  states: Sequence[Mapping[str, torch.Tensor]], metadata: Mapping[str, str],
                  max_shard_bytes: int = hf_format.MAX_SHARD_BYTES) -> Path:
    """Write stage 0's and each block stage's state (in order) as one model folder."""
    try:
        expected = tensor_shapes(HFConfig.read(source))
    except HFModelError as exc:
        raise ExportError(f"model.hf: {exc}") from exc
    full: dict[str, torch.Tensor] = {}
    for s, state in enumerate(states):
        for k, v in state.items():
            if k in full:
                raise ExportError(f"{k} comes from two stages (the second is stage {s})")
            full[k] = v.detach().to("cpu").float().contiguous()
    if missing := sorted(set(expected) - set(full)):
        raise ExportError(f"missing tensors {missing[:3]}: export again with every stage live")
    if extra := sorted(set(full) - set(expected)):
        raise ExportError(f"unexpected tensors {extra[:3]}: not this model's stages")
    for k, v in full.items():
        if tuple(v.shape) != expected[k] or not bool(torch.isfinite(v).all()):
            raise ExportError(f"{k}: shape {tuple(v.shape)} (need {expected[k]}) or not finite")
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    header = {**{str(k): str(v) for k, v in metadata.items()}, "format": "pt"}
    groups = hf_format.shard(full, max_shard_bytes)
    names = ([hf_format.SINGLE_FILE] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, group in zip(names, groups, strict=True):
        tmp = dest / f".{name}.tmp"
        save_file(group, str(tmp), metadata=header)
        os.replace(tmp, dest / name)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * 4 for v in full.values())},
                 "weight_map": {k: n for n, g in zip(names, groups, strict=True) for k in g}}
        hf_format.write_atomic(dest / hf_format.INDEX_FILE, json.dumps(index, indent=2) + "\n")
    for stale in hf_format.stale_weight_files(dest, {*names, *([hf_format.INDEX_FILE]
                                                               if len(groups) > 1 else [])}):
        stale.unlink()
    config = json.loads((Path(source) / "config.json").read_text())
    config.update({"torch_dtype": "float32", "dtype": "float32",
                   "shoal_trained": {"source": str(source), **metadata}})
    for name in COPIED[1:]:
        if (Path(source) / name).exists():
            shutil.copyfile(Path(source) / name, dest / f".{name}.tmp")
            os.replace(dest / f".{name}.tmp", dest / name)
    if not any((Path(source) / n).exists() for n in COPIED[2:]):  # trained on bytes: ids 0-255
        for name, content in hf_format.tokenizer_files(int(
                config.get("max_position_embeddings") or 2048)).items():
            hf_format.write_atomic(dest / name, json.dumps(content, indent=2) + "\n")
    hf_format.write_atomic(dest / "config.json", json.dumps(config, indent=2) + "\n")
    return dest
