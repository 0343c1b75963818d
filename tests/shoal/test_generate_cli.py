"""`shoal generate --greedy` on an export: deterministic, and the text transformers' greedy
`generate(do_sample=False)` decodes from the same folder; both engines agree (in-process: the
command's `main`, no subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer.pipeline.checkpoint import save_model
from peer.pipeline.model import Decoder, ModelConfig
from shoal.cli import main

transformers = pytest.importorskip("transformers")

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=64, ffn_multiple_of=16, seed=11)
PROMPT = "def héllo("


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("gen") / "model", TINY, Decoder(TINY).state_dict())


def _generate(capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    rc = main(["generate", *flags])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_greedy_is_deterministic_and_equals_transformers(model_dir: Path, capsys) -> None:
    flags = ("--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "32", "--greedy")
    rc, first, _ = _generate(capsys, *flags)
    assert rc == 0 and first.startswith(PROMPT)
    assert _generate(capsys, *flags)[1] == first
    rc, via_hf, _ = _generate(capsys, *flags, "--engine", "transformers")
    assert rc == 0 and via_hf == first

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == list(PROMPT.encode())
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=32, do_sample=False)
    assert PROMPT + tok.decode(out[0, ids.shape[1]:]) + "\n" == first


def test_sampling_is_seeded_and_bad_flags_are_refused(model_dir: Path, capsys) -> None:
    flags = ("--model", str(model_dir), "--tokens", "16", "--seed", "4")
    rc, shoal_text, _ = _generate(capsys, *flags)
    assert rc == 0 and _generate(capsys, *flags)[1] == shoal_text
    assert _generate(capsys, *flags, "--engine", "transformers")[1] == shoal_text
    rc, _, err = _generate(capsys, *flags, "--engine", "transformers", "--skip", "0.5")
    assert rc == 2 and "--skip needs --engine shoal" in err
    rc, _, err = _generate(capsys, "--model", str(model_dir.parent / "none"), "--greedy")
    assert rc == 2 and "is not an exported model" in err
