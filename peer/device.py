"""Which torch device a peer computes on, in which precision, and how much memory it has there.

- `parse_device` turns `--device auto|cpu|cuda|cuda:N|mps` into a torch.device, refusing with
  DeviceError (a message that says what is there) a typo, a CUDA index that does not exist, or
  MPS where torch has none. auto = CUDA (GPU 0) when visible, else MPS when available, else CPU.
- `autocast` is the context a stage's forward runs in: bf16 autocast on a GPU under
  `pipeline.precision = "auto"`, on any device under "bf16", never under "fp32". On CPU under
  "auto" it is a disabled context, so CPU replicas compute exactly as before (fp32, bit-exact).
  Master weights, gradients and optimizer state stay fp32 whatever the precision, and the wire
  never sees the compute dtype: activations leave a stage as fp32 and the run's codec
  (`pipeline.activations`) encodes them.
- `memory` is the device's (total, available) bytes: CUDA's mem_get_info (free, total); on CPU
  and MPS the machine's RAM (MemAvailable from /proc/meminfo, else free pages from sysconf).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SYNTAX = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class DeviceError(ValueError):
    """The `--device` asked for is not one torch can use here; the message says what is."""


def check_syntax(choice: str) -> str:
    """`choice` when it is spelled like a device (no torch query); DeviceError otherwise."""
    if not _SYNTAX.fullmatch(choice):
        raise DeviceError(f"--device {choice!r}: not a device; use {DEVICE_CHOICES}")
    return choice


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def parse_device(choice: str) -> torch.device:
    """The torch device for `--device` (see the module docstring); DeviceError when unusable."""
    check_syntax(choice)
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available():
            raise DeviceError("--device mps: torch has no usable MPS (Apple GPU) device here; "
                              "use --device cpu or auto")
        return torch.device("mps")
    index = int(choice.split(":", 1)[1]) if ":" in choice else 0
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {choice}: no CUDA device is visible to torch here (is "
                          "CUDA_VISIBLE_DEVICES set, the driver loaded?); use --device cpu or "
                          "auto")
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"--device {choice}: this machine has {count} CUDA device(s), "
                          f"cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype a stage's matrix products run in on `device` under `pipeline.precision`."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: use auto, fp32 or bf16")
    return torch.float32


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The context a stage's forward runs in (a disabled one when the dtype is fp32)."""
    dtype = compute_dtype(device, precision)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=dtype == torch.bfloat16)


def host_memory() -> tuple[int, int]:
    """The machine's (total, available) RAM in bytes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return total, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return total, total


def memory(device: torch.device) -> tuple[int, int]:
    """(total, available) bytes of `device` now (CUDA: mem_get_info; else the host's RAM)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    return host_memory()


def describe(device: torch.device) -> str:
    """The device as a peer reports it: "cpu", "cuda:0 NVIDIA H100 80GB HBM3", "mps"."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0} {torch.cuda.get_device_name(device)}"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timing must not stop before the GPU does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
