"""The `recovery:` report: how a peer rebuilt a stage, as it travels in a heartbeat.

A peer that rebuilt a stage without a replica (peer/recovery/rebuild.py) says what it did inside
its heartbeat stats, as the `bytes_by_kind` key `recovery:<method>:<sources>` (value: the step the
stage was rebuilt at), the one free-form map a heartbeat has. The coordinator
(coordinator/membership.py) takes the key out again (it is not bytes) and turns it into the
rebuild event's detail. Both ends encode and parse it here.

Methods: "weighted_average" and "copy_neighbor" are CheckFree / CheckFree+ proper, as is
"edge_copy" (stage 0 from the copy of it a CheckFree+ edge stage keeps); "snapshot",
"copy_nearest" and "initial" are degraded recoveries. Sources are block stages.
"""

from __future__ import annotations

from dataclasses import dataclass

RECOVERY_KEY = "recovery:"
#: the methods that are a full CheckFree recovery; every other method is degraded
FULL_METHODS = ("weighted_average", "copy_neighbor", "edge_copy")
MAX_KEY_CHARS = 64  # a heartbeat key stays printable and short


@dataclass(frozen=True)
class RecoveryReport:
    """How a stage was rebuilt: method is "weighted_average", "copy_neighbor", "snapshot",
    "copy_nearest" or "initial"; sources are the block stages it came from."""

    stage: int
    method: str
    sources: tuple[int, ...]
    step: int
    weights: tuple[float, float] | None = None
    note: str = ""

    @property
    def degraded(self) -> bool:
        return self.method not in FULL_METHODS

    def wire_key(self) -> str:
        """The heartbeat bytes_by_kind key that carries this report (printable, <= 64 chars)."""
        return f"{RECOVERY_KEY}{self.method}:{','.join(map(str, self.sources))}"[:MAX_KEY_CHARS]


def is_report_key(key: str) -> bool:
    """Whether a bytes_by_kind key is a recovery report rather than a byte count."""
    return key.startswith(RECOVERY_KEY)


def parse_wire_key(key: str) -> tuple[str, tuple[int, ...]] | None:
    """(method, sources) of a `recovery:` key, or None if `key` is not a well-formed one."""
    if not is_report_key(key):
        return None
    method, _, src = key[len(RECOVERY_KEY):].partition(":")
    try:
        sources = tuple(int(x) for x in src.split(",") if x)
    except ValueError:
        return None
    return (method, sources) if method else None


def describe(key: str, step: int) -> str:
    """The coordinator's text for one report key (lenient: a malformed key is still shown)."""
    method, _, sources = key[len(RECOVERY_KEY):].partition(":")
    text = f"{method or '?'}" + (f" of stages {sources}" if sources else "")
    if method not in FULL_METHODS:
        text += " (DEGRADED)"
    return f"{text} at step {step}"
