"""The run spec: one TOML file that describes a training run.

The coordinator owns it and hands its text to every peer at join, so peers need no configuration
beyond how to reach the coordinator. It is validated once, at load, with errors that name the bad
key (`RunSpecError: pipeline.stages must be an integer >= 1, got 0`). Unknown keys are errors too:
a typo must not silently fall back to a default.

Invariant: `RunSpec.from_toml(spec.to_toml()) == spec`, so what the coordinator persists and what a
peer receives describe the same run.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

SYNC_MODES = ("allreduce", "demo", "diloco", "spsa")
#: the modes whose steps the coordinator closes in its SPSA ledger (coordinator/ledger.py)
LEDGER_MODES = frozenset({"spsa"})
HOPS = ("auto", "hub", "p2p")  # pipeline.hops: who sends a microbatch's next hop
ACTIVATION_ENCODINGS = ("fp32", "bf16", "int8", "fp8")
PRECISIONS = ("auto", "fp32", "bf16")  # pipeline.precision: the compute dtype of a stage's passes
AGGREGATORS = ("mean", "clipped_mean", "trimmed_mean")
SCHEDULE_DECAYS = ("constant", "cosine", "linear")  # optim/schedule.py


class RunSpecError(ValueError):
    """The run spec is malformed; the message names the key and what it must be."""


@dataclass(frozen=True)
class RunSection:
    name: str = "shoal-run"
    seed: int = 0
    steps: int = 0  # optimizer steps to train; 0 = until stopped


@dataclass(frozen=True)
class ModelSection:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 64
    vocab: int = 256
    # A local Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folder (docs/models.md), the same
    # path on every peer; "" is the built-in byte-level decoder. d_model, n_layers, n_heads and
    # vocab must then be the folder's (shoal demo --model fills them in).
    hf: str = ""
    hf_weights: bool = True  # false: the folder's config alone, weights drawn from run.seed


@dataclass(frozen=True)
class PipelineSection:
    stages: int = 2  # block stages; stage 0 (data, embedding, head, loss) comes on top
    skip_ratio: float = 0.0
    microbatch: int = 8
    target_batch: int = 32  # samples per optimizer step, swarm-wide
    # fp32 | bf16 | int8 | fp8 (e4m3); int8 and fp8 scale per block of 64. int8: the fastest to
    # the target loss in bench.wan (docs/benchmarks.md), as issue #15 asks of the default
    activations: str = "int8"
    # hub: every block replica answers stage 0, which sends the next hop (each activation crosses
    # the driver's link twice per stage); p2p: each block replica sends its output straight to
    # the next stage's replica it chooses, the last one delivers to stage 0, and the backward
    # walks the same replicas back (peer/pipeline/p2p.py). SPSA's paired streams stay hub-shaped;
    # auto (the default): p2p, except under SPSA (`RunSpec.peer_to_peer`). p2p was faster in
    # bench.hops (docs/benchmarks.md) and every swarm, lab and CLI test passes with it
    hops: str = "auto"
    full_depth_every: int = 10
    checkfree_plus: bool = False
    # auto: bf16 autocast on CUDA, fp32 elsewhere; fp32: never; bf16: autocast on any device
    # (master weights and optimizer state stay fp32; peer/device.py, docs/gpus.md)
    precision: str = "auto"


@dataclass(frozen=True)
class ScheduleSection:
    """An optimizer's learning-rate schedule (optim/schedule.py): `warmup_steps` rising linearly,
    then `decay` to `final` x the base rate at `total_steps`. The defaults keep it constant."""

    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine | linear
    total_steps: int = 0  # 0: run.steps (a DiLoCo outer schedule: run.steps / inner_steps)
    final: float = 0.1  # share of the base rate at the end of a decay


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: ScheduleSection = field(default_factory=ScheduleSection)


@dataclass(frozen=True)
class AllreduceSection:
    aggregator: str = "mean"  # mean | clipped_mean | trimmed_mean
    trim: float = 0.25
    clip_norm: float = 10.0


@dataclass(frozen=True)
class DemoSection:
    lr: float = 1e-3
    beta: float = 0.999
    topk: int = 32
    chunk: int = 64
    weight_decay: float = 0.0
    sign_bits: bool = False
    value_bound: float = 1e3
    # mean (the paper's chooser mean) | clipped_mean | trimmed_mean (optim/demo.py aggregate)
    aggregator: str = "mean"
    trim: float = 0.25  # per side, for trimmed_mean (at least one replica when > 0)
    clip_norm: float = 0.0  # for clipped_mean; <= 0: the median of the replicas' norms
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    # true: step t's round runs while step t+1 computes, applied one step late
    # (peer/sync/demo_delayed.py)
    delayed: bool = False


@dataclass(frozen=True)
class DilocoSection:
    inner_steps: int = 100  # H
    inner_lr: float = 4e-4
    inner_weight_decay: float = 0.1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    quant: str = "int8"  # fp32 | fp16 | int8
    delayed: bool = False
    aggregator: str = "mean"
    trim: float = 0.25
    clip_norm: float = 10.0
    quant_block: int = 0  # int8/int4 values per scale; 0: 4096 for int8, 1024 for int4
    # Streaming DiLoCo (peer/sync/diloco_streaming.py): P fragments synced in turn, each
    # inner_steps apart; 0 = off. streaming_delay is tau (merge tau inner steps after the sync,
    # 0 <= tau < H/P), streaming_alpha the global side's weight in the merge
    streaming_fragments: int = 0
    streaming_delay: int = 1
    streaming_alpha: float = 0.5
    inner_schedule: ScheduleSection = field(default_factory=ScheduleSection)
    outer_schedule: ScheduleSection = field(default_factory=ScheduleSection)  # in outer rounds


@dataclass(frozen=True)
class SpsaSection:
    eps: float = 1e-3
    lr: float = 1e-4  # step size of the mean over a step's messages (1/N: MeZO's n-SPSA average)
    samples_per_step: int = 1  # perturbations j per peer and step
    hash_every: int = 10  # K: replicas keep a hash-checked checkpoint every K steps
    initial_scale: float = 1.0  # scale of the int8 codes until the ledger has adapted it
    perturbation: str = "rademacher"  # z: "rademacher" (+-1) or "gaussian" (optim/spsa_z.py)
    verify: float = 0.0  # p: fraction of contributions a stage-0 peer recomputes (0: off)
    verify_tolerance: int = 3  # codes a recomputed contribution may differ by (fp noise)
    verify_repair: bool = True  # a struck contribution is applied with its verifier's codes
    schedule: ScheduleSection = field(default_factory=ScheduleSection)


@dataclass(frozen=True)
class SyncSection:
    mode: str = "allreduce"
    timeout_s: float = 30.0
    allreduce: AllreduceSection = field(default_factory=AllreduceSection)
    demo: DemoSection = field(default_factory=DemoSection)
    diloco: DilocoSection = field(default_factory=DilocoSection)
    spsa: SpsaSection = field(default_factory=SpsaSection)

    @property
    def keeps_ledger(self) -> bool:
        """Whether the coordinator keeps a ledger of this run's steps (SPSA's codes)."""
        return self.mode in LEDGER_MODES


@dataclass(frozen=True)
class MembershipSection:
    heartbeat_s: float = 2.0
    lease_s: float = 10.0
    certificate_s: float = 600.0
    rebalance_s: float = 300.0


@dataclass(frozen=True)
class CheckpointSection:
    """Durable checkpoints (docs/checkpoints.md, coordinator/checkpoints.py)."""

    every: int = 0  # optimizer steps between durable checkpoints; 0 = none
    dir: str = ""  # the coordinator's folder for them (`shoal coordinator --checkpoint-dir`)
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    # a checkpoint folder on the coordinator's machine the run starts from: the coordinator
    # serves each stage's file to the peer that takes the stage while no live replica holds it
    init: str = ""


@dataclass(frozen=True)
class DataSection:
    """Stage 0's data (docs/data.md, peer/pipeline/data.py)."""

    # A file or folder of text, JSONL ("text" field) or Parquet ("text" column), the same path
    # on every peer (`shoal peer --data` overrides it); "" is the Python standard library
    path: str = ""
    # sha256 of the data and tokenizer (shoal demo fills it in); the coordinator refuses a peer
    # whose data's differs. "": the first peer's is kept and the others must match it.
    fingerprint: str = ""
    max_tokens: int = 0  # a cap on the corpus's token ids (logged when it cuts); 0 = none


