"""Smoke test of bench/recovery.py at a tiny size: every arm of both losses (stage 0 and a middle
stage) runs and reports finite losses, the last line is the ratio the project tracks, an arm
branched at the failure step with no loss event ends bit-identical to the no-failure run
(branching and data order change nothing), and each rebuild installs what its rule says."""

from __future__ import annotations

import math
import re

import pytest
import torch

from bench import recovery

TINY = ["--steps", "12", "--fail-at", "6", "--decay", "4", "--early", "3", "--d-model", "32",
        "--layers", "4", "--heads", "2", "--stages", "4", "--lost", "0", "2", "--seq", "16",
        "--batch", "4", "--eval-batches", "2",
        "--corpus-mib", "1", "--seeds", "0"]


def test_main_prints_every_arm_and_the_ratio_line(capsys) -> None:
    assert recovery.main(TINY) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("lost "))
    table = {tuple(line.split()[:2]): line.split()[2:] for line in lines[header + 1:header + 8]}
    assert set(table) == {("-", "no_failure"), ("0", "checkfree+"), ("0", "random"),
                          *(("2", a) for a in recovery.MIDDLE_ARMS)}
    for arm, cells in table.items():
        values = [float(c) for c in cells]
        assert all(math.isfinite(v) for v in values), (arm, cells)
    assert float(table[("-", "no_failure")][3]) == 0.0  # its own gap
    assert "stage 0 lost, ordering by final gap (smallest first): " in "\n".join(lines)
    assert re.fullmatch(r"stage 0: random/checkfree\+ = (-?\d+\.\d\d|undefined .*)", lines[-2])
    assert lines[-3].startswith("stage 2 lost, ordering by final gap (smallest first): ")
    assert re.fullmatch(r"recovery: random/checkfree = (-?\d+\.\d\d|undefined \(checkfree gap "
                        r"[-+]\d\.\d{4} <= 0: ratio undefined; random gap [-+]\d\.\d{4}\))",
                        lines[-1])


def test_an_arm_without_a_loss_event_matches_no_failure_exactly() -> None:
    setting = recovery.Setting(d_model=32, n_layers=4, n_heads=2, seq_len=16, stages=4, lost=2,
                               batch=4, steps=8, fail_at=4, decay=3, early=2, eval_batches=2,
                               corpus_bytes=2**20,
                               arms=("no_failure", recovery.CONTROL_ARM, "checkfree"))
    results = recovery.run_seed(setting, seed=3, log=False)
    base, control = results[(recovery.NO_LOSS, "no_failure")], results[(2, recovery.CONTROL_ARM)]
    assert control.train_losses == base.train_losses
    assert (control.after_rebuild, control.early, control.final) == (
        base.after_rebuild, base.early, base.final)
    # A real rebuild does change the run (so the equality above is not vacuous).
    assert results[(2, "checkfree")].train_losses != base.train_losses
    assert results[(2, "checkfree")].weights is not None


