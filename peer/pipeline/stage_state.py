"""A stage's state as it leaves and enters a replica: its hash, the named arrays a state download
carries, an exported model's slice, and weights rebuilt without a replica.

A mixin of `StageHost` (peer/pipeline/stage_host.py), split out of it by responsibility; what the
arrays hold (parameters, optimizer and sync-mode state, `mode.shared.*`) and what the hash covers
is described in that module's docstring. `StageError` lives here so that both use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from peer.pipeline.stages import copy_checked
from protocols.runspec import RunSpec


class StageError(RuntimeError):
    """A request this stage cannot serve (unknown microbatch, wrong shape, behind the swarm)."""


def tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names and raw bytes in name order: equal hashes = bit-identical tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hash_of_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """`StageHost.state_hash` of a stage from its arrays as State.Download sends them (no module
    needed): the `mode.shared.*` arrays when there are any, else the `model.*` parameters (all
    `model.*` arrays but CheckFree+'s `edge_` buffers, the stages' only persistent buffers)."""
    shared = {k[5:]: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()
              if k.startswith("mode.shared.")}
    if shared:
        return tensor_hash(shared)
    return tensor_hash({k[6:]: torch.from_numpy(np.ascontiguousarray(a))
                        for k, a in arrays.items()
                        if k.startswith("model.") and not k[6:].startswith("edge_")})


class StageState:
    """`state_hash`, `state_arrays` / `load_state_arrays`, `agreed_arrays`, `load_exported` and
    `load_rebuilt` of a `StageHost` (see the module docstring)."""

    spec: RunSpec
    stage: int
    module: nn.Module
    device: torch.device
    step: int
    lr_scale: float
    optimizer: torch.optim.Optimizer
    mode_state: dict[str, torch.Tensor]
    pending: dict
    samples: int
    microbatches: int

    def load_exported(self, directory: str) -> None:
        """Take this stage's slice of an exported model (shoal export / demo --out)."""
        from peer.pipeline.checkpoint import load_config, load_model
        from peer.pipeline.stage_host import model_config

        if self.spec.model.hf:  # a Hugging Face folder: read only this stage's tensors
            from peer.pipeline.hf import HFModelError, load_into

            try:
                load_into(self.module, directory)
            except HFModelError as exc:
                raise StageError(f"{directory}: {exc}") from exc
            return
        config = load_config(directory)
        mine = model_config(self.spec)
        for key in ("d_model", "n_layers", "n_heads", "seq_len"):
            if getattr(config, key) != getattr(mine, key):
                raise StageError(f"{directory}: model {key}={getattr(config, key)} differs from "
                                 f"the run's {getattr(mine, key)}; use a run spec that matches")
        full = load_model(directory).state_dict()
        own = self.module.state_dict()
        missing = [k for k in own if k not in full and not k.startswith("edge_")]
        if missing:
            raise StageError(f"{directory} lacks {missing[:3]} for stage {self.stage}")
        with torch.no_grad():
            for k, v in own.items():
                if k in full:
                    v.copy_(full[k])

    def load_rebuilt(self, state: Mapping[str, torch.Tensor], step: int, lr_scale: float) -> None:
        """Take weights rebuilt without a replica of this stage (CheckFree average, CheckFree+
        copy, or a snapshot; peer/recovery/rebuild.py): the parameters named in `state` (all of
        them), step `step`, a fresh optimizer and the boosted learning rate `lr_scale` from now on.
        Buffers not in `state` (CheckFree+ edge copies) keep their current values."""
        params = self.params()
        if set(state) != set(params):
            raise StageError(f"rebuilt state names {sorted(set(state) ^ set(params))[:3]} do "
                             f"not match stage {self.stage}")
        copy_checked(params, state, StageError, "rebuilt ", "the stage")
        self.step = step
        self.lr_scale = lr_scale
        self.optimizer = self._make_optimizer()
        self.mode_state = {}
        self.pending.clear()
        self.samples = 0
        self.microbatches = 0
        self.optimizer.zero_grad(set_to_none=True)

    def state_hash(self) -> str:
        """Hash of what the replicas agree on: the `shared.` mode state if any, else the params."""
        shared = {k: v for k, v in self.mode_state.items() if k.startswith("shared.")}
        return tensor_hash(shared or self.params())

    def agreed_arrays(self) -> tuple[dict[str, np.ndarray], str]:
        """The weights every replica agrees on (for export and inference) and their hash.

        For most modes these are the live parameters. Under DiLoCo the live parameters are this
        replica's own inner-step drift; the model the replicas share is the one of the last outer
        step (mode state `shared.param.*`), so an export between outer steps still gets one
        model whichever replica it asks. The `shared.*` mode state travels too (`mode.shared.*`
        arrays), and the hash is `state_hash()`: the hash heartbeats report and the coordinator
        attests, which a receiver recomputes from the arrays alone (`hash_of_arrays`).
        """
        arrays = self.state_arrays(include_optimizer=False)
        prefix = "shared.param."
        for key, t in self.mode_state.items():
            if key.startswith("shared."):
                arrays[f"mode.{key}"] = t.detach().cpu().contiguous().numpy()
            if key.startswith(prefix):
                arrays[f"model.{key[len(prefix):]}"] = t.detach().cpu().float().numpy()
        return arrays, self.state_hash()

    def state_arrays(self, include_optimizer: bool = True) -> dict[str, np.ndarray]:
        """Parameters, persistent buffers, optimizer and sync-mode state, as named arrays."""
        out: dict[str, np.ndarray] = {}
        for name, t in self.module.state_dict().items():
            out[f"model.{name}"] = t.detach().cpu().float().numpy()
        if include_optimizer:
            names = {id(p): n for n, p in self.module.named_parameters()}
            for p, st in self.optimizer.state.items():
                for key, value in st.items():
                    v = value if torch.is_tensor(value) else torch.tensor(value)
                    out[f"optim.{names[id(p)]}.{key}"] = v.detach().cpu().float().numpy()
            for name, t in self.mode_state.items():
                out[f"mode.{name}"] = t.detach().cpu().contiguous().numpy()
        out["meta.step"] = np.array([self.step], dtype=np.int64)
        out["meta.lr_scale"] = np.array([self.lr_scale], dtype=np.float64)
        return out

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace this replica's state with `arrays` (from `state_arrays` of another replica)."""
        model = {k[6:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                 if k.startswith("model.")}
        try:
            self.module.load_state_dict(model, strict=True)
        except RuntimeError as exc:
            raise StageError(f"downloaded state does not fit stage {self.stage}: {exc}") from exc
        self.step = int(arrays["meta.step"][0])
        self.lr_scale = float(arrays["meta.lr_scale"][0]) if "meta.lr_scale" in arrays else 1.0
        self.optimizer = self._make_optimizer()
        params = dict(self.module.named_parameters())
        for name, p in params.items():
            st = {}
            for key in ("exp_avg", "exp_avg_sq", "step"):
                a = arrays.get(f"optim.{name}.{key}")
                if a is not None:
                    t = torch.from_numpy(np.array(a)).to(p.device)
                    st[key] = t.reshape(()) if key == "step" else t.reshape(p.shape)
            if st:
                self.optimizer.state[p] = st
        self.mode_state = {k[5:]: torch.from_numpy(np.array(v)).to(self.device)
                           for k, v in arrays.items() if k.startswith("mode.")}
        self.pending.clear()
        self.samples = 0
        self.microbatches = 0
        self.optimizer.zero_grad(set_to_none=True)
