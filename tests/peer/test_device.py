"""peer/device.py and the join benchmark on this machine's CPU: `--device` parsing with its
errors, the precision switch (autocast is a no-op on CPU unless a run asks for bf16), and the
benchmark reporting the device's memory."""

from __future__ import annotations

import argparse

import pytest
import torch

from peer import machine
from peer.device import (
    DeviceError,
    autocast,
    compute_dtype,
    host_memory,
    memory,
    parse_device,
)
from peer.pipeline.stage_host import StageHost
from protocols.runspec import RunSpec, RunSpecError


def test_cpu_and_auto_without_a_gpu() -> None:
    assert parse_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert parse_device("auto").type == want


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "cuda0", "", "mps:1"])
def test_a_typo_is_refused_naming_the_choices(bad: str) -> None:
    with pytest.raises(DeviceError, match=r"not a device; use auto, cpu, cuda, cuda:N or mps"):
        parse_device(bad)


def test_cuda_where_torch_sees_none_and_mps_where_there_is_none(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for choice in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=rf"--device {choice}: no CUDA device is visible"):
            parse_device(choice)
    with pytest.raises(DeviceError, match="no usable MPS"):
        parse_device("mps")
    assert parse_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit, match=r"^shoal demo: --device cuda:1: no CUDA"):
        machine.device("cuda:1", "shoal demo")


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch) -> None:
    """The index check, with torch told it has two GPUs (no CUDA call is made for it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    assert parse_device("cuda") == torch.device("cuda", 0)
    assert parse_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        parse_device("cuda:2")


def test_the_command_line_refuses_a_misspelt_device() -> None:
    from shoal.cli import _device

    assert _device("cuda:3") == "cuda:3"
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a device"):
        _device("gpu")


def test_autocast_is_a_no_op_on_cpu_unless_the_run_asks_for_bf16() -> None:
    cpu = torch.device("cpu")
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    plain = a @ b
    for precision in ("auto", "fp32"):
        assert compute_dtype(cpu, precision) == torch.float32
        with autocast(cpu, precision):
            out = a @ b
        assert out.dtype == torch.float32 and torch.equal(out, plain)
    assert compute_dtype(torch.device("cuda", 0), "auto") == torch.bfloat16
    assert compute_dtype(torch.device("cuda", 0), "fp32") == torch.float32
    with autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16


def test_precision_in_the_run_spec() -> None:
    assert RunSpec().pipeline.precision == "auto"
    spec = RunSpec().replace(**{"pipeline.precision": "bf16"})
    assert RunSpec.from_toml(spec.to_toml()) == spec
    with pytest.raises(RunSpecError, match=r"pipeline\.precision must be one of"):
        RunSpec().replace(**{"pipeline.precision": "fp16"})


def test_a_bf16_stage_keeps_fp32_weights_and_sends_fp32() -> None:
    """pipeline.precision = "bf16" on CPU: the forward computes in bf16 (so it differs from
    fp32 by bf16 rounding), the master weights, gradients and the wire stay fp32."""
    spec = RunSpec().replace(**{"pipeline.stages": 1, "model.n_layers": 1, "model.d_model": 32})
    x = torch.randn(2, 8, spec.model.d_model, generator=torch.Generator().manual_seed(0))
    outs = {}
    for precision in ("auto", "bf16"):
        host = StageHost(spec.replace(**{"pipeline.precision": precision}), 1)
        try:
            out = host.forward("mb", x, 1)
            grad = host.backward("mb", torch.ones_like(out))
            assert out.dtype == grad.dtype == torch.float32
            assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                       for p in host.module.parameters())
            outs[precision] = out
        finally:
            host.close()
    diff = (outs["auto"] - outs["bf16"]).abs().max().item()
    assert 0 < diff < 0.1


def test_the_join_benchmark_measures_a_block_on_the_device_and_reports_its_memory() -> None:
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    b = machine.benchmark(1.0, device="cpu")
    assert torch.equal(torch.rand(3), before)  # the probe left torch's RNG alone
    total, available = host_memory()
    assert b.device == "cpu" and b.samples_per_s > 0
    assert b.memory_bytes == total > 0
    assert 0 < b.memory_available_bytes <= total
    assert abs(b.memory_available_bytes - available) < total // 4  # the same figure, moments apart
    with open("/proc/meminfo") as f:
        meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    assert abs(available - meminfo["MemAvailable"]) < total // 4
    assert memory(torch.device("cpu"))[0] == total
    assert machine.benchmark(1.0, 7.0).samples_per_s == 7.0  # a simulated speed replaces it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_stage_computes_in_bf16_and_the_benchmark_reports_the_gpu() -> None:
    spec = RunSpec().replace(**{"pipeline.stages": 1, "model.n_layers": 1})
    host = StageHost(spec, 1, device=str(parse_device("cuda")))
    try:
        x = torch.randn(2, 8, spec.model.d_model)
        with host.autocast():
            assert (host.module.layers["0"].mlp.up(x.cuda())).dtype == torch.bfloat16
        out = host.forward("mb", x, 1)
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert all(p.dtype == torch.float32 for p in host.module.parameters())
    finally:
        host.close()
    b = machine.benchmark(1.0, device="cuda:0")
    _free, total = torch.cuda.mem_get_info(0)
    assert b.device.startswith("cuda:0 ") and b.memory_bytes == total
    assert 0 < b.memory_available_bytes <= total and b.samples_per_s > 0
