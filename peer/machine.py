"""What the daemon learns about the machine it starts on: the torch device (peer/device.py), a
self-benchmark on it with its memory for the coordinator's assignment and placement, the
coordinator's address by mDNS when none was given; and how the process is set up (torch threads,
uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import threading
import time
import traceback

import torch

from peer.device import DeviceError, autocast, describe, memory, parse_device, synchronize
from protocols.coordinator_client import Benchmark

# The join probe: one block of the built-in decoder at this width, forward and backward on a
# microbatch, repeated until PROBE_S has passed (at least PROBE_MIN_PASSES times). About as much
# arithmetic as the matrix probe it replaced (~1 GFLOP): every peer of a test swarm runs it.
PROBE_D_MODEL, PROBE_HEADS, PROBE_SEQ, PROBE_BATCH = 128, 4, 64, 4
PROBE_S, PROBE_MIN_PASSES = 0.1, 2


def device(choice: str, who: str = "shoal peer") -> str:
    """The torch device for `--device` as a string ("cpu", "cuda:1", "mps"); SystemExit with
    peer/device.py's message, prefixed with `who`, when it cannot be used here."""
    try:
        return str(parse_device(choice))
    except DeviceError as exc:
        raise SystemExit(f"{who}: {exc}") from None


def benchmark(throttle: float, simulate_speed: float = 0.0, device: str = "cpu") -> Benchmark:
    """Samples/s of a short forward + backward of a representative block (`probe_rate`) on
    `device`, and the device's memory: its total, and what is available to a stage (CUDA's free
    memory after the probe let go of its own, the host's MemAvailable). Blocks ~0.1-0.3 s: run
    it off the event loop. Peers of one run compare like with like. `throttle` slows the
    reported rate as it slows compute; `simulate_speed` > 0 replaces it (the simulated swarms
    of tests and benches)."""
    dev = parse_device(device)
    # a simulated speed is given, not measured: the probe is skipped
    rate = simulate_speed if simulate_speed > 0 else probe_rate(dev) / max(throttle, 1e-3)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # what the probe held is available to the stage again
    total, available = memory(dev)
    return Benchmark(samples_per_s=rate, device=describe(dev), memory_bytes=total,
                     memory_available_bytes=available)


def probe_rate(dev: torch.device) -> float:
    """Samples/s of forward + backward of one block of the built-in decoder at a fixed width,
    in the precision the device trains in (bf16 autocast on CUDA), synchronised with the device
    before each clock read; one untimed warm-up pass."""
    from peer.pipeline.model import Block, ModelConfig  # torch modules only when measuring

    config = ModelConfig(d_model=PROBE_D_MODEL, n_layers=1, n_heads=PROBE_HEADS,
                         seq_len=PROBE_SEQ)
    with torch.random.fork_rng(devices=[]):  # the probe must not move torch's RNG
        block = Block(config).to(dev)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(PROBE_BATCH, PROBE_SEQ, PROBE_D_MODEL, generator=gen).to(dev)
    params = list(block.parameters())

    def one_pass() -> None:
        with autocast(dev, "auto"):
            loss = block(x).float().square().mean()
        torch.autograd.grad(loss, params)

    one_pass()
    synchronize(dev)
    passes, t0 = 0, time.perf_counter()
    while passes < PROBE_MIN_PASSES or time.perf_counter() - t0 < PROBE_S:
        one_pass()
        passes += 1
        synchronize(dev)
    return PROBE_BATCH * passes / (time.perf_counter() - t0)


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
    """Torch's thread count from SHOAL_TORCH_THREADS (0: torch's default), torch._dynamo imported
    (see below); uvloop when present."""
    threads = int(os.environ.get("SHOAL_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    # The first torch.optim optimizer imports torch._dynamo (2.2 s measured on a 2-core box): a
    # peer builds its first one (StageHost) on the event loop right after it joins, where that,
    # on a loaded machine, eats into a short lease (the tests' is 4 s). Pay it before the loop.
    with contextlib.suppress(ImportError):
        importlib.import_module("torch._dynamo")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def dump_tasks_on_sigusr1(log: logging.Logger) -> None:
    """`kill -USR1 PID` logs the stack of every task of the running loop and of every thread:
    what a peer that makes no progress is waiting on, without stopping it."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        tasks = asyncio.all_tasks(loop)
        out = io.StringIO()
        for task in sorted(tasks, key=lambda t: t.get_name()):
            try:
                task.print_stack(limit=12, file=out)
            except Exception as e:  # 3.11's linecache fails on a frame without a line
                out.write(f"{task!r}: no stack ({e!r})\n")  # number: the dump goes on
        names = {t.ident: t.name for t in threading.enumerate()}
        frames = sys._current_frames()
        for ident, frame in frames.items():  # the compute thread, the executors' threads
            out.write(f"Thread {names.get(ident, ident)}:\n")
            out.write("".join(traceback.format_stack(frame, limit=12)))
        log.warning("SIGUSR1: %d tasks, %d threads\n%s", len(tasks), len(frames),
                    out.getvalue())

    loop.add_signal_handler(signal.SIGUSR1, dump)
