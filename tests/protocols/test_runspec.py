"""The run spec round-trips through TOML and refuses bad input naming the key."""

import pytest

from protocols.runspec import RunSpec, RunSpecError


def test_round_trip_defaults_and_changes() -> None:
    spec = RunSpec().replace(**{"sync.mode": "demo", "pipeline.stages": 3, "sync.demo.topk": 8})
    assert RunSpec.from_toml(spec.to_toml()) == spec
    assert spec.sync.demo.topk == 8


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[pipeline]\nstages = 0", "pipeline.stages"),
        ("[sync]\nmode = 'gossip'", "sync.mode"),
        ("[model]\nd_modl = 64", "model.d_modl"),
        ("[model]\nd_model = 'big'", "model.d_model"),
        ("[model]\nd_model = 100\nn_heads = 3", "model.d_model"),
        ("[pipeline]\nskip_ratio = 1.5", "pipeline.skip_ratio"),
        ("[optim]\nlr = nan", "optim.lr"),
        ("[pipeline]\ncheckfree_plus = 1", "pipeline.checkfree_plus"),
        ("[membership]\nlease_s = 1.0", "membership.lease_s"),
        ("mode = 3", "mode"),
    ],
)
def test_bad_keys_are_named(text: str, key: str) -> None:
    with pytest.raises(RunSpecError, match=key.replace(".", r"\.")):
        RunSpec.from_toml(text)


def test_not_toml() -> None:
    with pytest.raises(RunSpecError, match="not valid TOML"):
        RunSpec.from_toml("[[[")