def test_rebuilt_stage_gets_the_recovered_weights_and_a_boosted_fresh_optimizer() -> None:
    setting = recovery.Setting(d_model=32, n_layers=4, n_heads=2, seq_len=16, stages=4, lost=2,
                               batch=4, steps=4, fail_at=2, decay=2, early=1,
                               corpus_bytes=2**20)
    config = setting.model(0)
    trainee = recovery.Trainee.build(config, setting.stages, setting.lr, setting.grad_clip)
    batch = torch.randint(0, 256, (4, 17))
    trainee.train_step(batch)
    prev = {k: v.clone() for k, v in trainee.modules[1].state_dict().items()}
    recovery.rebuild("copy", trainee, setting, config, seed=0)
    rebuilt = trainee.modules[2].state_dict()
    assert len(rebuilt) == len(prev)
    for key, value in prev.items():  # stage 1's layer 0 copied onto stage 2's layer 1
        assert torch.equal(rebuilt[key.replace("layers.0.", "layers.1.")], value)
    opt = trainee.optimizers[2]
    assert not opt.state
    assert {id(p) for p in opt.param_groups[0]["params"]} == {
        id(p) for p in trainee.modules[2].parameters()}
    trainee.train_step(batch, schedule=0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(setting.lr * 1.1 * 0.5)
    assert trainee.optimizers[1].param_groups[0]["lr"] == pytest.approx(setting.lr * 0.5)


def test_stage_zero_is_rebuilt_from_the_edge_copy_of_its_last_refresh() -> None:
    setting = recovery.Setting(d_model=32, n_layers=4, n_heads=2, seq_len=16, stages=4,
                               lost=(0,), batch=4, steps=12, fail_at=7, decay=2, early=1,
                               corpus_bytes=2**20)
    config = setting.model(0)
    trainee = recovery.Trainee.build(config, setting.stages, setting.lr, setting.grad_clip)
    batch = torch.randint(0, 256, (4, 17))
    for _ in range(7):
        trainee.train_step(batch)
        if trainee.steps == 5:  # the last refresh (every 5 steps) before the failure
            at_refresh = trainee.modules[0].embedding.weight.detach().clone()
    now = trainee.modules[0].embedding.weight.detach().clone()
    assert not torch.equal(at_refresh, now)  # the copy is 2 steps old: stale, as in a swarm
    recovery.rebuild("checkfree+", trainee, setting, config, seed=0, lost=0)
    assert torch.equal(trainee.modules[0].embedding.weight.detach(), at_refresh)
    assert trainee.lr_scale[0] == pytest.approx(1.1) and not trainee.optimizers[0].state
    recovery.rebuild("random", trainee, setting, config, seed=0, lost=0)
    assert not torch.equal(trainee.modules[0].embedding.weight.detach(), at_refresh)


def test_checkfree_weighs_the_neighbours_by_their_post_clip_norms() -> None:
    setting = recovery.Setting(d_model=32, n_layers=4, n_heads=2, seq_len=16, stages=4, lost=2,
                               batch=4, steps=4, fail_at=2, decay=2, early=1,
                               corpus_bytes=2**20)
    config = setting.model(0)
    trainee = recovery.Trainee.build(config, setting.stages, setting.lr, setting.grad_clip)
    trainee.train_step(torch.randint(0, 256, (4, 17)))
    trainee.last_norms[1], trainee.last_norms[3] = 6.0, 0.5  # stage 1's is clipped to 1
    rec = recovery.rebuild("checkfree", trainee, setting, config, seed=0)
    assert rec.weights == pytest.approx((6.0 / (6.0 + 1e-6) + 1e-4, 0.5 + 1e-4))


def test_lost_edge_block_stage_is_refused() -> None:
    with pytest.raises(SystemExit, match="middle block stage"):
        recovery.Setting(stages=4, lost=1)


def _runs(final: dict[str, float]) -> list[dict[tuple[int, str], recovery.ArmResult]]:
    return [{(recovery.NO_LOSS if arm == "no_failure" else 3, arm):
             recovery.ArmResult(arm, 0, loss, loss, loss, [loss]) for arm, loss in final.items()}]


def test_ratio_is_undefined_with_both_gaps_when_checkfree_caught_up() -> None:
    setting = recovery.Setting()
    _, last = recovery.summarize(setting, _runs({"no_failure": 2.0, "checkfree": 1.9997,
                                                 "uniform": 2.001, "copy": 2.002,
                                                 "random": 2.0012}))
    assert last == ("recovery: random/checkfree = undefined (checkfree gap -0.0003 <= 0: ratio "
                    "undefined; random gap +0.0012)")


def test_ratio_is_rounded_down() -> None:
    _, last = recovery.summarize(recovery.Setting(), _runs(
        {"no_failure": 2.0, "checkfree": 2.003, "uniform": 2.004, "copy": 2.005,
         "random": 2.005999}))
    assert last == "recovery: random/checkfree = 1.99"  # 1.99966..., not 2.00
