"""What the daemon learns about the machine it starts on: the torch device, a self-benchmark for
the coordinator's assignment, the coordinator's address by mDNS when none was given; and how the
process is set up (torch threads, uvloop)."""

from __future__ import annotations

import os
import time

import torch

from protocols.coordinator_client import Benchmark


def device(choice: str) -> str:
    """The torch device for `--device` (auto: CUDA when visible)."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    return choice


def benchmark(throttle: float, simulate_speed: float = 0.0) -> Benchmark:
    """A cheap fixed probe (blocks ~0.1 s: run it off the event loop): peers of one run compare
    like with like. `throttle` slows the reported rate as it slows compute; `simulate_speed` > 0
    replaces it (the simulated swarms of tests and benches)."""
    name = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    a = torch.randn(256, 256)
    for _ in range(20):
        a = torch.tanh(a @ a / 16)
    rate = 20 / (time.perf_counter() - t0) / max(throttle, 1e-3)
    if simulate_speed > 0:
        rate = simulate_speed
    return Benchmark(samples_per_s=rate, device=name,
                     memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


async def discover_coordinator() -> str:
    """HOST:PORT of the first coordinator mDNS finds on this LAN (SystemExit when none)."""
    from protocols.discovery import discover  # zeroconf only when asked for

    found = await discover(timeout=5.0)
    if not found:
        raise SystemExit("no coordinator given and none found by mDNS on this LAN: pass "
                         "--coordinator HOST:PORT or set SHOAL_COORDINATOR")
    host, port, _ = found[0]
    return f"{host}:{port}"


def prepare_process() -> None:
    """Torch's thread count from SHOAL_TORCH_THREADS (0: torch's default); uvloop when present."""
    threads = int(os.environ.get("SHOAL_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
