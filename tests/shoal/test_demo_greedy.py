"""The embedded default, trained and taken out: `shoal demo --steps 50 --out D`, then
transformers' `AutoModelForCausalLM` + `AutoTokenizer` on D/model greedy-decode the same 32 tokens
as `shoal generate --greedy` (issue #14's done-when, on the built-in byte-level model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.shoal.entry import shoal

transformers = pytest.importorskip("transformers")

PROMPT = "def "


@pytest.mark.slow
def test_demo_export_greedy_decodes_as_transformers_does(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = shoal("demo", "--steps", "50", "--out", out, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] < summary["initial_loss"] - 1.0, summary["loss_by_step"]

    model_dir = out / "model"
    text = shoal("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", "32",
                 "--greedy", check=True, timeout=120).stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == list(PROMPT.encode())
    with torch.no_grad():
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                             do_sample=False)
    new = greedy[0, ids.shape[1]:]
    assert new.numel() == 32  # no end-of-text id: bytes 0-255 only, none stops decoding
    assert text == PROMPT + tok.decode(new) + "\n"
