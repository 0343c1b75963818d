"""`shoal demo` through the `shoal` entry point: --config precedence, --data, --out, --init-model.

Two demo runs are shared by the tests of this module (tiny model, 1 block stage, a few steps):

- the first trains on a --data file of one repeated byte, from a --config file that sets
  2 stages, sync diloco, 8 steps and seed 3, with `--stages 1 --sync allreduce` on the command
  line: explicit flags must win (1 stage, allreduce), the file must win over the flags'
  defaults (8 steps, not 100; seed 3, not 0). On that data the loss collapses and the exported
  model writes mostly that byte: neither can happen on the default corpus (the stdlib);
- the second starts from the first one's exported model (--init-model), from a --config file
  that sets sync diloco with no --sync flag (the file's mode, not the default), into an existing
  empty --out: its first loss is the first run's last, not a fresh model's ~ln 256.

Refusing a non-empty --out is checked against the first run's folder, which must stay as it was.
The tests that need the two runs are slow (~100 s together on 2 cores): the slow pass runs them;
the refusals, which start no swarm, stay in the default run.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.shoal.entry import shoal

TINY = """\
[model]
d_model = 32
n_layers = 4
n_heads = 4
seq_len = 32

[pipeline]
microbatch = 4
target_batch = 16

[optim]
lr = 1e-2

[sync]
timeout_s = 5.0

[membership]
heartbeat_s = 0.5
lease_s = 4.0
"""
BYTE = "z"
DEMO_TIMEOUT_S = 240  # only catches a hang: each run takes seconds


@dataclass
class DemoRun:
    out: Path
    stdout: str
    summary: dict
    spec: dict  # the run.toml the demo wrote: the spec its coordinator served


def run_demo(out: Path, *args: str | Path) -> DemoRun:
    done = shoal("demo", "--out", out, *args, timeout=DEMO_TIMEOUT_S)
    logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                     for f in sorted((out / "logs").glob("*.log"))) if out.is_dir() else ""
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}\n{logs}"
    summary = json.loads((out / "summary.json").read_text())
    spec = tomllib.loads((out / "run.toml").read_text())
    return DemoRun(out, done.stdout, summary, spec)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("demo-files")
    (d / "one-byte.txt").write_text(BYTE * 300_000)
    (d / "first.toml").write_text(TINY.replace("[pipeline]\n", "[pipeline]\nstages = 2\n")
                                  .replace("[sync]\n", '[sync]\nmode = "diloco"\n')
                                  + "\n[run]\nsteps = 8\nseed = 3\n")
    (d / "second.toml").write_text(TINY.replace("[sync]\n", '[sync]\nmode = "diloco"\n')
                                   + "\n[run]\nsteps = 3\n")
    return d


@pytest.fixture(scope="module")
def first(files: Path) -> DemoRun:
    return run_demo(files / "first", "--peers", "3", "--stages", "1", "--sync", "allreduce",
                    "--config", files / "first.toml", "--data", files / "one-byte.txt")


@pytest.fixture(scope="module")
def second(files: Path, first: DemoRun) -> DemoRun:
    out = files / "second"
    out.mkdir()  # an existing, empty --out is fine
    return run_demo(out, "--peers", "2", "--stages", "1", "--config", files / "second.toml",
                    "--data",
                    files / "one-byte.txt", "--init-model", first.out / "model")


@pytest.mark.slow
def test_explicit_flags_win_over_the_config_file(first: DemoRun) -> None:
    assert first.spec["pipeline"]["stages"] == 1 and first.summary["stages"] == 1
    assert first.spec["sync"]["mode"] == "allreduce" and first.summary["sync"] == "allreduce"
    assert "1 block stages, sync allreduce" in first.stdout


@pytest.mark.slow
def test_the_config_file_wins_over_flag_defaults(first: DemoRun, second: DemoRun) -> None:
    # first.toml: steps 8 and seed 3 against the flags' defaults 100 and 0
    assert first.spec["run"]["steps"] == 8 and first.summary["steps"] == 8
    assert first.spec["run"]["seed"] == 3
    assert first.spec["optim"]["lr"] == pytest.approx(1e-2)  # a key with no flag: the file's
    assert first.spec["model"]["d_model"] == 32
    # second.toml: sync diloco and 3 steps, and no --sync or --steps flag
    assert second.spec["sync"]["mode"] == "diloco" and second.summary["sync"] == "diloco"
    assert second.spec["run"]["steps"] == 3 and second.summary["steps"] == 3


@pytest.mark.slow
def test_demo_writes_summary_model_and_logs(first: DemoRun) -> None:
    s = first.summary
    assert [step for step, _ in s["loss_by_step"]] == list(range(1, 9))
    assert s["tokens"] > 0 and s["bytes_sent"] > 0
    assert (first.out / "model" / "model.safetensors").stat().st_size > 0
    config = json.loads((first.out / "model" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["shoal"]["model"]["n_layers"] == 4
    for stage in ("0", "1"):
        hashes = s["stage_hashes"][stage]
        assert hashes and all(hashes), s["stage_hashes"]  # known, not "" (unknown)
        assert len(set(hashes)) == 1, s["stage_hashes"]  # replicas bit-identical
    assert f"model: {first.out / 'model'}" in first.stdout


@pytest.mark.slow
def test_data_flag_trains_on_the_named_file(first: DemoRun) -> None:
    """One repeated byte: the loss collapses from ~ln 256 and the model writes that byte."""
    s = first.summary
    assert s["initial_loss"] > 4.0, s["loss_by_step"]
    assert s["final_loss"] < 2.5, s["loss_by_step"]  # 8 steps on the stdlib end near 4.5
    text = shoal("generate", "--model", first.out / "model", "--prompt", BYTE * 4, "--tokens",
                 "100", "--seed", "1", check=True).stdout
    sampled = text[4:].rstrip("\n")
    assert sampled.count(BYTE) > len(sampled) / 2, sampled


def test_a_missing_data_path_is_refused_before_anything_starts(files: Path) -> None:
    out = files / "no-data"
    done = shoal("demo", "--out", out, "--peers", "2", "--stages", "1", "--config",
                 files / "second.toml", "--data", files / "not-there", timeout=60)
    assert done.returncode != 0
    assert f"--data: data path {files / 'not-there'} does not exist" in done.stderr, done.stderr
    assert not out.exists(), "nothing is started, nothing is written"


@pytest.mark.slow
def test_non_empty_out_is_refused_and_left_alone(first: DemoRun, files: Path) -> None:
    before = {p: p.read_bytes() for p in sorted(first.out.rglob("*")) if p.is_file()}
    done = shoal("demo", "--out", first.out, "--peers", "3", "--stages", "1", "--config",
                 files / "first.toml", timeout=60)
    assert done.returncode != 0
    assert f"--out {first.out} is not empty" in done.stderr, done.stderr
    assert "name a new or empty folder" in done.stderr
    after = {p: p.read_bytes() for p in sorted(first.out.rglob("*")) if p.is_file()}
    assert after == before, "a refused run must not touch the earlier run's files"


def test_out_that_is_a_file_is_refused(files: Path) -> None:
    done = shoal("demo", "--out", files / "one-byte.txt", "--config", files / "second.toml",
                 timeout=60)
    assert done.returncode != 0 and "is a file" in done.stderr, done.stderr


@pytest.mark.slow
def test_init_model_starts_from_the_exported_weights(first: DemoRun, second: DemoRun) -> None:
    start = second.summary["loss_by_step"][0][1]
    fresh = first.summary["loss_by_step"][0][1]
    assert math.isfinite(start)
    # a fresh model starts near ln 256 = 5.5; the exported one where the first run ended
    assert start < fresh - 2.0, (start, fresh)
    assert start < first.summary["final_loss"] + 0.5, (start, first.summary["final_loss"])
    config = json.loads((second.out / "model" / "config.json").read_text())
    assert config["shoal"]["model"]["n_layers"] == 4 and config["hidden_size"] == 32


def test_too_few_peers_are_refused(files: Path) -> None:
    """second.toml leaves the stages out: the demo's default, 2 block stages, needs 3 peers."""
    done = shoal("demo", "--peers", "2", "--stages", "2", "--config", files / "second.toml",
                 timeout=60)
    assert done.returncode != 0
    assert "--peers 2 cannot cover 2 block stages" in done.stderr, done.stderr


