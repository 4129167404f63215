"""Issue 16: a run starts from another's weights only (``checkpoint.init_from``): step 0,
fresh optimizer state, fresh data order, in any layout and engine; its first loss is the
source model's loss on the same batch; from a step checkpoint (also one kept outside its
run directory), an export or an import-hf checkpoint. Resuming wins over it; weights-only
checkpoints, wrong paths, other model sizes, damaged sources (unless --no-verify) and data
made by another tokenizer or VAE are refused in one ``error:`` line; patch layers of
another kind start fresh and are reported."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from megatron_transfusion.config import sources_override
from tests.conftest import ROOT
from tests.test_loader import prepare
from tests.test_reliability import assert_one_line_error, cli
from tests.test_trainer import TRAIN, losses, overrides, run

CHECKPOINT_TOOL = [sys.executable, "-m", "checkpoints.cli"]
SOURCE_STEPS = 4


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("init-from-data")
    prepare(root)
    return root


@pytest.fixture(scope="module")
def source(data_root, tmp_path_factory):
    """Run A: the megatron engine, one process, a few steps, so its weights are not the
    initial ones. Its step-1 loss is a fresh model's loss on the first batch."""
    root = tmp_path_factory.mktemp("source")
    run(1, overrides(data_root, root, SOURCE_STEPS))
    return root / "tiny"


@pytest.fixture(scope="module")
def reference(data_root, source, tmp_path_factory):
    """Run C: one step from A's weights in A's own layout and engine: A's model's loss on
    the first batch of a fresh data order. Returns (run root, output)."""
    root = tmp_path_factory.mktemp("reference")
    output = run(1, overrides(data_root, root, 1, f"checkpoint.init_from={source}"))
    return root, output


def metrics(run_root):
    path = run_root / "tiny" / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_dir(run_root, step):
    return run_root / "tiny" / "checkpoints" / f"step_{step:08d}"


def optimizer_state(checkpoint):
    """Adam's step in each param group, and {parameter key: (exp_avg, exp_avg_sq)}."""
    import torch.distributed.checkpoint as dcp

    from checkpoints.sharded import read_metadata

    engine = checkpoint / "engine"
    common = torch.load(engine / "common.pt", map_location="cpu", weights_only=True)
    steps = [group["step"] for group in common["optimizer"]["optimizer"]["param_groups"]]
    stored = read_metadata(engine).state_dict_metadata
    keys = [k for k in stored if k.startswith("optimizer.state.exp_avg")]
    tensors = {k: torch.empty(tuple(stored[k].size)) for k in keys}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": by design here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, checkpoint_id=str(engine), no_dist=True)
    prefix, prefix_sq = "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."
    moments = {
        k.removeprefix(prefix): (v, tensors[prefix_sq + k.removeprefix(prefix)])
        for k, v in tensors.items()
        if k.startswith(prefix)
    }
    return steps, moments


def assert_fresh_adam_after_one_step(checkpoint, beta1=0.9, beta2=0.95):
    """One AdamW step from zero moments leaves m = (1-β1)·g and v = (1-β2)·g², so
    m²/v = (1-β1)²/(1-β2) in every element a gradient reached; moments carried over from
    a run of several steps do not satisfy it (their ratios spread over (0, 0.64))."""
    steps, moments = optimizer_state(checkpoint)
    assert steps and all(s == 1 for s in steps), steps
    assert len(moments) > 10
    for key, (m, v) in moments.items():
        reached = v > 0
        assert reached.any(), key
        ratio = m[reached] ** 2 / v[reached]
        expected = (1 - beta1) ** 2 / (1 - beta2)
        assert torch.allclose(ratio, torch.full_like(ratio, expected), rtol=1e-4), key


