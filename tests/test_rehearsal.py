"""The full-shape rehearsal (issue 13.3, benchmarks/rehearsal.py): 256-px images and long
documents sharded with default flags, the 0.16B preset's shapes (4 of its 16 layers, one row
per step) under `sbatch launch/pretrain_0.16b.sh` on the local Slurm, stopped, requeued and
resumed, then one image and one caption from `mtf-generate`. 5-7 minutes on 2 cores."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks import rehearsal
from tests.conftest import ROOT


@pytest.mark.slow
def test_full_shape_rehearsal(tmp_path):
    out = tmp_path / "rehearsal"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.rehearsal", "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:  # pytest keeps its last three temporary directories: not 10 GB of checkpoints each
        for checkpoints in out.glob("transfusion-0.16B-*/checkpoints"):
            shutil.rmtree(checkpoints)
    if result.returncode == rehearsal.NO_SLURM:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    # Every document reaches or crosses the row length, one of them three rows' worth; row 1
    # is BOS and the 4,095 tokens of the second (4,096 positions), row 3, after the resume,
    # goes on with its last token and EOS; row 2 is 15 images of 256 patches.
    assert results["inputs"]["document_tokens"][:3] == [4094, 4095, 4096]
    rows = [
        [(e["stream"], e["index"], e["start"], e["length"]) for e in row] for row in results["rows"]
    ]
    assert rows[0] == [("text", 1, 0, 4096)]
    assert [e[0] for e in rows[1]] == ["image_caption"] * 15
    assert ("text", 1, 4095, 2) in rows[2]
    # Stopped after step 1: step 2 saved, the requeued job resumed there and ran step 3.
    job = results["job"]
    assert job["stop_saved_step"] == 2
    log = (out / "train.log").read_text()
    assert f"resumed from {job['run_dir']}/checkpoints/step_00000002 at step 2" in log
    steps = results["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    # The U-Net patch layers at 32×32 latents trained (an image row), and the LM at 4,096.
    assert any(s["diffusion_loss"] > 0 for s in steps) and all(s["lm_loss"] > 0 for s in steps)
    assert all(0 < s["mfu"] < 1 for s in steps), steps  # against this CPU's measured peak
    # The planner predicts the most demanding row (an image row here): the run's peak, within
    # its 20% bar, is what mtf-plan says for the same layout on `cpu`.
    predicted = steps[0]["predicted_memory_gib"]
    assert max(s["memory_gib"] for s in steps) == pytest.approx(predicted, rel=0.2), steps
    assert results["plan"]["memory_gib"] == pytest.approx(predicted, abs=0.05)

    (image,) = results["image"]
    assert Image.open(image).size == (256, 256)
    assert results["caption"].strip()  # ids the tokenizer has, so some text
