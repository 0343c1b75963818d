"""`sync.mode = "allreduce"`: dense gradients, averaged (the baseline), plain or robust.

- `AllreduceMode`: every replica sends its gradient sums and sample count; the leader sums them
  in peer-id order and divides by every sample the stage saw; every replica applies that mean
  with the stage's AdamW (`StageHost.apply_gradient`). A round nobody saw a sample in is a
  "skip": every replica advances its step without an update.
- `RobustAllreduceMode` (`sync.allreduce.aggregator` = clipped_mean or trimmed_mean):
  `optim.robust.aggregate` over each replica's per-sample mean gradient, so the replicas count
  equally (the price of robustness). `trim` is a fraction per side, rounded up to at least one
  replica when > 0 (optim.robust lowers it for groups too small to trim); `clip_norm` bounds one
  replica's update (L2) for clipped_mean, or <= 0 means the median of the replicas' norms.
  Non-finite or malformed contributions are dropped; meta says who is in the aggregate
  (`included`) and who was dropped and why (`dropped`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import numpy as np
import torch

from optim import robust
from optim.errors import OptimError
from peer.pipeline import wire
from peer.pipeline.stage_host import StageHost
from peer.sync.base import Parts, RoundMode, dropped_text, samples_of, skipped, trim_count
from peer.sync.rounds import Arrays, Meta

log = logging.getLogger("shoal.sync")


class AllreduceMode(RoundMode):
    """Dense gradients, averaged over every sample the stage saw (the baseline)."""

    name = "allreduce"

    def __init__(self, aggregator: str = "mean", trim: float = 0.25, clip_norm: float = 10.0):
        self.aggregator = aggregator
        self.trim = trim
        self.clip_norm = clip_norm

    def contribution(self, host: StageHost) -> tuple[Arrays, Meta]:
        return wire.to_arrays(host.grad_sums()), {"samples": str(host.samples)}

    def aggregate(self, parts: Mapping[str, tuple[Meta, Arrays]]) -> tuple[Arrays, Meta]:
        ids = sorted(p for p, (m, _) in parts.items() if int(m.get("samples", "0")) > 0)
        total = sum(int(parts[p][0]["samples"]) for p in ids)
        meta = {"included": ",".join(sorted(parts)), "samples": str(total)}
        if total == 0:
            return {}, {**meta, "skip": "1"}
        names = sorted(parts[ids[0]][1])
        out: Arrays = {}
        for name in names:
            acc = np.zeros_like(parts[ids[0]][1][name], dtype=np.float32)
            for p in ids:
                acc += parts[p][1][name]
            out[name] = acc / np.float32(total)
        return out, meta

    def apply(self, host: StageHost, result: Arrays, meta: Meta) -> float:
        if meta.get("skip") == "1" or not result:
            host.finish_step()
            return 0.0
        return host.apply_gradient({k: torch.from_numpy(np.array(v)) for k, v in result.items()})


class RobustAllreduceMode(AllreduceMode):
    """Dense allreduce whose average is clipped_mean or trimmed_mean over per-replica means."""

    def aggregate(self, parts: Parts) -> tuple[Arrays, Meta]:
        usable = {r: p for r, p in parts.items() if samples_of(p[0]) > 0}
        dropped = {r: "no samples this step" for r in set(parts) - set(usable)}
        if not usable:
            return skipped(dropped, "no replica saw a sample")
        # the parameter names most replicas sent (ties: the smallest id's) define the stage
        names_of = {r: tuple(sorted(usable[r][1])) for r in sorted(usable)}
        counts = Counter(names_of.values())
        names = next(n for r, n in names_of.items() if counts[n] == max(counts.values()))
        means: dict[str, list[torch.Tensor]] = {}
        for rid in sorted(usable):
            if names_of[rid] != names:
                dropped[rid] = "sent other parameters than the stage's"
                continue
            meta, arrays = usable[rid]
            n = np.float32(samples_of(meta))
            means[rid] = [torch.from_numpy(np.asarray(arrays[k], dtype=np.float32) / n)
                          for k in names]
        try:
            agg = robust.aggregate(means, self.aggregator,  # type: ignore[arg-type]
                                   trim=trim_count(self.trim, len(means)),
                                   max_norm=self.clip_norm if self.clip_norm > 0 else None)
        except OptimError as exc:
            return skipped(dropped, str(exc))
        dropped.update(agg.dropped)
        if dropped:
            log.warning("allreduce round: %s of %d replicas; dropped %s", self.aggregator,
                        agg.count, dropped_text(dropped))
        total = sum(samples_of(parts[r][0]) for r in agg.included)
        out = {k: t.numpy() for k, t in zip(names, agg.tensors, strict=True)}
        return out, {"included": ",".join(agg.included), "dropped": dropped_text(dropped),
                     "detail": agg.detail, "samples": str(total)}