@dataclass(frozen=True)
class RunSpec:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sync: SyncSection = field(default_factory=SyncSection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    data: DataSection = field(default_factory=DataSection)

    @property
    def peer_to_peer(self) -> bool:
        """Whether block replicas pass microbatches on themselves (pipeline.hops)."""
        hops = self.pipeline.hops
        return hops == "p2p" or (hops == "auto" and self.sync.mode not in LEDGER_MODES)

    @classmethod
    def from_toml(cls, text: str) -> RunSpec:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RunSpecError(f"run spec is not valid TOML: {exc}") from exc
        spec = _build(cls, data, "")
        spec.validate()
        return spec

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise RunSpecError(f"cannot read run spec {p}: {exc.strerror}") from exc
        try:
            return cls.from_toml(text)
        except RunSpecError as exc:
            raise RunSpecError(f"{p}: {exc}") from exc

    def to_toml(self) -> str:
        return tomli_w.dumps(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> RunSpec:
        """A copy with whole sections or dotted keys replaced: replace(**{"sync.mode": "demo"})."""
        data = dataclasses.asdict(self)
        for key, value in sections.items():
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise RunSpecError(f"unknown section {key!r}")
                node = node[part]
            if parts[-1] not in node:
                raise RunSpecError(f"unknown key {key!r}")
            is_table = dataclasses.is_dataclass(value)
            node[parts[-1]] = dataclasses.asdict(value) if is_table else value
        spec = _build(RunSpec, data, "")
        spec.validate()
        return spec

    def validate(self) -> None:
        m, p, s = self.model, self.pipeline, self.sync
        _check(m.d_model >= 8, "model.d_model", "an integer >= 8", m.d_model)
        _check(m.n_heads >= 1, "model.n_heads", "an integer >= 1", m.n_heads)
        if not m.hf:  # a Hugging Face config may set head_dim on its own
            _check(m.d_model % m.n_heads == 0, "model.d_model", "divisible by model.n_heads",
                   m.d_model)
            _check((m.d_model // m.n_heads) % 2 == 0, "model.d_model",
                   "such that d_model / n_heads is even (rotary embeddings)", m.d_model)
        _check(m.n_layers >= 1, "model.n_layers", "an integer >= 1", m.n_layers)
        _check(m.seq_len >= 2, "model.seq_len", "an integer >= 2", m.seq_len)
        if m.hf:  # a folder without tokenizer.json is fed bytes: ids 0-255 must exist
            _check(m.vocab >= 256, "model.vocab", ">= 256 for a Hugging Face model (without "
                   "a tokenizer.json the data are bytes, ids 0-255)", m.vocab)
            _check(not p.checkfree_plus, "pipeline.checkfree_plus",
                   "false with model.hf (its edge copies know the built-in decoder only)",
                   p.checkfree_plus)
        else:
            _check(m.vocab == 256, "model.vocab", "256 (the model is byte-level)", m.vocab)
        _check(p.stages >= 1, "pipeline.stages", "an integer >= 1", p.stages)
        _check(self.data.max_tokens >= 0, "data.max_tokens", "an integer >= 0 (0: no cap)",
               self.data.max_tokens)
        _check(p.precision in PRECISIONS, "pipeline.precision", f"one of {PRECISIONS}",
               p.precision)
        _check(p.stages <= m.n_layers, "pipeline.stages",
               f"at most model.n_layers ({m.n_layers}): each stage needs a layer", p.stages)
        _check(0.0 <= p.skip_ratio < 1.0, "pipeline.skip_ratio", "in [0, 1)", p.skip_ratio)
        _check(p.microbatch >= 1, "pipeline.microbatch", "an integer >= 1", p.microbatch)
        _check(p.target_batch >= p.microbatch, "pipeline.target_batch",
               f">= pipeline.microbatch ({p.microbatch})", p.target_batch)
        _check(p.hops in HOPS, "pipeline.hops", f"one of {HOPS}", p.hops)
        _check(p.hops != "p2p" or s.mode not in LEDGER_MODES, "pipeline.hops",
               "hub or auto with sync.mode spsa (its perturbed streams are compared at stage 0)",
               p.hops)
        _check(p.activations in ACTIVATION_ENCODINGS, "pipeline.activations",
               f"one of {ACTIVATION_ENCODINGS}", p.activations)
        _check(p.full_depth_every >= 1, "pipeline.full_depth_every", "an integer >= 1",
               p.full_depth_every)
        _check(s.mode in SYNC_MODES, "sync.mode", f"one of {SYNC_MODES}", s.mode)
        _check(s.timeout_s > 0, "sync.timeout_s", "> 0", s.timeout_s)
        _check(s.allreduce.aggregator in AGGREGATORS, "sync.allreduce.aggregator",
               f"one of {AGGREGATORS}", s.allreduce.aggregator)
        _check(s.diloco.aggregator in AGGREGATORS, "sync.diloco.aggregator",
               f"one of {AGGREGATORS}", s.diloco.aggregator)
        _check(s.diloco.quant in ("fp32", "fp16", "int8", "int4"), "sync.diloco.quant",
               "one of ('fp32', 'fp16', 'int8', 'int4')", s.diloco.quant)
        _check(s.diloco.quant_block >= 0 and s.diloco.quant_block % 2 == 0,
               "sync.diloco.quant_block", "an even integer >= 0 (0: the default)",
               s.diloco.quant_block)
        df = s.diloco.streaming_fragments
        _check(df >= 0 and (df == 0 or s.diloco.inner_steps % df == 0),
               "sync.diloco.streaming_fragments",
               f"0 (off) or a divisor of inner_steps ({s.diloco.inner_steps})", df)
        _check(df == 0 or 0 <= s.diloco.streaming_delay < s.diloco.inner_steps // df,
               "sync.diloco.streaming_delay", "in [0, inner_steps / streaming_fragments)",
               s.diloco.streaming_delay)
        _check(0.0 < s.diloco.streaming_alpha <= 1.0, "sync.diloco.streaming_alpha",
               "in (0, 1]", s.diloco.streaming_alpha)
        _check(not (df and s.diloco.delayed), "sync.diloco.delayed",
               "false when streaming_fragments > 0 (streaming already overlaps)",
               s.diloco.delayed)
        _check(s.diloco.inner_steps >= 1, "sync.diloco.inner_steps", "an integer >= 1",
               s.diloco.inner_steps)
        _check(s.demo.aggregator in AGGREGATORS, "sync.demo.aggregator",
               f"one of {AGGREGATORS}", s.demo.aggregator)
        _check(0.0 <= s.demo.trim < 0.5, "sync.demo.trim", "in [0, 0.5)", s.demo.trim)
        _check(s.demo.topk >= 1, "sync.demo.topk", "an integer >= 1", s.demo.topk)
        _check(2 <= s.demo.chunk <= 256, "sync.demo.chunk", "in [2, 256]", s.demo.chunk)
        _check(s.demo.topk <= s.demo.chunk * s.demo.chunk, "sync.demo.topk",
               "at most chunk * chunk", s.demo.topk)
        _check(s.spsa.eps > 0, "sync.spsa.eps", "> 0", s.spsa.eps)
        _check(s.spsa.lr > 0, "sync.spsa.lr", "> 0", s.spsa.lr)
        _check(s.spsa.hash_every >= 1, "sync.spsa.hash_every", "an integer >= 1",
               s.spsa.hash_every)
        _check(s.spsa.initial_scale > 0, "sync.spsa.initial_scale", "> 0", s.spsa.initial_scale)
        _check(s.spsa.perturbation in ("rademacher", "gaussian"), "sync.spsa.perturbation",
               "'rademacher' or 'gaussian'", s.spsa.perturbation)
        _check(0.0 <= s.spsa.verify <= 1.0, "sync.spsa.verify", "a fraction in [0, 1]",
               s.spsa.verify)
        _check(0 <= s.spsa.verify_tolerance <= 254, "sync.spsa.verify_tolerance",
               "an integer in [0, 254]", s.spsa.verify_tolerance)
        _check(s.spsa.samples_per_step >= 1, "sync.spsa.samples_per_step", "an integer >= 1",
               s.spsa.samples_per_step)
        for key, sched, total in self.schedules():
            _check_schedule(key, sched, total)
        _check(s.diloco.outer_schedule.final > 0, "sync.diloco.outer_schedule.final",
               "> 0 (an outer step needs a rate)", s.diloco.outer_schedule.final)
        ms = self.membership
        _check(ms.heartbeat_s > 0, "membership.heartbeat_s", "> 0", ms.heartbeat_s)
        _check(ms.lease_s > 2 * ms.heartbeat_s, "membership.lease_s",
               f"> 2 x membership.heartbeat_s ({ms.heartbeat_s})", ms.lease_s)
        _check(ms.certificate_s > ms.lease_s, "membership.certificate_s",
               "> membership.lease_s", ms.certificate_s)
        c = self.checkpoint
        _check(c.every >= 0, "checkpoint.every", "an integer >= 0 (0: no checkpoints)", c.every)
        _check(c.keep >= 1, "checkpoint.keep", "an integer >= 1", c.keep)
        _check(c.every == 0 or bool(c.dir), "checkpoint.dir",
               "a folder when checkpoint.every > 0 (or pass --checkpoint-dir)", c.dir)


    def schedules(self) -> list[tuple[str, ScheduleSection, int]]:
        """Every optimizer's schedule: (its key, the section, its total steps)."""
        out = []
        d = self.sync.diloco
        for key, sched, per in (("optim.schedule", self.optim.schedule, 1),
                                ("sync.demo.schedule", self.sync.demo.schedule, 1),
                                ("sync.diloco.inner_schedule", d.inner_schedule, 1),
                                ("sync.diloco.outer_schedule", d.outer_schedule,
                                 max(1, d.inner_steps)),
                                ("sync.spsa.schedule", self.sync.spsa.schedule, 1)):
            out.append((key, sched, sched.total_steps or self.run.steps // per))
        return out

    def schedule(self, key: str) -> tuple[ScheduleSection, int]:
        """The schedule at `key` (e.g. "optim.schedule") and its total steps."""
        for k, sched, total in self.schedules():
            if k == key:
                return sched, total
        raise RunSpecError(f"no schedule {key!r}; known: {[k for k, _, _ in self.schedules()]}")


def _check_schedule(key: str, s: ScheduleSection, total: int) -> None:
    _check(s.warmup_steps >= 0, f"{key}.warmup_steps", "an integer >= 0", s.warmup_steps)
    _check(s.decay in SCHEDULE_DECAYS, f"{key}.decay", f"one of {SCHEDULE_DECAYS}", s.decay)
    _check(0.0 <= s.final <= 1.0, f"{key}.final", "in [0, 1] (a share of the base rate)",
           s.final)
    _check(s.total_steps >= 0, f"{key}.total_steps", "an integer >= 0", s.total_steps)
    _check(s.decay == "constant" or total > s.warmup_steps, f"{key}.total_steps",
           f"> warmup_steps ({s.warmup_steps}) for a {s.decay} decay (0 takes run.steps, "
           f"which is {total} here)", s.total_steps)


def _check(ok: bool, key: str, what: str, got: Any) -> None:
    if not ok:
        raise RunSpecError(f"{key} must be {what}, got {got!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RunSpecError(f"{prefix.rstrip('.') or 'run spec'} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RunSpecError(
            f"unknown key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = prefix + name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, type(default))
    return cls(**kwargs)


def _coerce(key: str, value: Any, want: type) -> Any:
    if want is bool:
        if not isinstance(value, bool):
            raise RunSpecError(f"{key} must be true or false, got {value!r}")
        return value
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunSpecError(f"{key} must be an integer, got {value!r}")
        return value
    if want is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RunSpecError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RunSpecError(f"{key} must be finite, got {value!r}")
        return float(value)
    if want is str:
        if not isinstance(value, str):
            raise RunSpecError(f"{key} must be a string, got {value!r}")
        return value
    raise RunSpecError(f"{key}: unsupported type {want.__name__}")
