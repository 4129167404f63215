"""Generation: the KV cache against full recomputation through the training forward, the
reverse process against closed forms, batching, TP=2 vs TP=1, the CLI and its errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from checkpoints.layout import find_checkpoint
from checkpoints.sharded import load_model_weights
from data_prep.vae import ConvVAE, VAEConfig, save_vae
from kernels.attention import dense_mask
from kernels.kv_cache import KVCache
from megatron_transfusion.batch import ImageSegment, SpecialTokens, TextSegment, pack_documents
from megatron_transfusion.config import load_config
from megatron_transfusion.diffusion.sampler import ReverseProcess
from megatron_transfusion.diffusion.schedule import CosineSchedule
from megatron_transfusion.inference.generate import Generator, SamplingConfig, _top_p
from megatron_transfusion.inference.load import load_image_vae, load_tokenizer
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import seed_everything
from tests.conftest import ROOT
from tests.test_trainer import overrides, run

SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real two-step training run (tiny model on small prepared data) with a checkpoint."""
    from tests.test_loader import prepare

    data_root = tmp_path_factory.mktemp("generation-data")
    prepare(data_root)
    run_root = tmp_path_factory.mktemp("generation-run")
    run(
        1,
        overrides(
            data_root,
            run_root,
            2,
            *heldout(data_root),
            "eval.interval=2",
            "eval.batches=1",
            "eval.captions=3",
        ),
    )
    return run_root / "tiny"


def heldout(data_root):
    """The training data doubles as held-out data here: what matters is the same numbers."""
    sources = [
        {"name": "text", "kind": "text", "path": str(data_root / "text")},
        {"name": "images", "kind": "image_caption", "path": str(data_root / "img")},
    ]
    return [f"eval.sources={json.dumps(sources)}"]


@pytest.fixture(scope="module")
def model_and_cfg(trained_run, megatron_world):
    cfg = load_config(str(trained_run / "config.yaml"), ["model.attention_backend=sdpa"])
    seed_everything(0)
    (model,) = build_model(cfg, megatron_world)
    load_model_weights([model], find_checkpoint(trained_run))
    return model.eval(), cfg


def latent(cfg, seed):
    shape = (cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def generate(model, cfg, prompts, force_image, seeds=None, **sampling):
    return Generator(model, cfg, SPECIAL, SamplingConfig(**sampling)).generate(
        prompts, force_image, seeds=seeds
    )


def assert_same(results, expected, rtol=1e-5):
    for got_row, want_row in zip(results, expected, strict=True):
        assert len(got_row) == len(want_row)
        for got, want in zip(got_row, want_row):
            assert type(got) is type(want)
            if isinstance(got, TextSegment):
                assert got.tokens == want.tokens
            else:
                scale = want.latent.abs().max()
                assert (got.latent - want.latent).abs().max() <= rtol * scale


@pytest.mark.parametrize("sampler, guidance", [("ddpm", 3.0), ("ddim", 1.0)])
def test_cached_generation_equals_full_recomputation(model_and_cfg, sampler, guidance):
    """Prompts of different lengths, a prompt image, text after the generated image."""
    model, cfg = model_and_cfg
    prompts = [
        [TextSegment([1, 40, 41, 42, 43, 44])],
        [TextSegment([1, 50]), ImageSegment(latent(cfg, 0)), TextSegment([51, 52])],
        [TextSegment([1])],
    ]
    common = dict(
        max_new_tokens=4, diffusion_steps=5, sampler=sampler, guidance_scale=guidance, max_images=1
    )
    cached = generate(model, cfg, prompts, True, use_cache=True, **common)
    full = generate(model, cfg, prompts, True, use_cache=False, **common)
    assert [type(s) for s in cached[0]] == [ImageSegment, TextSegment]  # image, then LM mode again
    assert_same(cached, full)


def test_captioning_cached_equals_full_recomputation(model_and_cfg):
    model, cfg = model_and_cfg
    prompts = [[TextSegment([1]), ImageSegment(latent(cfg, s))] for s in (1, 2)]
    prompts[1] = [TextSegment([1, 70]), ImageSegment(latent(cfg, 3)), *prompts[1][:]]  # two images
    common = dict(max_new_tokens=6, temperature=0.9, top_p=0.8)
    assert_same(
        generate(model, cfg, prompts, False, use_cache=True, **common),
        generate(model, cfg, prompts, False, use_cache=False, **common),
    )


def test_text_mode_draws_an_image_whenever_the_model_emits_boi(model_and_cfg):
    """Continuing a document: with only EOS and BOI left to sample (a 4-id vocabulary),
    every BOI the model samples starts an image, EOI follows it, LM mode continues, up to
    ``max_images``; the cache equals full recomputation through all of it."""
    model, cfg = model_and_cfg
    prompts = [[TextSegment([1, 40, 41]), ImageSegment(latent(cfg, 5)), TextSegment([42])]] * 6
    common = dict(max_new_tokens=5, temperature=1.0, diffusion_steps=3, max_images=2)
    results = {}
    for use_cache in (True, False):
        generator = Generator(
            model, cfg, SPECIAL, SamplingConfig(use_cache=use_cache, **common), vocab_size=4
        )
        results[use_cache] = generator.generate(prompts, False, seeds=list(range(6)))
    assert_same(results[True], results[False])
    shapes = set()
    for row in results[True]:
        kinds = [type(s).__name__ for s in row]
        shapes.add(sum(k == "ImageSegment" for k in kinds))
        # Each image follows a sampled BOI token and is followed by EOI (written by the
        # generator into the document; generated text holds only sampled ids).
        for segment in row:
            if isinstance(segment, TextSegment):
                assert set(segment.tokens) <= {SPECIAL.eos}
        assert sum(k == "ImageSegment" for k in kinds) <= 2
    assert 2 in shapes  # some rows drew two images


def test_ids_the_tokenizer_lacks_are_never_sampled(model_and_cfg):
    """The model's vocabulary may be larger than the tokenizer's (the 0.16B preset's 32k
    beside the rehearsal's 9k tokenizer; here 512 beside 400): ids past the tokenizer's
    decode to nothing, and an early checkpoint's captions came out empty."""
    model, cfg = model_and_cfg
    prompts = [[TextSegment([1]), ImageSegment(latent(cfg, s))] for s in range(4)]
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, max_images=0)

    def sampled(**limit):
        results = Generator(model, cfg, SPECIAL, sampling, **limit).generate(prompts)
        return [t for row in results for s in row if isinstance(s, TextSegment) for t in s.tokens]

    assert max(sampled()) >= 64  # the model's own vocabulary reaches past the limit below
    assert max(sampled(vocab_size=64)) < 64


