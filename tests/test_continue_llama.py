"""Continuing a Hugging Face Llama into a Transfusion model (issue 16): the commands' own
arguments, and (slow) benchmarks/continue_llama.py's acceptance figures."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tests.hf_models import save_tiny_llama


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_import_hf_takes_overrides_after_its_options(tmp_path):
    """``mtf-checkpoint import-hf DIR --out RUN overrides...``, as documented: argparse used to
    settle the positionals at DIR and refuse the overrides after --out."""
    llama = save_tiny_llama(tmp_path / "llama")
    out = tmp_path / "imported"
    result = _cli("checkpoints.cli", "import-hf", str(llama), "--out", str(out), "run.seed=7")
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["run"]["seed"] == 7
    assert config["model"]["num_query_groups"] == 2  # and the model section from config.json
    result = _cli("checkpoints.cli", "import-hf", str(llama), "--out", str(out), "--bogus")
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_evaluate_takes_overrides_after_its_options(tmp_path):
    result = _cli(
        "megatron_transfusion.evaluation.cli",
        str(tmp_path / "no-run"),
        "--out",
        str(tmp_path / "eval.json"),
        "eval.batches=1",
    )
    # Parsed: the error is the missing checkpoint, not the arguments.
    assert "unrecognized arguments" not in result.stderr, result.stderr
    assert "no-run" in result.stderr


@pytest.mark.slow
def test_continued_llama_starts_at_its_own_loss(tmp_path):
    """benchmarks/continue_llama.py reduced: 100 Llama steps (held-out 5.47 = 72% of ln 2048
    when measured), 3 Transfusion steps; ~80 s on 2 idle cores."""
    out = tmp_path / "continue_llama"
    result = _cli(
        "benchmarks.continue_llama", "--out", str(out), "--llama-steps", "100", "--steps", "3"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    ln_vocab, llama = r["ln_vocab"], r["llama"]["heldout_loss"]
    assert ln_vocab == pytest.approx(math.log(2048))
    assert llama < 0.8 * ln_vocab  # it learned something the runs can start from
    # The same 5,450 held-out targets in the same windows (the loader cuts documents where
    # the benchmark's Llama windows do): transformers' loss on the rows mtf-evaluate reads is
    # the Llama's own, and the imported model's loss there before any step is transformers'
    # (measured: equal to 1e-6; the bound leaves room for other fp32 kernels' sums).
    rows = r["llama_on_heldout_rows"]
    assert rows["targets"] == r["llama"]["heldout_targets"]
    assert rows["loss"] == pytest.approx(llama, abs=1e-4)
    assert r["step0_heldout_lm_loss"] == pytest.approx(rows["loss"], abs=1e-4)
    # Step 1 trains on text documents and captions: the Llama's loss on the same rows is its
    # start (measured 0.000-0.037 apart at 20-300 Llama steps: Transfusion also sees the
    # images before image-first captions, which transformers' figure leaves out).
    first, scratch = r["init_from"]["lm_loss"][0], r["scratch"]["lm_loss"][0]
    assert first == pytest.approx(r["llama_on_first_step_rows"]["loss"], abs=0.1)
    assert first < 0.8 * ln_vocab and first < scratch - 1.0
    # From scratch starts at ln(vocab) (measured 7.657 against 7.625: init_std 0.02 logits).
    assert scratch == pytest.approx(ln_vocab, abs=0.1)
