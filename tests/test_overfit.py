"""A tiny model overfits one fixed mixed batch: both losses fall by more than 90%."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_tiny_model_overfits_a_mixed_batch():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from megatron_transfusion.cli import overfit_main; overfit_main()",
            "--config",
            "tiny",
            "--steps",
            "80",
            "data.seq_length=128",
            "data.micro_batch_size=2",
            "data.global_batch_tokens=256",
            "data.sources=[]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fall = dict(re.findall(r"(\w+_loss) ([\d.]+)%", result.stdout.splitlines()[-1]))
    assert float(fall["lm_loss"]) > 90 and float(fall["diffusion_loss"]) > 90, result.stdout
