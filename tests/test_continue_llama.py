"""Continuing a Hugging Face Llama into a Transfusion model (issue 16): the commands' own
arguments, and (slow) benchmarks/continue_llama.py's acceptance figures."""

import subprocess
import sys

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