def test_a_prompt_generates_the_same_alone_or_batched(model_and_cfg):
    model, cfg = model_and_cfg
    short, long = [TextSegment([1, 9])], [TextSegment([1, *range(20, 40)])]
    common = dict(max_new_tokens=3, diffusion_steps=3, temperature=1.0, top_p=0.95)
    batched = generate(model, cfg, [short, long], True, seeds=[5, 6], **common)
    alone = generate(model, cfg, [short], True, seeds=[5], **common) + generate(
        model, cfg, [long], True, seeds=[6], **common
    )
    assert_same(batched, alone)


def test_cache_mask_equals_the_training_mask():
    """A document written into the cache in three pieces gets, for each piece's queries,
    exactly the rows of the training mask of the whole packed document."""
    document = [TextSegment([1, 5, 6]), ImageSegment(torch.zeros(2, 2, 2)), TextSegment([7, 8])]
    batch = pack_documents([[document]], 12, 4, (2, 2, 2), SPECIAL)  # 3 + 6 + 2 = 11 used, 1 pad
    reference = dense_mask(batch)[0, 0]
    cache = KVCache(rows=1, capacity=12, device=torch.device("cpu"))
    for start, stop in [(0, 4), (4, 9), (9, 12)]:  # text + BOI | image + EOI | text + pad
        slots = torch.arange(start, stop)[None]
        view = cache.view(
            torch.tensor([0]),
            slots,
            batch.document_ids[:, start:stop],
            batch.image_ids[:, start:stop],
            torch.zeros((1, stop - start), dtype=torch.bool),
        )
        assert torch.equal(view.mask.dense[0, 0], reference[start:stop, :stop])


