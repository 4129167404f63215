"""The learning-quality benchmark, shortened: the whole documented pipeline (make the shapes
set, mtf-prepare-builtin, mtf-train-vae, mtf-prepare-data, torchrun training, mtf-generate
both ways) must give a model that draws and captions far above chance."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_shortened_benchmark_beats_chance_by_a_wide_margin(tmp_path):
    out = tmp_path / "quality"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.learning_quality",
            "--out",
            str(out),
            "--train-samples",
            "3000",
            "--vae-steps",
            "600",
            "--steps",
            "1500",
            "--per-kind",
            "12",
            "--diffusion-steps",
            "50",
        ],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )
    final = json.loads((out / "results.json").read_text())["final"]
    single = final["text_to_image"]["seen"]
    # Chance: colour 1/4, shape 1/3, size 1/2, position 1/3, all four 1/72; a caption 1/72.
    assert single["colour"] >= 0.5 and single["position"] >= 0.6 and single["all"] >= 0.2, single
    assert final["image_to_text"]["seen"] >= 0.5, final["image_to_text"]
