"""benchmarks/gpu_check.sh: its CPU dry run goes through every part of the GPU check and
writes the JSON the GPU run will; a part that fails is recorded and the rest still run."""

import json
import os
import subprocess

from tests.conftest import ROOT

PARTS = ["gpu_tests", "attention", "training", "sampling"]


def test_dry_run_writes_every_part_of_the_report(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["environment"]["device"] == "cpu"
    assert list(report["parts"]) == PARTS
    for name, entry in report["parts"].items():
        assert entry["ok"] and entry["error"] is None, name
    tests = report["parts"]["gpu_tests"]["results"]["tests"]
    assert len(tests) == 3 and {t["outcome"] for t in tests.values()} <= {"passed", "skipped"}
    attention = report["parts"]["attention"]["results"]
    for backend in ("sdpa", "flex", "flash"):
        assert max(attention[backend]["fraction_outside_tolerance"].values()) == 0.0
    training = report["parts"]["training"]["results"]
    assert training["tokens_per_second"] > 0 and 0 < training["mfu"] < 1
    assert training["peak_memory_gib"] > 0 and training["predicted_memory_gib"] > 0
    assert training["peak_flops"] > 0  # measured on CPU; the datasheet figure on a GPU
    for batch in report["parts"]["sampling"]["results"]["batches"].values():
        assert batch["images_per_second"] > 0 and batch["ms_per_diffusion_step"] > 0
    assert (tmp_path / "check.log").read_text().count("==> ") == len(PARTS)


def test_a_part_out_of_time_is_recorded_and_the_next_part_runs(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setitem(gpu_check.LIMITS, "training", 2)  # imports and a GEMM alone take longer
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "check.json"
    report = gpu_check.run_check(True, out, ["training", "gpu_tests"], budget=300)
    assert json.loads(out.read_text()) == report
    training, tests = report["parts"]["training"], report["parts"]["gpu_tests"]
    assert not training["ok"] and training["error"].startswith("timed out after 2 s")
    assert tests["ok"] and tests["results"]["tests"]
