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


def test_replica_hashes_are_compared_per_stage_and_step() -> None:
    watch = gpu_check.HashWatch(0)
    peer = {"live": True, "state": "training"}
    watch.record({"peers": [{**peer, "peer_id": "a", "stage": 0, "step": 3, "state_hash": "x"},
                            {**peer, "peer_id": "b", "stage": 0, "step": 3, "state_hash": "x"},
                            {**peer, "peer_id": "c", "stage": 1, "step": 3, "state_hash": "y"},
                            {**peer, "peer_id": "d", "stage": 1, "step": 2, "state_hash": "z"},
                            {**peer, "peer_id": "e", "stage": 1, "step": 3, "state_hash": ""},
                            {"live": True, "state": "syncing", "peer_id": "f", "stage": 1,
                             "step": 3, "state_hash": "w"}]})
    assert gpu_check.compare(watch.seen) == (1, [])  # only stage 0's step 3 seen twice
    watch.record({"peers": [{**peer, "peer_id": "d", "stage": 1, "step": 3, "state_hash": "q"}]})
    assert gpu_check.compare(watch.seen) == (2, [(1, 3)])


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
