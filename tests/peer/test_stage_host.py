"""The peer's compute core without a network: stages driven like the daemon drives them give
the whole model's loss and gradients, state transfer is exact, and two replicas fed the same
aggregate stay bit-identical."""

import numpy as np
import pytest
import torch

from peer.pipeline import wire
from peer.pipeline.model import Decoder
from peer.pipeline.stage_host import StageError, StageHost, model_config
from peer.sync.allreduce import AllreduceMode
from protocols.runspec import RunSpec

SPEC = RunSpec().replace(**{"model.d_model": 32, "model.n_layers": 4, "model.n_heads": 4,
                            "model.seq_len": 16, "pipeline.stages": 2,
                            "pipeline.microbatch": 4, "pipeline.target_batch": 8})


def _hosts() -> list[StageHost]:
    return [StageHost(SPEC, s) for s in range(SPEC.pipeline.stages + 1)]


def _microbatch(hosts: list[StageHost], mb: str, tokens: torch.Tensor, targets: torch.Tensor
                ) -> float:
    h = hosts[0].embed(mb, tokens, 1)
    for host in hosts[1:]:
        h = host.forward(mb, h, 1)
    loss, g = hosts[0].head(mb, h, targets)
    for host in reversed(hosts[1:]):
        g = host.backward(mb, g)
    hosts[0].embed_backward(mb, g)
    return loss


def test_pipeline_equals_whole_model() -> None:
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (4, 17))
    tokens, targets = batch[:, :-1], batch[:, 1:]
    hosts = _hosts()
    loss = _microbatch(hosts, "m0", tokens, targets)
    full = Decoder(model_config(SPEC))
    ref = full.loss(tokens, targets)
    ref_loss = ref[0] if isinstance(ref, tuple) else ref
    (ref_loss * 4).backward()
    assert loss == pytest.approx(float(ref_loss.detach()), abs=1e-6)
    grads = {}
    for host in hosts:
        grads.update(host.grad_sums())
    for name, p in full.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_state_transfer_is_exact_and_replicas_stay_identical() -> None:
    torch.manual_seed(1)
    a, b = StageHost(SPEC, 1), StageHost(SPEC, 1)
    mode = AllreduceMode()
    for step in range(3):
        parts = {}
        for pid, host in (("a", a), ("b", b)):
            x = torch.randn(4, 16, 32)
            y = host.forward(f"{pid}{step}", x, step + 1)
            host.backward(f"{pid}{step}", torch.randn_like(y))
            arrays, meta = mode.contribution(host)
            parts[pid] = (meta, arrays)
        result, meta = mode.aggregate(parts)
        # the aggregate crosses the wire as bytes: both replicas apply the same bytes
        for host in (a, b):
            mode.apply(host, {k: np.array(v) for k, v in result.items()}, meta)
        assert a.state_hash() == b.state_hash()
    c = StageHost(SPEC, 1)
    c.load_state_arrays(a.state_arrays())
    assert c.state_hash() == a.state_hash() and c.step == a.step == 3
    # the copy keeps stepping in lockstep (optimizer state came along)
    g = {k: torch.full_like(v, 0.01) for k, v in a.params().items()}
    a.apply_gradient(g)
    c.apply_gradient(g)
    assert c.state_hash() == a.state_hash()


def test_aggregate_ignores_replica_order_and_weights_by_samples() -> None:
    mode = AllreduceMode()
    one = {"w": np.ones(3, np.float32) * 4}
    two = {"w": np.ones(3, np.float32) * 2}
    r1, m1 = mode.aggregate({"x": ({"samples": "4"}, one), "y": ({"samples": "2"}, two)})
    r2, _ = mode.aggregate({"y": ({"samples": "2"}, two), "x": ({"samples": "4"}, one)})
    assert r1["w"].tobytes() == r2["w"].tobytes()
    np.testing.assert_allclose(r1["w"], 1.0)
    assert m1["included"] == "x,y" and m1["samples"] == "6"
    _, skip = mode.aggregate({"x": ({"samples": "0"}, one)})
    assert skip["skip"] == "1"


def test_bad_activations_are_refused() -> None:
    host = StageHost(SPEC, 1)
    with pytest.raises(StageError, match="shape"):
        host.forward("m", torch.zeros(4, 16, 31), 1)
    with pytest.raises(StageError, match="NaN"):
        host.forward("m", torch.full((4, 16, 32), float("nan")), 1)
    with pytest.raises(StageError, match="no forward pass"):
        host.backward("never", torch.zeros(4, 16, 32))
    y = host.forward("m", torch.zeros(4, 16, 32), 1)
    with pytest.raises(StageError, match="does not match"):
        host.backward("m", torch.zeros(2, 16, 32))
    host.backward("m", torch.zeros_like(y))  # still held after the bad gradient


