"""What a long-running `shoal peer` tells its operator: one progress line every few seconds.

A daemon on a spot instance can run for days; its log should say, without the dashboard, what it
holds and whether it moves. `ProgressReporter.due()` decides when the next line is owed (every
`every_s` seconds, and at once when the state changes); `progress_fields()` is a pure function of
two successive stats snapshots, so rates are measured over the interval, not since start-up.
With `--log-format json` the same fields travel as JSON keys (protocols/logs.py `fields`).
`peer_stats` assembles what a heartbeat reports from the daemon's parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peer.pipeline.driver import Driver
from peer.pipeline.stage_host import StageHost
from peer.pipeline.wire import ByteCounter
from protocols.coordinator_client import PeerStats
from protocols.recovery_report import RecoveryReport


def peer_stats(state: str, samples_per_s: float, queue: int, counter: ByteCounter,
               host: StageHost | None, driver: Driver | None, state_hash: str,
               recovery: RecoveryReport | None) -> PeerStats:
    """What one heartbeat reports: the counters of the host, the driver (stage 0) and the wire;
    the last rebuild travels as its `recovery:` key (protocols/recovery_report.py)."""
    h = host
    return PeerStats(
        state=state,
        samples_per_s=samples_per_s,
        queue=queue,
        bytes_sent=counter.total_sent(),
        bytes_received=counter.total_received(),
        loss=driver.last_loss if driver else math.nan,
        step=h.step if h else 0,
        tokens_per_s=driver.tokens_per_s if driver else 0.0,
        dropped_microbatches=(driver.dropped if driver else 0) + (h.dropped if h else 0),
        grad_norm=h.last_grad_norm if h else 0.0,
        state_hash=state_hash,
        bytes_by_kind={**counter.by_kind(),
                       **({recovery.wire_key(): recovery.step} if recovery is not None else {})},
        microbatches_done=driver.done if driver else 0,
        held_stage=h.stage if h else -1,
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def progress_fields(stage: int, now: PeerStats, before: PeerStats | None,
                    seconds: float) -> dict[str, object]:
    """The numbers of one progress line; rates are over `seconds` since `before`."""
    dt = max(seconds, 1e-6)
    sent = now.bytes_sent - (before.bytes_sent if before else 0)
    recv = now.bytes_received - (before.bytes_received if before else 0)
    steps = now.step - (before.step if before else now.step)
    out: dict[str, object] = {
        "stage": stage, "state": now.state, "step": now.step,
        "steps_per_min": round(60.0 * steps / dt, 2) if before else None,
        "samples_per_s": round(now.samples_per_s, 1), "queue": now.queue,
        "bytes_sent": now.bytes_sent, "bytes_received": now.bytes_received,
        "send_bytes_per_s": round(sent / dt) if before else None,
        "recv_bytes_per_s": round(recv / dt) if before else None,
        "dropped_microbatches": now.dropped_microbatches,
    }
    if stage == 0 and math.isfinite(now.loss):
        out["loss"] = round(now.loss, 4)
        out["tokens_per_s"] = round(now.tokens_per_s, 1)
    return out


def progress_text(f: dict[str, object]) -> str:
    """The human form of `progress_fields`: one line, stage first."""
    parts = [f"stage {f['stage']}", str(f["state"]), f"step {f['step']}"]
    if f.get("steps_per_min") is not None:
        parts.append(f"{f['steps_per_min']:.1f} steps/min")
    parts.append(f"{f['samples_per_s']} samples/s")
    if "loss" in f:
        parts.append(f"loss {f['loss']:.3f}, {f['tokens_per_s']:,.0f} tok/s")
    sent, recv = int(f["bytes_sent"]), int(f["bytes_received"])  # type: ignore[call-overload]
    io = f"sent {_mb(sent)}, received {_mb(recv)}"
    if f.get("send_bytes_per_s") is not None:
        io += (f" (now ↑ {_mb(float(f['send_bytes_per_s']))}/s"  # type: ignore[arg-type]
               f" ↓ {_mb(float(f['recv_bytes_per_s']))}/s)")  # type: ignore[arg-type]
    parts.append(io)
    if f["queue"]:
        parts.append(f"queue {f['queue']}")
    if f["dropped_microbatches"]:
        parts.append(f"{f['dropped_microbatches']} microbatches dropped")
    return " · ".join(parts)


@dataclass
class ProgressReporter:
    """Owes a line every `every_s` seconds (0 = never) and whenever the peer's state changes."""

    every_s: float = 30.0
    _last_t: float | None = None
    _last: PeerStats | None = None

    def due(self, stats: PeerStats, t: float) -> bool:
        if self.every_s <= 0:
            return False
        if self._last_t is None or self._last is None:
            return True
        return stats.state != self._last.state or t - self._last_t >= self.every_s

    def take(self, stage: int, stats: PeerStats, t: float) -> dict[str, object]:
        seconds = t - self._last_t if self._last_t is not None else 0.0
        fields = progress_fields(stage, stats, self._last, seconds)
        self._last_t, self._last = t, stats
        return fields
