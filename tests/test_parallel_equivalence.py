"""TP=2, PP=2, TP=2×PP=2 and interleaved PP over two uneven micro-batches give the loss
and gradients of their samples as one batch at TP=1.

Real processes over gloo (torchrun). Weights reach every layout through
dist-checkpointing, so this also proves the sharded state dict reshards TP=1 -> TP=2/PP=2.
Gradients are compared as w0 - w1 after a p -= grad step, in the TP=1 layout.
"""

import json

import pytest

from megatron_transfusion.loss import LossTerms
from tests.conftest import run_torchrun

WORKER = "tests/distributed/equivalence_worker.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("equivalence")
    run_torchrun(WORKER, 1, "--layout", "reference", "--workdir", str(path))
    return path


@pytest.mark.parametrize("layout, nproc", [("tp2", 2), ("pp2", 2), ("pp2vpp2", 2), ("tp2pp2", 4)])
def test_layout_matches_single_process(workdir, layout, nproc):
    run_torchrun(WORKER, nproc, "--layout", layout, "--workdir", str(workdir))
    reference = json.loads((workdir / "loss_reference.json").read_text())
    ours = json.loads((workdir / f"loss_{layout}.json").read_text())
    for key in LossTerms.KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-5), key
    compare = json.loads((workdir / f"compare_{layout}.json").read_text())
    assert max(compare["grad_max"].values()) > 1e-2, "the step must move the weights"
    worst = max(compare["grad_diff"], key=compare["grad_diff"].get)
    assert compare["grad_diff"][worst] < 1e-5, f"{worst}: {compare['grad_diff'][worst]}"
    # Every parameter, the patch layers included, took part in the comparison.
    assert any(k.startswith("patch_in.") for k in compare["grad_diff"])
    assert any(k.startswith("patch_out.") for k in compare["grad_diff"])