def test_wire_counter_counts_by_kind() -> None:
    c = wire.ByteCounter()
    c.add("activations", sent=10)
    c.add("sync:allreduce", received=5)
    assert c.total_sent() == 10 and c.total_received() == 5
    assert c.by_kind() == {"activations": 10}


def test_a_stage_can_start_from_an_exported_model(tmp_path) -> None:
    from peer.pipeline.checkpoint import save_model

    other = model_config(SPEC.replace(**{"run.seed": 7}))
    trained = Decoder(other).state_dict()
    save_model(tmp_path / "m", other, trained)
    for stage in range(SPEC.pipeline.stages + 1):
        host = StageHost(SPEC, stage)
        host.load_exported(str(tmp_path / "m"))
        for name, value in host.module.state_dict().items():
            assert torch.equal(value, trained[name]), name
    bigger = model_config(SPEC.replace(**{"model.d_model": 64}))
    save_model(tmp_path / "big", bigger, Decoder(bigger).state_dict())
    with pytest.raises(StageError, match="d_model"):
        StageHost(SPEC, 1).load_exported(str(tmp_path / "big"))


def test_agreed_arrays_are_the_shared_weights_under_diloco() -> None:
    """An export between DiLoCo outer steps gets the shared model, hashed as sent."""
    from peer.pipeline.stage_state import tensor_hash

    host = StageHost(RunSpec().replace(**{"pipeline.stages": 2, "model.d_model": 32,
                                          "model.n_heads": 4, "model.n_layers": 2}), 1)
    arrays, h = host.agreed_arrays()
    params = {k[6:]: torch.from_numpy(a) for k, a in arrays.items() if k.startswith("model.")}
    assert h == tensor_hash(params) == host.state_hash()
    name, p = next(iter(host.params().items()))
    host.mode_state[f"shared.param.{name}"] = p.detach().clone() + 1.0  # inner steps drifted
    arrays, h2 = host.agreed_arrays()
    assert np.array_equal(arrays[f"model.{name}"], (p.detach() + 1.0).numpy())
    assert h2 != h
    host.close()


def test_demo_inner_steps_divides_the_run() -> None:
    from shoal.local import demo_inner_steps

    assert demo_inner_steps(100) == 10 and demo_inner_steps(60) == 6
    assert demo_inner_steps(97) == 9 and demo_inner_steps(5) == 1


def test_pending_graphs_are_bounded_per_sender_and_dropped_when_stale() -> None:
    """Row 4 of #12: a sender's forwards beyond its quota are refused (PendingQuota, the
    services' RESOURCE_EXHAUSTED) while other senders keep theirs; a backward must come from
    the forward's sender; graphs of an ended step or of a departed sender are dropped."""
    from peer.pipeline.stage_host import NotYours, PendingLimits, PendingQuota

    host = StageHost(SPEC, 1)
    lim = PendingLimits.of(SPEC)
    assert host.pending_limits == lim
    mb = SPEC.pipeline.microbatch
    x = torch.randn(mb, SPEC.model.seq_len, SPEC.model.d_model)
    kept = 0
    with pytest.raises(PendingQuota, match="backward"):
        for i in range(lim.graphs + 1):
            host.forward(f"evil-{i}", x, 1, "evil")
            kept += 1
    assert kept == min(lim.graphs, lim.samples // mb)
    with pytest.raises(PendingQuota):  # one sample too many, by the header's count alone
        host.check_quota("evil", "another", lim.samples)
    host.forward("honest-0", x, 1, "driver")  # another sender is not held up by it
    with pytest.raises(NotYours):
        host.forward("honest-0", x, 1, "evil")  # nor can its microbatch id be taken over
    with pytest.raises(NotYours):
        host.backward("honest-0", torch.ones(mb, SPEC.model.seq_len, SPEC.model.d_model), "evil")
    host.backward("honest-0", torch.ones(mb, SPEC.model.seq_len, SPEC.model.d_model), "driver")
    assert host.forget_owner({"evil"}) == kept and not host.pending
    host.forward("old", x, 1, "driver")
    host.finish_step()  # step 1 ended: its graphs can no longer count
    assert host.expire_pending() == 1 and not host.pending
    host.close()