def _spec(tmp_path: Path, toml: str | None, *argv: str):
    from shoal.cli import build_parser
    from shoal.local import demo_spec

    args = ["demo", *argv]
    if toml is not None:
        (tmp_path / "x.toml").write_text(toml)
        args += ["--config", str(tmp_path / "x.toml")]
    return demo_spec(build_parser().parse_args(args))


def test_precedence_table(tmp_path: Path) -> None:
    """In process, the same rule for every flag-backed key and the mode-dependent defaults."""
    plain = _spec(tmp_path, None)
    assert (plain.pipeline.stages, plain.run.steps, plain.sync.mode, plain.run.seed) == \
        (2, 100, "allreduce", 0)
    assert plain.model.d_model == 128  # DEMO_DEFAULTS, not RunSpec's own default
    spsa = _spec(tmp_path, '[sync]\nmode = "spsa"\n[run]\nsteps = 20\n')
    assert spsa.sync.mode == "spsa" and spsa.model.d_model == 64  # spsa's small-model default
    sized = _spec(tmp_path, '[sync]\nmode = "spsa"\n[model]\nd_model = 96\n')
    assert sized.model.d_model == 96  # ...under the file's own value
    diloco = _spec(tmp_path, '[sync]\nmode = "diloco"\n[run]\nsteps = 40\n')
    assert diloco.sync.diloco.inner_steps == 4  # a tenth of the file's steps
    pinned = _spec(tmp_path, '[sync]\nmode = "diloco"\n[sync.diloco]\ninner_steps = 7\n')
    assert pinned.sync.diloco.inner_steps == 7
    flags = _spec(tmp_path, '[run]\nsteps = 40\nseed = 9\n', "--steps", "5", "--seed", "0")
    assert (flags.run.steps, flags.run.seed) == (5, 0)  # an explicit 0 is explicit too
    with pytest.raises(SystemExit, match=r"run\.steps is 0"):
        _spec(tmp_path, '[run]\nsteps = 0\n')
    with pytest.raises(SystemExit, match="--config"):
        _spec(tmp_path, '[model]\nd_modle = 64\n')
