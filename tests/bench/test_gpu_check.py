"""bench/gpu_check.py without a GPU: it refuses with a clear message and status 2 when torch
sees no CUDA device, and its bookkeeping (replica hashes per step, samples/s from the drivers'
metrics rows) is checked on made-up inputs. The GPU figures themselves come only from a run on a
machine with one (docs/gpus.md)."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_check


def test_it_refuses_without_cuda(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible to torch here" in err and "nothing was measured" in err


def test_replica_hashes_are_compared_at_every_step_once_all_replicas_log() -> None:
    def line(stage: int, step: int, digest: str) -> str:
        return f"12:00:00 D shoal.peer: stage {stage} after step {step}: state hash {digest}\n"

    logs = {"peer0": "".join(line(0, s, f"a{s}") for s in range(0, 4)),
            "peer1": "".join(line(1, s, f"b{s}") for s in range(0, 4)),
            "peer2": "".join(line(0, s, f"a{s}") for s in range(2, 4)),  # joined at step 2
            "peer3": "other lines\n" + "".join(line(1, s, f"b{s}") for s in range(1, 4))}
    seen = gpu_check.hashes_by_step(logs)
    assert seen[(0, 3)] == {"peer0": {"a3"}, "peer2": {"a3"}}
    assert gpu_check.compare(seen, 2, 3, 2) == (2, 4, [])  # steps 2 and 3 of both stages
    logs["peer3"] += line(1, 3, "c3")  # peer3 logged a second hash after step 3
    assert gpu_check.compare(gpu_check.hashes_by_step(logs), 2, 3, 2) == (2, 3, [(1, 3)])
    logs["peer1"] = logs["peer1"].replace(line(1, 2, "b2"), "")  # peer1 never logged step 2
    assert gpu_check.compare(gpu_check.hashes_by_step(logs), 2, 3, 2) == (3, 1, [(1, 3)])
    assert gpu_check.compare({}, 2, 3, 2) == (4, 0, [])  # nothing to compare: main fails it


def test_samples_per_s_counts_from_the_end_of_the_warm_up() -> None:
    rows = [{"step": s, "t": 100.0 + 2 * s + d} for s in range(1, 11) for d in (0.0, 0.5)]
    # step 5 ends at 110.5, step 10 at 120.5: 5 steps of 32 samples in 10 s
    assert gpu_check.samples_per_s(rows, 32) == pytest.approx(16.0)
    with pytest.raises(SystemExit, match="raise --steps"):
        gpu_check.samples_per_s(rows[:6], 32)


def test_the_spsa_comparison_runs_its_draws_and_updates(monkeypatch) -> None:
    """Against the CPU itself (the GPU run compares CPU with CUDA), with shorter draws: every
    comparison is made and passes, so a False on a GPU machine means the devices differ, not
    that the check broke."""
    monkeypatch.setattr(gpu_check, "DRAWS", ((0, 1), (2**33 + 1, 4097)))
    assert gpu_check.spsa_bits_equal("cpu") == (True, 2 * (2 + 2))