OTHER_LAYOUTS = [
    # Another engine and another layout: the acceptance.
    pytest.param(
        ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.tensor_parallel=2"],
        id="deepspeed-zero2-tp2",
    ),
    # The same engine, pipeline stages: each loads only its layers.
    pytest.param(["parallel.pipeline_parallel=2"], id="megatron-pp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_init_from_in_another_layout_and_engine_starts_at_step_0_with_the_source_loss(
    data_root, source, reference, tmp_path, layout
):
    """The acceptance of issue 16. A (megatron, TP=1, 1 process) -> B (DeepSpeed ZeRO-2,
    TP=2, 2 processes). B's first logged loss (the forward before the first update) is
    A's model's loss on that batch (run C, A's own layout) and not a fresh model's (A's
    own step 1, same seed, same batch). DP stays 1: the diffusion noise is drawn per
    data-parallel rank, and the LM loss of a caption after an image depends on the noised
    image, so only at the same DP size can the losses be compared exactly (at DP=2 the
    global batch's rows are the same, its noise is not)."""
    output = run(2, overrides(data_root, tmp_path, 1, *layout, f"checkpoint.init_from={source}"))
    saved = source / "checkpoints" / f"step_{SOURCE_STEPS:08d}"
    assert f"initialised from {saved} (its step {SOURCE_STEPS}), weights only" in output
    assert "initialised fresh" not in output and "resumed from" not in output

    ours, theirs, fresh = losses(tmp_path), losses(reference[0]), losses(source.parent)
    assert sorted(ours) == [1]  # step 0 -> 1, not A's 4 -> 5
    assert ours[1] == pytest.approx(theirs[1], rel=1e-5)  # total, LM and diffusion loss
    assert abs(ours[1][0] - fresh[1][0]) > 0.1 * fresh[1][0]  # not a fresh model's loss
    # The schedule starts over too: step 1's learning rate is the warmup's first.
    assert metrics(tmp_path)[0]["lr"] == metrics(source.parent)[0]["lr"]

    trainer = json.loads((step_dir(tmp_path, 1) / "trainer.json").read_text())
    assert trainer["step"] == 1 and trainer["tokens"] == 512
    reference_trainer = json.loads((step_dir(reference[0], 1) / "trainer.json").read_text())
    assert trainer["loader"] == reference_trainer["loader"]  # a fresh data order
    assert trainer["made_with"] == reference_trainer["made_with"]
    assert_fresh_adam_after_one_step(step_dir(tmp_path, 1))


def test_the_source_keeps_its_optimizer_state_and_the_reference_starts_fresh(source, reference):
    """The check above tells fresh moments from carried ones: A's do not pass it; C's
    (init_from in A's own layout and engine) do."""
    steps, _ = optimizer_state(source / "checkpoints" / f"step_{SOURCE_STEPS:08d}")
    assert all(s == SOURCE_STEPS for s in steps)
    with pytest.raises(AssertionError):
        assert_fresh_adam_after_one_step(source / "checkpoints" / f"step_{SOURCE_STEPS:08d}")
    assert_fresh_adam_after_one_step(step_dir(reference[0], 1))
    assert "initialised from" in reference[1] and "resumed from" not in reference[1]


def test_a_run_with_its_own_checkpoint_resumes_it_instead(data_root, source, reference, tmp_path):
    """init_from is for the first start; a requeued run continues from its own checkpoint."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    output = run(1, overrides(data_root, tmp_path, 2, f"checkpoint.init_from={source}"))
    assert f"resumed from {step_dir(tmp_path, 1)} at step 1" in output
    assert "initialised from" not in output
    resumed = losses(tmp_path)
    assert sorted(resumed) == [1, 2] and resumed[1] == losses(reference[0])[1]


@pytest.mark.parametrize("kind", ["safetensors", pytest.param("hf", marks=pytest.mark.slow)])
def test_init_from_an_export_gives_the_same_first_loss(
    data_root, source, reference, tmp_path, kind
):
    """An exported model (one .safetensors, or a Hugging Face directory with the patch
    layers beside it) starts a run exactly as its checkpoint does."""
    out = tmp_path / ("model.safetensors" if kind == "safetensors" else "hf")
    result = subprocess.run(
        [*CHECKPOINT_TOOL, "export", str(source), "--out", str(out), "--format", kind],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli(
        TRAIN, "--config", "tiny", *overrides(data_root, tmp_path, 1, f"checkpoint.init_from={out}")
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"initialised from {out} (its step {SOURCE_STEPS}), weights only" in result.stdout
    assert "initialised fresh" not in result.stdout
    assert losses(tmp_path)[1] == pytest.approx(losses(reference[0])[1], rel=1e-5)


def test_init_from_checkpoints_kept_outside_their_run_directory(
    data_root, source, reference, tmp_path
):
    """A run with checkpoint.directory elsewhere: its step directories have no config.yaml
    two levels up, which starting from the weights does not need."""
    elsewhere = tmp_path / "scratch" / "checkpoints"
    shutil.copytree(source / "checkpoints", elsewhere)
    args = overrides(data_root, tmp_path, 1, f"checkpoint.init_from={elsewhere}")
    result = cli(TRAIN, "--config", "tiny", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"initialised from {elsewhere / f'step_{SOURCE_STEPS:08d}'}" in result.stdout
    assert losses(tmp_path)[1] == pytest.approx(losses(reference[0])[1], rel=1e-5)


def test_init_from_verifies_the_source_unless_told_not_to(data_root, source, reference, tmp_path):
    """A source file that does not match its manifest is refused, and the --no-verify the
    error offers is honoured for init_from as for --resume (here the manifest is what is
    wrong, so the weights load and give the source's loss)."""
    copy = tmp_path / "copy"
    shutil.copytree(source.parent, copy)
    checkpoint = copy / "tiny" / "checkpoints" / f"step_{SOURCE_STEPS:08d}"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["engine/__0_0.distcp"]["sha256"] = "0" * 64
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    args = overrides(data_root, tmp_path, 1, f"checkpoint.init_from={checkpoint}")
    result = cli(TRAIN, "--config", "tiny", *args)
    assert_one_line_error(result, "__0_0.distcp' does not match its SHA-256", "--no-verify")
    result = cli(TRAIN, "--config", "tiny", *args, "--no-verify")
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(tmp_path)[1] == pytest.approx(losses(reference[0])[1], rel=1e-5)


def test_patch_layers_of_another_kind_start_fresh_and_are_reported(data_root, source, tmp_path):
    """A U-Net patch model from a linear-patch checkpoint: the transformer loads, the patch
    layers stay as initialised and the log says so."""
    result = cli(
        TRAIN,
        "--config",
        "tiny",
        *overrides(
            data_root, tmp_path, 1, "model.patch_layer=unet", f"checkpoint.init_from={source}"
        ),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("initialised from"))
    assert line.startswith(f"initialised from {source / 'checkpoints'}")
    assert "; initialised fresh: patch_in (" in line and "), patch_out (" in line, line
    assert "decoder" not in line.split("initialised fresh")[1]


# ---- Refusals: one error line, exit 2 ---------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """``mtf-checkpoint import-hf`` of a tiny random Hugging Face Llama: a weights-only
    checkpoint."""
    from tests.hf_models import save_tiny_llama

    root = tmp_path_factory.mktemp("imported")
    save_tiny_llama(root / "llama", vocab_size=512)  # the data's tokenizer has 400 + specials
    result = subprocess.run(
        [*CHECKPOINT_TOOL, "import-hf", str(root / "llama"), "--out", str(root / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = root / "run" / "checkpoints" / "step_00000000"
    assert json.loads((checkpoint / "trainer.json").read_text())["weights_only"] is True
    return checkpoint


def test_a_run_starts_from_an_imported_llama_as_the_refusal_advises(data_root, imported, tmp_path):
    """What the refusal below points to: checkpoint.init_from=<the imported checkpoint>,
    the model section made the Llama's (hf_overrides, as import-hf did)."""
    from checkpoints.huggingface import HFLlama
    from checkpoints.import_hf import hf_overrides

    llama = hf_overrides(HFLlama(imported.parents[2] / "llama"))
    args = overrides(data_root, tmp_path, 1, *llama, f"checkpoint.init_from={imported}")
    result = cli(TRAIN, "--config", "tiny", *args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"initialised from {imported} (its step 0), weights only" in result.stdout
    # The import's patch layers are as initialised, never trained: said so.
    assert "initialised fresh: patch_in (6 tensors), patch_out (2 tensors)" in result.stdout
    # A Llama knows no tokenizer here: said, not refused.
    assert "does not say which tokenizer it was trained with" in result.stderr
    assert sorted(losses(tmp_path)) == [1]


@pytest.mark.parametrize("how", ["--resume", "checkpoint.load"])
def test_resuming_a_weights_only_checkpoint_is_refused(data_root, imported, tmp_path, how):
    args = overrides(data_root, tmp_path, 1)
    args += ["--resume", str(imported)] if how == "--resume" else [f"checkpoint.load={imported}"]
    result = cli(TRAIN, "--config", "tiny", *args)
    assert_one_line_error(
        result, f"'{imported}' holds model weights only", f"checkpoint.init_from={imported}"
    )
    assert not (tmp_path / "tiny" / "logs" / "metrics.jsonl").exists()


def test_init_from_a_missing_path_is_refused(data_root, tmp_path):
    missing = tmp_path / "no-such-run"
    result = cli(
        TRAIN,
        "--config",
        "tiny",
        *overrides(data_root, tmp_path, 1, f"checkpoint.init_from={missing}"),
    )
    assert_one_line_error(result, f"checkpoint.init_from: no such checkpoint: {missing}")


def test_init_from_a_model_of_another_size_is_refused(data_root, source, tmp_path):
    result = cli(
        TRAIN,
        "--config",
        "tiny",
        *overrides(
            data_root, tmp_path, 1, "model.hidden_size=64", f"checkpoint.init_from={source}"
        ),
    )
    assert_one_line_error(
        result, "embedding.word_embeddings.weight", "(512, 128)", "(512, 64)", "another model size"
    )


def data_made_with_another(data_root, tmp_path, what):
    """Copies of both prepared datasets as if made with another tokenizer or VAE (their
    manifests agree with each other, not with the source run's)."""
    made = {}
    for name in ("text", "img"):
        shutil.copytree(data_root / name, tmp_path / name)
        manifest_path = tmp_path / name / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        if what in manifest:
            manifest[what] = {**manifest[what], "path": f"other-{what}", "sha256": "f" * 64}
        manifest_path.write_text(json.dumps(manifest))
        made[name] = tmp_path / name
    return [sources_override(made["text"], made["img"])]


@pytest.mark.parametrize("what", ["tokenizer", pytest.param("vae", marks=pytest.mark.slow)])
def test_init_from_weights_trained_on_other_data_is_refused(data_root, source, tmp_path, what):
    other = data_made_with_another(data_root, tmp_path, what)
    args = overrides(data_root, tmp_path, 1, f"checkpoint.init_from={source}", *other)
    result = cli(TRAIN, "--config", "tiny", *args)
    assert_one_line_error(result, f"was trained with the {what}", f"other-{what}")


def test_resuming_on_data_made_by_another_tokenizer_is_refused(
    data_root,
    reference,
    tmp_path,
):
    shutil.copytree(reference[0], tmp_path / "run")
    other = data_made_with_another(data_root, tmp_path, "tokenizer")
    result = cli(TRAIN, "--config", "tiny", *overrides(data_root, tmp_path / "run", 2, *other))
    assert_one_line_error(
        result, str(step_dir(tmp_path / "run", 1)), "was trained with the tokenizer"
    )
    assert sorted(losses(tmp_path / "run")) == [1]  # nothing trained
