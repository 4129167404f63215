"""The Megatron engine's updates equal torch AdamW in one process on each step's samples
as one batch: DP=2 with the distributed optimizer (ZeRO-1) and without, TP=2, and PP=2
with gradient accumulation, all over uneven micro-batches (L_LM and L_DDPM are means over
the global batch's tokens and images, not means of per-micro-batch means)."""

import json

import pytest

from tests.conftest import run_torchrun

WORKER = "tests/distributed/engine_worker.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    run_torchrun(WORKER, 1, "--layout", "reference", "--workdir", str(path))
    return path


@pytest.mark.parametrize("layout", ["dp2", "dp2_zero0", "tp2", "tp2_sp", "pp2"])
def test_engine_updates_equal_torch_adamw(workdir, layout):
    run_torchrun(WORKER, 2, "--layout", layout, "--workdir", str(workdir))
    reference = json.loads((workdir / "engine_loss_reference.json").read_text())
    ours = json.loads((workdir / f"engine_loss_{layout}.json").read_text())
    assert ours["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert ours["grad_norms"] == pytest.approx(
        reference["grad_norms"], rel=1e-5
    )  # Adam alone hides a scale
    assert ours["evaluation"] == pytest.approx(reference["evaluation"], abs=1e-5)
    compare = json.loads((workdir / f"engine_compare_{layout}.json").read_text())
    assert min(compare["moved"].values()) > 0, "every parameter was updated"
    worst = max(compare["diff"], key=compare["diff"].get)
    assert compare["diff"][worst] < 1e-5, f"{worst}: {compare['diff'][worst]}"
