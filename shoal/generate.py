"""`shoal generate`: sample text from a model written by `shoal export` or `shoal demo --out`.

Two engines, the same sampling loop (``peer.pipeline.checkpoint.generate_ids``: the window is the
last ``seq_len`` tokens, sampling draws from its own seeded CPU generator), so the numbers agree:

- ``shoal``: Shoal's own Decoder from the export (either layout; no transformers needed). `--skip
  R` runs only round(n * (1 - R)) of the n layers, spread evenly (the first and last kept): the
  layer-skipping that SkipPipe trains a model to tolerate.
- ``transformers``: ``AutoModelForCausalLM`` and ``AutoTokenizer`` on the directory: any local
  Hugging Face causal LM (a Shoal export is a Llama with a byte tokenizer).

``--engine auto`` (the default) takes ``shoal`` for a Shoal export and ``transformers`` for any
other model directory. ``--greedy`` (temperature 0) is deterministic; so is sampling, per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from peer.pipeline.checkpoint import (
    ExportError,
    decode,
    generate,
    generate_ids,
    kept_layers,
    load_model,
)
from peer.pipeline.hf_format import SHOAL_KEY


class CausalLM(torch.nn.Module):
    """A transformers causal LM as ``generate_ids`` calls one: ``(tokens, layers) -> logits``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, layers: object = None) -> torch.Tensor:
        if layers is not None:
            raise ValueError("a transformers model runs all of its layers")
        return self.model(tokens).logits


def is_shoal_export(directory: str | Path) -> bool:
    """True for a directory Shoal wrote (or one without a readable config.json: the Shoal
    engine then says what is wrong)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or SHOAL_KEY in config or "format" in config


def transformers_generate(directory: str, prompt: str, max_new_tokens: int,
                          temperature: float, top_k: int | None, seed: int) -> str:
    """The new text after ``prompt`` from a Hugging Face model directory (local files only)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ExportError("the transformers engine needs transformers: pip install "
                          "'shoal[hf]' (or use --engine shoal on a Shoal export)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{directory}: transformers cannot load it ({exc})") from exc
    model = model.float().eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0]
    config = model.config
    seq_len = int(getattr(config, "max_position_embeddings", 0) or len(ids) + max_new_tokens)
    new = generate_ids(CausalLM(model), ids, max_new_tokens, temperature, top_k, seed,
                       seq_len=seq_len, vocab=int(config.vocab_size))
    return tokenizer.decode(new)


def generate_main(args: argparse.Namespace) -> int:
    if not 0.0 <= args.skip < 1.0:
        print(f"shoal generate: --skip {args.skip}: give the fraction of layers to skip, in "
              "[0, 1) (0.5 runs half of them)", file=sys.stderr)
        return 2
    temperature = 0.0 if args.greedy else args.temperature
    engine = args.engine
    if engine == "auto":
        engine = "shoal" if is_shoal_export(args.model) else "transformers"
    try:
        if engine == "transformers":
            if args.skip:
                print("shoal generate: --skip needs --engine shoal (a Shoal export)",
                      file=sys.stderr)
                return 2
            text = transformers_generate(args.model, args.prompt, args.tokens, temperature,
                                         args.top_k, args.seed)
            print(args.prompt + text)
            return 0
        model = load_model(args.model)
    except ExportError as exc:
        print(f"shoal generate: {exc}", file=sys.stderr)
        return 2
    n = model.config.n_layers
    layers = kept_layers(n, args.skip) if args.skip else None
    if layers is not None:  # on stderr: stdout is the text alone
        print(f"shoal generate: running layers {', '.join(map(str, layers))} of {n} "
              f"(--skip {args.skip})", file=sys.stderr)
    text = generate(model, args.prompt.encode(), args.tokens, temperature=temperature,
                    top_k=args.top_k, seed=args.seed, layers=layers)
    print(args.prompt + decode(text))
    return 0
