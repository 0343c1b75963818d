"""What every bench prints besides its own table: figures held against targets, and the machine.

A figure compared with a target is rounded toward missing it, never to nearest: a ratio that must
reach 400 and measures 399.96 prints as 399.9 (not a met 400.0), a p99 that must stay under 50 ms
and measures 49.996 prints as 50.00. The verdict is read off the printed figure, so a line never
shows a number that meets the target next to the word "NOT met", or the reverse. Rounding works
on the float's shortest decimal form (`repr`), so 0.29 stays 0.29 at two digits.

`machine()` is the header's description of where the bench ran: what the kernel reports, not what
this project's development machine happened to have.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path


def rounded(value: float, digits: int, *, down: bool) -> str:
    """`value` with `digits` decimals, rounded down (toward -inf) or up (toward +inf)."""
    if not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    step = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(value)).quantize(step, rounding=ROUND_FLOOR if down else ROUND_CEILING))


@dataclass(frozen=True)
class Target:
    """A bound a figure must meet: `>= bound` (at_least) or `<= bound`; `strict` makes it > or <.

    Args:
        name: how the figure is called on the bench's last line, e.g. "allreduce/demo".
        bound: the target.
        at_least: True for a floor (ratios, speed-ups), False for a ceiling (latency, bytes).
        digits: decimals printed.
        strict: the figure must lie strictly on the good side of `bound` (`<` or `>`).
        unit: printed after the figure and the bound, e.g. "ms".
    """

    name: str
    bound: float
    at_least: bool = True
    digits: int = 2
    strict: bool = False
    unit: str = ""

    def figure(self, value: float) -> str:
        """`value` rounded toward missing the target (down for a floor, up for a ceiling)."""
        return rounded(value, self.digits, down=self.at_least)

    def met(self, value: float) -> bool:
        """Whether the printed figure meets the target (nan never does)."""
        shown = float(self.figure(value))
        if math.isnan(shown):
            return False
        if self.at_least:
            return shown > self.bound if self.strict else shown >= self.bound
        return shown < self.bound if self.strict else shown <= self.bound

    @property
    def relation(self) -> str:
        return (">" if self.at_least else "<") + ("" if self.strict else "=")

    def verdict(self, value: float) -> str:
        """`name = figure (target >= bound: met)`, or `... NOT met`; units after both numbers."""
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.name} = {self.figure(value)}{unit} (target {self.relation} "
                f"{self.bound:g}{unit}: {'met' if self.met(value) else 'NOT met'})")


def targets_line(pairs: list[tuple[Target, float]]) -> str:
    """One line holding every figure of a bench against its target, e.g. for the line above the
    bench's last line: `targets: a/b = 1.29 (target >= 1.3: NOT met); ...`."""
    return "targets: " + "; ".join(t.verdict(v) for t, v in pairs)


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name from /proc/cpuinfo ("model name", or "Hardware"/"cpu model" elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown CPU"
    for key in ("model name", "Hardware", "cpu model", "Processor"):
        for line in cpuinfo.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return "unknown CPU"


def machine() -> str:
    """E.g. `2 CPUs (2 usable by this process), AMD EPYC, load 1.35 1.53 1.11`."""
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = total
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return f"{total} CPUs ({usable} usable by this process), {cpu_model()}, load {load}"


def fresh_out(path: str | None, prog: str) -> Path:
    """A bench's runs folder: `path` when it is new or empty, else SystemExit (a reused folder
    would mix an earlier run's metrics files into this one's: bench.wan then "reached" its
    target at once from the old rows); a fresh temporary folder without `path`."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=f"shoal-{prog.replace('.', '-')}-"))
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"{prog}: --out {out} exists and is not an empty folder; give a new "
                         "one (a reused folder would mix in an earlier run's metrics)")
    out.mkdir(parents=True, exist_ok=True)
    return out
