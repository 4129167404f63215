"""DeepSpeedEngine (ZeRO-1/2/3 over a Megatron TP×DP model) trains exactly like plain AdamW.

The reference runs in this process at TP=1: the same model and seed, the micro-batches of
every rank as ONE micro-batch through Megatron's schedule, torch's clip_grad_norm_ and
AdamW over the project's ``param_groups``. The ranks' micro-batches hold different numbers
of images and tokens, so this also checks that L_LM and L_DDPM are global-batch means.
The DeepSpeed runs are real processes over gloo (torchrun); their final weights come back
through dist-checkpointing, resharded to TP=1.
"""

import functools
import json
import math

import pytest
import torch

from megatron_transfusion.loss import LossTerms
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import seed_everything
from megatron_transfusion.training.optimizer import build_adamw, set_lr
from megatron_transfusion.training.step import batch_losses, forward_backward
from tests.conftest import run_torchrun
from tests.distributed import deepspeed_worker as worker
from tests.distributed.equivalence_worker import load_model_shards, one_batch

WORKER = "tests/distributed/deepspeed_worker.py"


@functools.cache
def reference(plat, dp: int, steps: tuple[int, ...]):
    """Plain AdamW on the global batch of each step in ``steps``: (weights, per-step
    results, the losses of step STEPS's global batch after them)."""
    cfg = worker.config(dp=dp)
    seed_everything(worker.SEED)
    chunks = build_model(cfg, plat)
    optimizer = build_adamw(chunks, cfg.optimizer)
    results = []
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        batch = one_batch(worker.micro_batches(cfg, step, 0, dp * worker.MICRO_BATCHES))
        losses = batch_losses(forward_backward(chunks, [batch], cfg.diffusion.loss_weight))
        grad_norm = torch.nn.utils.clip_grad_norm_(chunks[0].parameters(), cfg.optimizer.grad_clip)
        set_lr(optimizer, worker.lr(cfg, step))
        optimizer.step()
        results.append({"losses": losses.as_dict(), "grad_norm": float(grad_norm)})
    with torch.no_grad():
        batch = one_batch(worker.micro_batches(cfg, worker.STEPS, 0, dp * worker.MICRO_BATCHES))
        evaluation = batch_losses(
            forward_backward(chunks, [batch], cfg.diffusion.loss_weight, forward_only=True)
        )
    return tensors(chunks[0]), results, evaluation.as_dict()


def trained_weights(plat, directory) -> dict[str, torch.Tensor]:
    (model,) = build_model(worker.config(), plat)
    load_model_shards([model], directory)
    return tensors(model)


def tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run(tmp_path, scenario, zero, tp=1, offload=False, no_mpu=False, name="run"):
    args = [
        "--scenario",
        scenario,
        "--zero",
        str(zero),
        "--tp",
        str(tp),
        "--name",
        name,
        "--workdir",
        str(tmp_path),
    ]
    args += ["--offload"] * offload + ["--no-mpu"] * no_mpu
    run_torchrun(WORKER, 2, *args)
    out = json.loads((tmp_path / f"{name}.json").read_text())
    first, *others = out["ranks"]
    assert all(o == first for o in others), "every rank must report the same StepResults"
    return out, first


def assert_matches(ours: list[dict], theirs: list[dict]):
    for mine, ref in zip(ours, theirs, strict=True):
        assert not mine["skipped"]
        for key in LossTerms.KEYS:
            assert mine["losses"][key] == pytest.approx(ref["losses"][key], abs=1e-5), key
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert ours[0]["grad_norm"] > 1.0, "the norm must be the one before clipping to 1.0"


@pytest.mark.parametrize(
    "zero, tp, offload", [(1, 1, False), (2, 1, False), (1, 2, False), (2, 1, True)]
)  # ZeRO-3 is compared with the reference in the NaN test
def test_zero_matches_plain_adamw(tmp_path, megatron_world, zero, tp, offload):
    out, results = run(tmp_path, "train", zero, tp, offload)
    weights, expected, evaluation = reference(
        megatron_world, dp=2 // tp, steps=tuple(range(worker.STEPS))
    )
    assert_matches(results, expected)
    assert out["evaluation"] == pytest.approx(evaluation, abs=1e-5)
    assert max_diff(trained_weights(megatron_world, tmp_path / "run"), weights) < 1e-5


def test_without_mpu_tensor_parallel_is_wrong(tmp_path, megatron_world):
    """The control that shows the comparison can fail: without the mpu adapter DeepSpeed
    averages TP shards into each other (shared notes), and this test sees it."""
    run(tmp_path, "train", zero=1, tp=2, no_mpu=True)
    weights, *_ = reference(megatron_world, dp=1, steps=tuple(range(worker.STEPS)))
    assert max_diff(trained_weights(megatron_world, tmp_path / "run"), weights) > 1e-2


@pytest.mark.parametrize("zero", [2, 3])  # ZeRO-3 detects bad gradients in its own code
def test_non_finite_loss_on_one_rank_skips_the_step_everywhere(tmp_path, megatron_world, zero):
    """Step 1: a NaN latent on one rank (NaN gradients). Step 2: a NaN loss on one rank
    whose gradients are finite, which only the engine's world-wide loss check catches."""
    out, results = run(tmp_path, "nan", zero)
    for step in range(worker.NAN_STEPS):
        poisoned = step in worker.POISONED
        assert results[step]["skipped"] == poisoned, step
        assert out["kept_state"][step] == poisoned, f"step {step}: weights, masters or Adam state"
        assert math.isfinite(results[step]["grad_norm"]) != poisoned, step
    # The run equals one that never saw the bad steps: Adam's step count did not advance.
    steps = tuple(s for s in range(worker.NAN_STEPS) if s not in worker.POISONED)
    weights, expected, _ = reference(megatron_world, dp=2, steps=steps)
    assert_matches([results[s] for s in steps], expected)
    assert max_diff(trained_weights(megatron_world, tmp_path / "run"), weights) < 1e-5