def test_reverse_process_matches_the_posterior_and_recovers_a_known_image():
    """With the exact ε of a point mass x0: the last step returns x0 for both samplers, DDIM
    keeps ε, and one DDPM step from x_t ~ q(x_t|x0) lands on q(x_s|x0)'s mean and variance."""
    schedule = CosineSchedule.create()
    abar = schedule.alphas_cumprod
    x0 = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def oracle(x, t):
        return (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()

    for sampler in ("ddpm", "ddim"):
        process = ReverseProcess(schedule, steps=7, sampler=sampler)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, generator=g, dtype=torch.float64)
        times = process.timesteps()
        assert times[-1] == 0 and len(set(times)) == 7
        for i, t in enumerate(times):
            noise = torch.randn(2, generator=g, dtype=torch.float64)
            x = process.step(x, oracle(x, t), t, times[i + 1] if i + 1 < len(times) else -1, noise)
        torch.testing.assert_close(x, x0, rtol=0, atol=1e-9)

    t, s = 600, 450
    eps = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t = abar[t].sqrt() * 0.5 + (1 - abar[t]).sqrt() * eps
    ddim = ReverseProcess(schedule, sampler="ddim").step(x_t, eps, t, s, torch.zeros_like(eps))
    torch.testing.assert_close(ddim, abar[s].sqrt() * 0.5 + (1 - abar[s]).sqrt() * eps)
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_s = ReverseProcess(schedule).step(x_t, eps, t, s, noise)
    assert abs(float(x_s.mean()) - float(abar[s].sqrt() * 0.5)) < 0.01
    assert abs(float(x_s.var()) - float(1 - abar[s])) < 0.01


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert torch.equal(_top_p(probs, 0.7), torch.tensor([[0.0, 0.5, 0.0, 0.3]]))
    assert torch.equal(_top_p(probs, 0.5), torch.tensor([[0.0, 0.5, 0.0, 0.0]]))
    assert torch.equal(_top_p(probs, 1.0), probs)


def test_too_long_prompt_is_refused(model_and_cfg):
    model, cfg = model_and_cfg
    long = [TextSegment([1] * (cfg.model.max_sequence_length - 5))]
    with pytest.raises(ValueError, match=r"prompt 0 needs .* max_sequence_length is 128"):
        generate(model, cfg, [long], True)


