"""bench/bandwidth.py without swarms: its streaming-DiLoCo arm is a valid run spec of the
streaming mode, and its two runs (H and 2H steps) are exactly one sync of every fragment apart,
which is what makes (bytes after 2H - bytes after H) / H the per-step cost."""

from __future__ import annotations

from bench.bandwidth import MODEL, TARGETS, Arm, make_arms, parser
from optim.diloco_streaming import Schedule
from peer.sync.diloco_streaming import StreamingDilocoMode
from peer.sync.registry import make_sync_mode
from protocols.runspec import RunSpec


def test_streaming_arm_spans_one_sync_of_every_fragment() -> None:
    arms = make_arms(parser().parse_args([]))
    stream, equal = arms[5], arms[6]
    spec = RunSpec().replace(**{**MODEL, **stream.changes})
    d = spec.sync.diloco
    assert (d.inner_steps, d.streaming_fragments, d.streaming_delay, d.quant) == (128, 4, 1,
                                                                                   "int4")
    assert d.streaming_alpha == 0.5 and d.inner_lr == RunSpec().sync.diloco.inner_lr
    # allreduce at equal tokens trains at the same AdamW lr: only how they sync differs
    assert equal.changes["optim.lr"] == d.inner_lr
    assert isinstance(make_sync_mode(spec), StreamingDilocoMode)
    schedule = Schedule(d.inner_steps, d.streaming_fragments, d.streaming_delay)
    synced = [schedule.fragment_at(t) for t in range(stream.short + 1, stream.long + 1)]
    assert sorted(p for p in synced if p is not None) == [0, 1, 2, 3]
    # both runs end with every round merged: the last fragment syncs at the run's last step
    assert schedule.fragment_at(stream.short) == schedule.fragment_at(stream.long) == 3
    assert equal.loss_only and equal.long == stream.long and equal.kind == "sync:allreduce"
    assert [t.name for t in TARGETS][-1] == "allreduce/streaming"


def test_per_step_is_half_of_a_replicas_traffic_between_the_runs() -> None:
    arm = Arm("x", {"sync.mode": "diloco"}, 128, 256)
    arm.final = {128: 1_000_000.0, 256: 1_256_000.0}
    assert arm.per_step() == 1000.0  # 256,000 B sent + received over 128 steps, halved