def test_checkpoint_resumes_exactly(tmp_path):
    out, results = run(tmp_path, "checkpoint", zero=2)
    assert all(r == results for r in out["resumed"])  # bitwise: same losses and grad norms
    assert out["same_weights"]  # weights, fp32 masters and Adam state (its step too)


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory):
    """ZeRO-2 at DP=2: 2 steps, the checkpoint, then 2 more steps (the uninterrupted run)."""
    workdir = tmp_path_factory.mktemp("zero2")
    _, results = run(workdir, "checkpoint", zero=2)
    return workdir / "run_ckpt", results


@pytest.fixture(scope="module")
def zero3_bf16_checkpoint(tmp_path_factory):
    """The same with ZeRO-3 and bf16 weights (fp32 masters), the 7B preset's engine."""
    workdir = tmp_path_factory.mktemp("zero3-bf16")
    run_torchrun(
        WORKER,
        2,
        "--scenario",
        "checkpoint",
        "--zero",
        "3",
        "--bf16",
        "--name",
        "run",
        "--workdir",
        str(workdir),
    )
    out = json.loads((workdir / "run.json").read_text())
    assert out["same_weights"] and out["resumed"] == out["ranks"]  # a bitwise resume in bf16 too
    return workdir / "run_ckpt", out["ranks"][0]


def all_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a dist-checkpoint, whole, by key (torch's own DCP reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(directory, directory.parent / f"{directory.name}.pt")
    return torch.load(directory.parent / f"{directory.name}.pt", weights_only=True)


def assert_resumes_the_same_run(tmp_path, checkpoint, uninterrupted, layout, rel):
    """Load ``checkpoint`` in ``layout``, save it again at once: every tensor (weights, fp32
    masters, Adam moments) and Adam's step are bitwise the same; training on gives the
    uninterrupted run's losses within ``rel``."""
    run_torchrun(
        WORKER,
        2,
        "--scenario",
        "resume",
        *layout,
        "--load",
        str(checkpoint),
        "--name",
        "run",
        "--workdir",
        str(tmp_path),
    )
    out = json.loads((tmp_path / "run.json").read_text())
    first, *others = out["ranks"]
    assert all(o == first for o in others)
    saved, resaved = all_tensors(checkpoint), all_tensors(tmp_path / "run_resaved")
    tensors = [k for k in saved if isinstance(saved[k], torch.Tensor)]
    assert {k.split(".")[2] for k in tensors if k.startswith("optimizer.")} == {
        "param",
        "exp_avg",
        "exp_avg_sq",
    }
    assert sum(not k.startswith("optimizer.") for k in tensors) > 10  # the model's weights
    for key in tensors:
        assert torch.equal(saved[key], resaved[key]), key
    commons = [
        torch.load(d / "common.pt", weights_only=True)
        for d in (checkpoint, tmp_path / "run_resaved")
    ]
    assert [{g["step"] for g in c["optimizer"]["optimizer"]["param_groups"]} for c in commons] == [
        {2.0},
        {2.0},
    ]
    for mine, ref in zip(first, uninterrupted, strict=True):
        assert not mine["skipped"]
        for key in LossTerms.KEYS:
            assert mine["losses"][key] == pytest.approx(ref["losses"][key], rel=rel), key
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=rel)


@pytest.mark.parametrize(
    "layout",
    [
        ["--zero", "3"],  # ZeRO-3, DP=2
        ["--zero", "1", "--tp", "2"],  # TP=2, DP=1
        ["--engine", "megatron", "--zero", "1"],  # Megatron's distributed optimizer, DP=2
        [
            "--engine",
            "megatron",
            "--zero",
            "1",
            "--pp",
            "2",
        ],  # Megatron, PP=2 (1F1B), plain optimizer
    ],
    ids=["zero3", "tp2", "megatron-dp2", "megatron-pp2"],
)
def test_checkpoint_reshards_to_other_layouts_and_engines(tmp_path, zero2_checkpoint, layout):
    """A ZeRO-2 DP=2 checkpoint elsewhere; losses within 1e-6 (every layout keeps to plain
    AdamW within 1e-5)."""
    assert_resumes_the_same_run(tmp_path, *zero2_checkpoint, layout, rel=1e-6)


@pytest.mark.parametrize(
    "layout",
    [
        ["--engine", "megatron", "--zero", "1"],  # distributed optimizer, bf16 weights
        ["--engine", "megatron", "--zero", "1", "--pp", "2"],  # Megatron's Float16 optimizer
    ],
    ids=["megatron-dp2", "megatron-pp2"],
)
def test_bf16_checkpoint_moves_between_engines(tmp_path, zero3_bf16_checkpoint, layout):
    """bf16 weights, fp32 masters (the GPU dtype, run here on CPU): DeepSpeed ZeRO-3 to the
    Megatron engine. Losses within bf16's reach (measured 2.5e-5 apart at the second step)."""
    assert_resumes_the_same_run(tmp_path, *zero3_bf16_checkpoint, [*layout, "--bf16"], rel=1e-3)
