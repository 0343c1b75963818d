"""`shoal export`: the swarm's model out into one directory (`shoal generate` reads it).

Export joins the coordinator as an *observer* (it is given no stage and no lease that counts),
reads the swarm view, downloads each stage from a live replica over `State.Download` (the same
hash-checked path a joining replica uses), assembles the Decoder state dict and writes a Hugging
Face Llama directory (peer/pipeline/checkpoint.py, hf_format.py: weights, config, generation
config, byte tokenizer) that `transformers` and `shoal generate` load.

The download is the peers' own (peer/recovery/transfer.py `receive_state_over`): it asks for
the serving peer's data plane and BLAKE3, and falls back in-band when that cannot be reached.
The observer's calls are signed with its identity and the membership certificate its Join
returns; over mTLS the coordinator also issues it a leaf of the swarm CA (as to any member), and
that leaf is its client certificate on the gRPC channel and on the data plane alike. A
--plaintext swarm, or a loopback link, is plaintext on both. The data plane's TLS is thus always
the gRPC channel's: nothing goes in the clear that the channel would have encrypted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
import numpy as np
import torch

from peer import consistency
from peer.pipeline import wire
from peer.pipeline.checkpoint import assemble, save_model
from peer.pipeline.stage_host import model_config
from peer.pipeline.stage_state import hash_of_arrays
from peer.recovery.transfer import ATTEST_TRIES, attested_first, receive_state_over
from protocols import auth, tensor_stream
from protocols import shoal_pb2 as pb
from protocols import shoal_pb2_grpc as pbg
from protocols.coordinator_client import (
    OBSERVER_STAGE,
    READY_STATES,
    Benchmark,
    CoordinatorClient,
)
from protocols.identity import Identity
from protocols.tls import peer_channel

log = logging.getLogger("shoal.export")


class ExportFailed(RuntimeError):
    pass


async def pull_stage_states(coordinator: str, identity: Identity, token: str | None,
                            counter: wire.ByteCounter | None = None, *, plaintext: bool = False,
                            fingerprint: str | None = None):
    """(spec, view, [state dict of stage 0, 1, ..., S]) from live replicas (over mTLS with a
    leaf the coordinator issues this observer, unless `plaintext`)."""
    counter = counter or wire.ByteCounter()
    client = CoordinatorClient(coordinator, identity, token=token, plaintext=plaintext,
                               fingerprint=fingerprint)
    try:
        joined = await client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE)
        spec = joined.spec
        view = await client.view()
        signer = auth.CallSigner(identity, lambda: client.certificate)
        states = []
        channels: list[grpc.aio.Channel] = []
        limits = wire.limits_for(1 << 34)
        for stage in range(spec.pipeline.stages + 1):
            replicas = [p for p in view.replicas(stage) if p.state in READY_STATES]
            if not replicas:
                raise ExportFailed(f"stage {stage} has no live replica to export from; wait for "
                                   "a peer to take it (see `shoal status`)")
            last_error = ""
            by_id = {r.peer_id: r for r in replicas}
            for pid in attested_first(view, stage, list(by_id)):
                p, state = by_id[pid], None
                ch = peer_channel(p.address, p.peer_id, client.tls(),
                                  options=tensor_stream.grpc_options(),
                                  interceptors=auth.client_interceptors(signer))
                channels.append(ch)
                for _ in range(ATTEST_TRIES):  # again while the swarm's step moves on
                    try:
                        header, arrays = await receive_state_over(
                            ch, p.address, p.peer_id,
                            pb.StateRequest(stage=stage, include_optimizer=False),
                            own_tls=client.tls(), counter=counter, limits=limits)
                    except grpc.aio.AioRpcError as exc:
                        last_error = f"{p.peer_id[:8]}: {exc.details()}"
                        break
                    except ValueError as exc:  # a codec error: a bad payload, refused unread
                        last_error = f"{p.peer_id[:8]}: {exc}"
                        break
                    state, last_error, moved = _verified(view, stage, p.peer_id, header, arrays)
                    if not moved:
                        break
                    view = await client.view()
                if state is not None and not last_error:
                    states.append((state, header.step))
                    break
            else:
                raise ExportFailed(f"stage {stage}: no replica gave a verified state "
                                   f"({last_error})")
        for ch in channels:
            await ch.close()
        return spec, view, states
    finally:
        with contextlib.suppress(Exception):
            await client.leave("export done")
        await client.close()


def _verified(view, stage: int, sender: str, header: pb.CallHeader, arrays: dict
              ) -> tuple[dict[str, torch.Tensor] | None, str, bool]:
    """(state dict, "", False) of a downloaded stage whose arrays hash (`hash_of_arrays`, the
    replicas' own `state_hash`) to what the coordinator attests for the stage at the state's
    step; else (None or the state, why not, whether the attestation is of another step: the
    swarm moved, download again). A stage that keeps training is ahead of any attestation (it
    trails by a heartbeat): its newer state is taken only from the replica whose own report the
    coordinator attests. Without any attestation in the view the sender's claim is all there is
    (said in the log). Under DiLoCo the weights are the shared ones the hash
    covers (`mode.shared.param.*`), never the `model.*` arrays beside them."""
    got = hash_of_arrays(arrays)
    claimed = header.meta.get("state_hash", "")
    if got != claimed:
        return None, f"{sender[:8]}: its state hashes to {got[:12]}, it claimed {claimed[:12]}", \
            False
    at, attested_hash = consistency.attested(view, stage)
    if not attested_hash:
        log.warning("stage %d: the coordinator attests no hash yet; the state from %s is checked "
                    "against its own claim only", stage, sender[:8])
    elif at != header.step and not (header.step > at and consistency.vouched(view, stage, sender)):
        return None, (f"{sender[:8]}: its state is at step {header.step}, the coordinator "
                      f"attests step {at}"), True
    elif at != header.step:  # a stage that trains on: the attestation trails by a heartbeat
        log.info("stage %d: state of step %d from %s, newer than the attested step %d, taken "
                 "because the coordinator attests that replica's own report", stage,
                 header.step, sender[:8], at)
    elif got != attested_hash:
        return None, (f"{sender[:8]}: its state at step {at} hashes to {got[:12]}, the "
                      f"coordinator attests {attested_hash[:12]}"), False
    state = {k[6:]: torch.from_numpy(a.copy()) for k, a in arrays.items()
             if k.startswith("model.")}
    shared = "mode.shared.param."
    for k, a in arrays.items():
        if k.startswith(shared):
            state[k[len(shared):]] = torch.from_numpy(np.array(a, dtype=np.float32))
    return state, "", False


async def export_to(out: str | Path, coordinator: str, identity: Identity,
                    token: str | None, *, plaintext: bool = False,
                    fingerprint: str | None = None) -> Path:
    spec, _, states = await pull_stage_states(coordinator, identity, token,
                                              plaintext=plaintext, fingerprint=fingerprint)
    steps = sorted({step for _, step in states})
    metadata = {"run": spec.run.name, "sync": spec.sync.mode,
                "steps": ",".join(map(str, steps)), "run_spec": spec.to_toml()}
    if spec.model.hf:  # a Hugging Face model in: out as the same model, trained
        from shoal.hf_export import save_hf_model

        return save_hf_model(out, spec.model.hf, [s for s, _ in states], metadata)
    full = assemble(states[0][0], [s for s, _ in states[1:]])
    return save_model(out, model_config(spec), full, metadata=metadata)


async def pipeline_logits(coordinator: str, identity: Identity, token: str | None,
                          model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `tokens` with the block stages computed by the live swarm (one replica each,
    activations in fp32) and the embedding and head from `model`: for comparing an export with
    the pipeline it came from."""
    import torch.nn.functional as F

    client = CoordinatorClient(coordinator, identity, token=token)
    channels: list[grpc.aio.Channel] = []
    try:
        joined = await client.join(Benchmark(declared=True), "", stage_hint=OBSERVER_STAGE)
        spec = joined.spec
        view = await client.view()
        signer = auth.CallSigner(identity, lambda: client.certificate)
        counter = wire.ByteCounter()
        with torch.no_grad():
            h = model.embedding(tokens.long())
            for stage in range(1, spec.pipeline.stages + 1):
                live = [p for p in view.replicas(stage) if p.state in READY_STATES]
                if not live:
                    raise ExportFailed(f"stage {stage} has no live replica")
                ch = peer_channel(live[0].address, live[0].peer_id, client.tls(),
                                  options=tensor_stream.grpc_options(),
                                  interceptors=auth.client_interceptors(signer))
                channels.append(ch)
                header = pb.CallHeader(kind="forward", microbatch_id="inspect", stage=stage,
                                       sender=identity.peer_id)
                header.meta["mode"] = "inference"
                _, arrays = await wire.call_tensors(
                    pbg.StageStub(ch).Forward, header, {"x": h.float().numpy()},
                    encoding=pb.RAW, limits=wire.limits_for(1 << 30), counter=counter,
                    kind="activations", timeout=60)
                h = torch.from_numpy(arrays["x"].copy())
            return F.linear(model.norm(h), model.embedding.weight)
    finally:
        for ch in channels:
            await ch.close()
        with contextlib.suppress(Exception):
            await client.leave("inspection done")
        await client.close()


def export_main(args: argparse.Namespace) -> int:
    if not args.coordinator:
        raise SystemExit("shoal export: pass --coordinator HOST:PORT (or SHOAL_COORDINATOR)")
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    identity = Identity.load_or_create(args.identity)
    try:
        out = asyncio.run(export_to(args.out, args.coordinator, identity, token,
                                    plaintext=getattr(args, "plaintext", False),
                                    fingerprint=getattr(args, "coordinator_fingerprint", None)))
    except ExportFailed as exc:
        print(f"shoal export: {exc}")
        return 1
    print(f"wrote {out}/model.safetensors (or its shards), config.json and tokenizer.json: a "
          "Hugging Face model (transformers' AutoModelForCausalLM.from_pretrained loads it); try "
          f"shoal generate --model {out} --greedy")
    return 0
