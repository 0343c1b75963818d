"""`shoal generate`: sample text from a model written by `shoal export` or `shoal demo --out`.

Reads `model.safetensors` + `config.json` (peer/pipeline/checkpoint.py) and samples bytes on this
machine, no swarm needed. `--skip R` runs only round(n * (1 - R)) of the n layers, spread evenly
(the first and last kept): the layer-skipping that SkipPipe trains a model to tolerate.
"""

from __future__ import annotations

import argparse
import sys

from peer.pipeline.checkpoint import decode, generate, kept_layers, load_model


def generate_main(args: argparse.Namespace) -> int:
    if not 0.0 <= args.skip < 1.0:
        print(f"shoal generate: --skip {args.skip}: give the fraction of layers to skip, in "
              "[0, 1) (0.5 runs half of them)", file=sys.stderr)
        return 2
    model = load_model(args.model)
    n = model.config.n_layers
    layers = kept_layers(n, args.skip) if args.skip else None
    if layers is not None:  # on stderr: stdout is the text alone
        print(f"shoal generate: running layers {', '.join(map(str, layers))} of {n} "
              f"(--skip {args.skip})", file=sys.stderr)
    text = generate(model, args.prompt.encode(), args.tokens, temperature=args.temperature,
                    top_k=args.top_k, seed=args.seed, layers=layers)
    print(args.prompt + decode(text))
    return 0