def test_bad_checkpoint_path_and_mismatched_vae(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        find_checkpoint(tmp_path)
    cfg = load_config(str(trained_run / "config.yaml"))
    assert load_tokenizer(cfg).special == SPECIAL
    torch.manual_seed(123)  # same architecture, other weights
    save_vae(ConvVAE(VAEConfig()), VAEConfig(), 0.5, tmp_path / "other")
    with pytest.raises(ValueError, match="is not the VAE the training latents were made with"):
        load_image_vae(cfg, tmp_path / "other")
    save_vae(
        ConvVAE(VAEConfig(latent_channels=4)),
        VAEConfig(latent_channels=4),
        0.5,
        tmp_path / "narrow",
    )
    with pytest.raises(ValueError, match="has 4 latent channels, expected 8"):
        load_image_vae(cfg, tmp_path / "narrow")


def run_worker(nproc, checkpoint, out):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "tests/distributed/generation_worker.py"),
        str(checkpoint),
        str(out),
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, result.stderr[-6000:]
    with safe_open(str(out), "pt") as f:
        # safe_open handles have keys() but are not iterable, so no `k in f`.
        return json.loads(f.metadata()["texts"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_tp2_and_consolidated_generation_equal_tp1(trained_run, tmp_path):
    """Same checkpoint: TP=2 over gloo, and the exported safetensors file, vs TP=1."""
    checkpoint = find_checkpoint(trained_run)
    texts, latents = run_worker(1, checkpoint, tmp_path / "tp1.safetensors")
    exported = tmp_path / "model.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from checkpoints.cli import main; main()",
            "export",
            str(checkpoint),
            "--out",
            str(exported),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    for nproc, source in [(2, checkpoint), (1, exported)]:
        other_texts, other_latents = run_worker(
            nproc, source, tmp_path / f"other{nproc}.safetensors"
        )
        assert other_texts == texts
        assert latents.keys() == other_latents.keys() and len(latents) == 3
        for key, value in latents.items():
            assert (other_latents[key] - value).abs().max() <= 1e-4 * value.abs().max(), key


def run_cli(module: str, function: str, *args):
    """A console script's main in a fresh process, as a user runs it."""
    code = f"from {module} import {function}; {function}()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
    )


def mtf_generate(*args):
    return run_cli("megatron_transfusion.inference.cli", "generate_main", *args)


def test_generate_cli_writes_images_grid_and_texts(trained_run, tmp_path):
    image = tmp_path / "input.png"
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(image)
    out = tmp_path / "samples"
    result = mtf_generate(
        trained_run, "--prompt", "a red circle", "--prompt", "blue", "--steps", "3", "--out", out
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "blue"]
    assert records[0]["output"].startswith("<image:sample_0000_0.png>")
    assert np.asarray(Image.open(out / "sample_0001_0.png")).shape == (32, 32, 3)
    assert np.asarray(Image.open(out / "grid.png")).shape == (32, 64, 3)

    result = mtf_generate(
        trained_run,
        "--mode",
        "text",
        "--prompt",
        f"<image:{image}>",
        "--max-new-tokens",
        "4",
        "--max-images",
        "0",
        "--out",
        tmp_path / "captions",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (record,) = [
        json.loads(line)
        for line in (tmp_path / "captions" / "samples.jsonl").read_text().splitlines()
    ]
    assert record["output"] and "<image:" not in record["output"]  # a caption, no image


def test_generate_cli_writes_genevals_layout(trained_run, tmp_path):
    """What GenEval's scorer (its evaluation/evaluate_images.py) walks: numbered folders,
    each with metadata.jsonl (its prompt's line, read with json.load) and samples/<digits>.png,
    4 samples per prompt from consecutive seeds."""
    circle = {"class": "circle", "count": 1}
    blue_square = {"class": "square", "count": 1, "color": "blue"}
    metadata = [
        {"tag": "single_object", "include": [circle], "prompt": "a circle"},
        {"tag": "colors", "include": [blue_square], "prompt": "a blue square"},
    ]
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in metadata))
    out = tmp_path / "geneval"
    flags = ["--steps", "2", "--seed", "7", "--batch-size", "3", "--out", out]
    result = mtf_generate(trained_run, "--geneval", prompts, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    found = {}
    for folder in sorted(os.listdir(out)):  # GenEval's walk, as it is written there
        if not (out / folder).is_dir() or not folder.isdigit():
            continue
        with open(out / folder / "metadata.jsonl") as f:
            meta = json.load(f)
        names = os.listdir(out / folder / "samples")
        found[folder] = meta, sorted(n for n in names if re.match(r"\d+\.png", n))
    samples = ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert found == {"00000": (metadata[0], samples), "00001": (metadata[1], samples)}
    assert Image.open(out / "00001" / "samples" / "0003.png").size == (32, 32)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [
        (m["prompt"], 7 + 4 * i + k) for i, m in enumerate(metadata) for k in range(4)
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x"], "is not a checkpoint"),
        (["--prompt", " ".join(["word"] * 200)], "max_sequence_length is 128"),
        (["--prompt", "<image:/no/such.png>"], "prompt image '/no/such.png' does not exist"),
        (["--geneval", "prompts.jsonl", "--prompt", "x"], "--geneval takes its prompts from"),
    ],
)
def test_generate_cli_errors_are_one_line(trained_run, tmp_path, args, message):
    checkpoint = tmp_path if message == "is not a checkpoint" else trained_run
    result = mtf_generate(checkpoint, *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and message in result.stderr


def mtf_evaluate(*args):
    return run_cli("megatron_transfusion.evaluation.cli", "main", *args)


def test_training_evaluation_equals_mtf_evaluate(trained_run, tmp_path, fid_weights, clip_model):
    """The trainer's eval hook (engine forward through Megatron's schedule, DDP-wrapped
    model) and mtf-evaluate on the saved checkpoint score the same batches alike; with
    local weights given, mtf-evaluate adds FID, Inception score and CLIP score of the drawn
    images."""
    (during,) = [
        json.loads(line) for line in (trained_run / "logs" / "eval.jsonl").read_text().splitlines()
    ]
    assert during["step"] == 2
    out = tmp_path / "eval.json"
    result = mtf_evaluate(
        trained_run,
        "eval.images=20",  # two per Inception score split
        "eval.diffusion_steps=2",
        f"eval.inception_weights={fid_weights}",
        f"eval.clip_model={clip_model}",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    after = json.loads(out.read_text())
    assert after["step"] == 2
    metrics = after["metrics"]
    for key in (
        "heldout/text/loss",
        "heldout/text/lm_loss",
        "heldout/text/perplexity",
        "heldout/images/loss",
        "heldout/images/lm_loss",
        "heldout/images/diffusion_loss",
        "heldout/images/perplexity",
        "caption_cider",
        "caption_bleu4",
        "constant_caption_cider",
    ):
        assert metrics[key] == pytest.approx(during[key], rel=1e-5), key
    assert 0 <= metrics["caption_match"] <= 1 and metrics["images_evaluated"] == 20
    assert metrics["fid"] > 0 and 0 <= metrics["clip_score"] <= 100 and after["skipped"] == {}
    assert 1 < metrics["inception_score"] <= 2  # exp(KL) of a split is at most its size
    assert Image.open(out.with_suffix(".png")).size == (20 * 32, 2 * 32)  # guided, unconditional


def test_evaluate_refuses_missing_fid_weights_in_one_line(trained_run, tmp_path):
    result = mtf_evaluate(
        trained_run, "eval.images=3", f"eval.inception_weights={tmp_path / 'missing.pth'}"
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: eval.inception_weights") and "does not exist" in line
