"""Learning-rate schedules (optim/schedule.py), their run-spec keys, and the optimizers that
follow them: the stage's AdamW (allreduce) and DeMo."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optim.schedule import lr_factor
from peer.pipeline import lr
from peer.pipeline.stage_host import StageHost
from protocols.runspec import RunSpec, RunSpecError


def test_warmup_rises_linearly_then_cosine_falls_to_final() -> None:
    f = [lr_factor(s, warmup=10, decay="cosine", total=110, final=0.1) for s in range(1, 131)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))  # never rises after warm-up
    assert f[59] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway
    assert f[109] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)  # past the end: final


def test_constant_and_linear() -> None:
    assert [lr_factor(s) for s in (1, 7, 10**6)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, warmup=4) == 0.25  # step 0 counts as the first step: never a zero rate
    assert lr_factor(6, decay="linear", total=10, final=0.0) == pytest.approx(0.4)


def test_spec_keys_default_constant_and_errors_name_the_key() -> None:
    spec = RunSpec()
    assert RunSpec.from_toml(spec.to_toml()) == spec
    assert lr.factor(spec, "optim.schedule", 123) == 1.0
    with pytest.raises(RunSpecError, match=r"optim.schedule.total_steps must be > warmup_steps"):
        spec.replace(**{"optim.schedule.decay": "cosine"})  # run.steps 0: no end to decay to
    with pytest.raises(RunSpecError, match=r"sync.demo.schedule.decay must be one of"):
        spec.replace(**{"sync.demo.schedule.decay": "exp"})
    with pytest.raises(RunSpecError, match=r"optim.schedule.final must be in \[0, 1\]"):
        spec.replace(**{"optim.schedule.final": 2.0})
    cos = spec.replace(**{"run.steps": 100, "sync.demo.schedule.decay": "cosine",
                          "sync.demo.schedule.warmup_steps": 5})
    assert cos.schedule("sync.demo.schedule")[1] == 100
    assert lr.factor(cos, "sync.demo.schedule", 5) == 1.0


def test_the_stage_optimizer_steps_at_the_scheduled_rate() -> None:
    spec = RunSpec().replace(**{"run.steps": 20, "optim.lr": 0.01,
                                "optim.schedule.warmup_steps": 4,
                                "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2})
    host = StageHost(spec, 1)
    rates = []
    for _ in range(5):
        host.apply_gradient({n: torch.ones_like(p) for n, p in host.params().items()})
        rates.append(host.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01])


def test_demo_compresses_and_steps_at_the_scheduled_rate() -> None:
    from peer.sync.demo import DemoMode
    spec = RunSpec().replace(**{"run.steps": 10, "sync.demo.lr": 0.002,
                                "sync.demo.schedule.decay": "linear",
                                "sync.demo.schedule.final": 0.0,
                                "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2})
    host = StageHost(spec, 1)
    mode = DemoMode(spec)
    host.step = 4  # the step being taken is the 5th: 1 - 5/10 of the base rate
    assert mode._lr(host) == pytest.approx(0.001)
    host.lr_scale = 1.2  # CheckFree's boost of a rebuilt stage still applies
    assert mode._lr(host) == pytest.approx(0.0012)


def test_diloco_inner_and_outer_rates_follow_their_schedules() -> None:
    from peer.sync.diloco import DilocoMode
    spec = RunSpec().replace(**{
        "run.steps": 40, "sync.mode": "diloco", "sync.diloco.inner_steps": 4,
        "sync.diloco.outer_lr": 0.8, "sync.diloco.outer_schedule.warmup_steps": 2,
        "sync.diloco.inner_schedule.decay": "linear", "sync.diloco.inner_schedule.final": 0.5,
        "model.d_model": 16, "model.n_layers": 2, "model.n_heads": 2})
    assert spec.schedule("sync.diloco.outer_schedule")[1] == 10  # 40 steps / H = 4 rounds
    mode = DilocoMode(spec)
    host = StageHost(spec, 1)
    host.step = 3  # the 4th step ends the first outer round: half the warm-up
    assert mode.scheduled_outer(host).lr == pytest.approx(0.4)
    host.step = 7  # second round: warmed up
    assert mode.scheduled_outer(host).lr == pytest.approx(0.8)
    host.step = 19  # inner step 20 of 40: 1 - 0.5 x 20/40
    for p in host.module.parameters():
        p.grad = torch.ones_like(p)
    host.samples = 1
    mode._inner_step(host)
    assert host.optimizer.param_groups[0]["lr"] == pytest.approx(
        spec.sync.diloco.inner_lr * 0.75)
    with pytest.raises(RunSpecError, match=r"outer_schedule\.final must be > 0"):
        spec.replace(**{"sync.diloco.outer_schedule.final": 0.0})


def test_spsa_steps_at_the_scheduled_rate_live_and_in_replay() -> None:
    from optim.spsa import Ledger, Message, SpsaConfig
    from peer.sync.spsa import SpsaMode
    spec = RunSpec().replace(**{"run.steps": 10, "sync.mode": "spsa", "sync.spsa.lr": 0.01,
                                "sync.spsa.schedule.warmup_steps": 4})
    cfg = SpsaMode(spec).config
    assert cfg.schedule == (4, "constant", 10, 0.1)
    assert [cfg.lr_at(t) for t in (1, 2, 4, 9)] == pytest.approx([0.0025, 0.005, 0.01, 0.01])
    flat = SpsaConfig(lr=0.01)
    moved = {}
    for name, c in (("warm", cfg), ("flat", flat)):
        led = Ledger("run", c)
        led.record(0, [])
        led.record(1, [Message(1, "p1", 100)])
        p = [torch.zeros(64)]
        led.apply_step(p, 1)
        moved[name] = p[0].abs().max().item()
    assert moved["warm"] == pytest.approx(moved["flat"] / 4)  # step 1 of a 4-step warm-up
