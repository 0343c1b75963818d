"""bench/activations.py trains through the product's wire codec: every boundary crossing is one
encoded message of the run's encoding, and the arms differ only in that encoding."""

from __future__ import annotations

import math

import numpy as np

from bench.activations import MODEL, train
from peer.pipeline import wire
from peer.pipeline.data import load_corpus
from protocols.runspec import RunSpec


def test_each_microbatch_crosses_every_boundary_once_each_way_in_the_runs_encoding() -> None:
    corpus = load_corpus(None)
    sizes = {}
    for enc in ("fp32", "fp8"):
        spec = RunSpec().replace(**{**MODEL, "pipeline.stages": 2, "pipeline.activations": enc,
                                    "model.d_model": 32, "model.seq_len": 16})
        hosts, losses, link = train(spec, 1, corpus)
        microbatches = spec.pipeline.target_batch // spec.pipeline.microbatch
        assert len(link.sizes) == microbatches * 2 * (spec.pipeline.stages + 1)
        assert all(math.isfinite(x) for x in losses) and [h.step for h in hosts] == [1, 1, 1]
        payload = wire.activation_bytes(spec)
        assert all(payload < s < payload + 1024 for s in link.sizes)  # + header and framing
        sizes[enc] = int(np.median(link.sizes))
    assert 3.5 < sizes["fp32"] / sizes["fp8"] < 4.0  # 1 byte + 4 per 64 values, against 4
