"""Learning quality: does the trained model draw what its caption says, and caption what it sees?

One command, the documented tools only (no private shortcuts):

    python -m benchmarks.learning_quality --out runs/quality

1. makes the compositional shapes set (``data_prep.shapes``) as a user would bring it: a
   webdataset tar of PNG + caption, with some attribute combinations held out of training;
2. ``mtf-prepare-builtin`` (tokenizer and text stream), ``mtf-train-vae`` on the training
   images, ``mtf-prepare-data shard`` + ``merge``;
3. trains the ``tiny`` preset with the project's torchrun launcher
   (``megatron_transfusion.launch``);
4. ``mtf-generate`` draws every test caption (text -> image) and captions every test image
   (image -> text); the images are scored by construction, the captions by parsing them.

Prints per-attribute accuracy on seen and held-out single-object combinations, two-object
scenes, and exact captions; writes everything to ``<out>/results.json``. ``--curve`` also
scores each saved checkpoint (accuracy vs training time). Extra arguments are config overrides
for training, so one switch at a time can be compared on the same budget.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import layout
from data_prep.images import encode_png
from data_prep.shapes import (
    Scene,
    Split,
    make_split,
    pair_scenes,
    parse_caption,
    render,
    score_samples,
    single_scenes,
)

IMAGE_SIZE = 32
HELD_OUT_FRACTION = 1 / 6
SPLIT_SEED = 0
VENV_BIN = Path(sys.executable).parent
# The benchmark's own settings on top of the tiny preset, pinned so that tuning the preset for
# the demo does not move the benchmark: a quarter of the tokens from the built-in text source
# (the model stays a language model while it learns the images), and the learning rate the
# results in benchmarks/README.md were measured with (the mix and the optimizer apart: the
# editing benchmark fine-tunes on its own mix with these optimizer settings).
MIX_SETTINGS = (
    "data.sources.0.weight=0.25",  # the preset's text source
    "data.sources.1.weight=0.75",  # its image source, the benchmark's shapes below
)
OPTIMIZER_SETTINGS = (
    "optimizer.lr=1e-3",
    "optimizer.min_lr=1e-4",
    "diffusion.loss_weighting=min_snr",
)
RUN_NAME = "model"  # the trained run: <out>/model


def _run(command: list[str], log: Path) -> float:
    """Run a documented command, its output to ``log``; returns its wall time."""
    started = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(
            f"{' '.join(command[:3])} ... failed ({result.returncode}); see {log}:\n"
            + "\n".join(tail)
        )
    return time.perf_counter() - started


def _tool(name: str) -> str:
    return str(VENV_BIN / name)


# ---------------------------------------------------------------------------------------------
# The data set


def scene_splits(split_seed: int = SPLIT_SEED) -> tuple[Split[Scene], Split[Scene]]:
    """The one-object and the two-object scenes, each with its held-out combinations."""
    return (
        make_split(single_scenes(), HELD_OUT_FRACTION, split_seed),
        make_split(pair_scenes(), HELD_OUT_FRACTION, split_seed),
    )


def make_inputs(
    out: Path, train_samples: int, pair_fraction: float, seed: int, split_seed: int = SPLIT_SEED
) -> dict[str, list[Scene]]:
    """Training tar (seen combinations only) and the test scenes of each kind."""
    singles, pairs = scene_splits(split_seed)
    rng = random.Random(seed)
    (out / "train").mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "train" / "shapes-000000.tar", "w") as tar:
        for i in range(train_samples):
            scene = rng.choice(pairs.seen if rng.random() < pair_fraction else singles.seen)
            for suffix, data in (
                (".png", encode_png(render(scene, IMAGE_SIZE, rng))),
                (".txt", scene.caption(rng.random() < 0.5).encode()),
            ):
                info = tarfile.TarInfo(f"{i:07d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return test_scenes(split_seed)


def test_scenes(split_seed: int = SPLIT_SEED) -> dict[str, list[Scene]]:
    """The scenes of each test kind: one and two objects, seen in training or held out."""
    singles, pairs = scene_splits(split_seed)
    return {
        "seen": list(singles.seen),
        "held_out": list(singles.held_out),
        "pairs_seen": list(pairs.seen),
        "pairs_held_out": list(pairs.held_out),
    }


def test_cases(tests: dict[str, list], per_kind: int, seed: int) -> dict[str, list]:
    """``per_kind`` cases (scenes, or edits) of each kind, cycling through its cases in a
    seeded order."""
    rng = random.Random(seed + 1)
    cases = {}
    for kind, scenes in tests.items():
        order = rng.sample(scenes, len(scenes))
        cases[kind] = [order[i % len(order)] for i in range(per_kind)]
    return cases


# ---------------------------------------------------------------------------------------------
# Scoring


def _accuracy(rows: list[dict[str, bool]]) -> dict[str, float]:
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} if rows else {}


def score_generated(
    samples_dir: Path, cases: list[tuple[str, Scene]]
) -> dict[str, dict[str, float]]:
    """Per-kind accuracies of mtf-generate's images, scored by ``shapes.score_samples``."""
    scored = score_samples(samples_dir)
    if [prompt for prompt, _ in scored] != [scene.caption() for _, scene in cases]:
        raise SystemExit(
            f"{samples_dir}: {len(scored)} scored samples do not match the {len(cases)} prompts"
        )
    by_kind = defaultdict(list)
    for (kind, _), (_, result) in zip(cases, scored, strict=True):
        by_kind[kind].append(result)
    return {kind: _accuracy(rows) for kind, rows in by_kind.items()}


def score_captions(samples_dir: Path, cases: list[tuple[str, Scene]]) -> dict[str, float]:
    records = [
        json.loads(line) for line in (samples_dir / "samples.jsonl").read_text().splitlines()
    ]
    by_kind = defaultdict(list)
    for (kind, scene), record in zip(cases, records, strict=True):
        by_kind[kind].append(parse_caption(record["output"]) == scene)  # only what was generated
    return {kind: float(np.mean(v)) for kind, v in by_kind.items()}


# ---------------------------------------------------------------------------------------------
# The pipeline


def text_to_image(
    run_or_step: Path,
    out: Path,
    flat: list[tuple[str, Scene]],
    sampler: str,
    steps: int,
    spacing: str,
    guidance: float,
) -> tuple[dict, float]:
    """Draw every test caption with mtf-generate; per-kind accuracies and the seconds it took."""
    prompts = [scene.caption() for _, scene in flat]
    seconds = generate_images(run_or_step, prompts, out, steps, guidance, sampler, spacing)
    return score_generated(out, flat), seconds


def generate_images(
    run_or_step: Path,
    prompts: list[str],
    out: Path,
    steps: int,
    guidance: float,
    sampler: str = "ddpm",
    spacing: str = "leading",
) -> float:
    """``mtf-generate`` one image after each prompt into ``out`` (``samples.jsonl``,
    ``sample_NNNN_0.png``); returns its wall time."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    return _run(
        [
            _tool("mtf-generate"),
            str(run_or_step),
            "--mode",
            "image",
            "--prompts-file",
            str(out / "prompts.txt"),
            "--out",
            str(out),
            "--batch-size",
            "48",
            "--steps",
            str(steps),
            "--sampler",
            sampler,
            "--spacing",
            spacing,
            "--guidance",
            str(guidance),
        ],
        out / "generate.log",
    )


def evaluate(run_or_step: Path, out: Path, cases: dict[str, list[Scene]], args) -> dict:
    """Text -> image and image -> text on every test case, through mtf-generate."""
    out.mkdir(parents=True, exist_ok=True)
    flat = [(kind, scene) for kind, scenes in cases.items() for scene in scenes]
    t2i, seconds = text_to_image(
        run_or_step,
        out / "t2i",
        flat,
        args.sampler,
        args.diffusion_steps,
        args.spacing,
        args.guidance,
    )

    images = out / "caption_inputs"
    images.mkdir(exist_ok=True)
    rng = random.Random(args.seed + 2)
    caption_prompts = []
    for i, (_, scene) in enumerate(flat):
        path = images / f"{i:04d}.png"
        Image.fromarray(render(scene, IMAGE_SIZE, rng)).save(path)
        caption_prompts.append(f"<image:{path.resolve()}>\n")
    (out / "caption_prompts.txt").write_text("".join(caption_prompts))
    seconds += _run(
        [
            _tool("mtf-generate"),
            str(run_or_step),
            "--mode",
            "text",
            "--prompts-file",
            str(out / "caption_prompts.txt"),
            "--out",
            str(out / "i2t"),
            "--max-new-tokens",
            "24",
            "--batch-size",
            "48",
        ],
        out / "i2t.log",
    )
    return {
        "text_to_image": t2i,
        "image_to_text": score_captions(out / "i2t", flat),
        "generation_seconds": seconds,
    }


def sweep_sampler(
    run: Path, out: Path, cases: dict[str, list[Scene]], guidance: float
) -> list[dict]:
    """The sampler's choices on the same weights: all-attributes-right per kind, and seconds."""
    from megatron_transfusion.diffusion.sampler import SPACINGS

    flat = [(kind, scene) for kind, scenes in cases.items() for scene in scenes]
    rows = []
    for sampler, steps, spacing in itertools.product(("ddpm", "ddim"), (25, 100, 250), SPACINGS):
        scores, seconds = text_to_image(
            run, out / f"{sampler}{steps}_{spacing}", flat, sampler, steps, spacing, guidance
        )
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "spacing": spacing,
                "seconds": seconds,
                **{kind: scores[kind]["all"] for kind in scores},
            }
        )
        print(
            " ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()
            ),
            flush=True,
        )
    return rows


def train_tiny(
    run: Path, steps: int, checkpoint_interval: int, overrides: list[str], log: Path
) -> float:
    """The ``tiny`` preset for ``steps`` steps under the project's torchrun launcher, into the
    run directory ``run`` (never resuming it: a stale run is trained again); returns its wall
    time."""
    return _run(
        [
            sys.executable,
            "-m",
            "megatron_transfusion.launch",
            "--standalone",
            "--nproc_per_node",
            "1",
            "-m",
            "megatron_transfusion.train",
            "--config",
            "tiny",
            "--resume",
            "none",
            f"run.output_root={run.parent}",
            f"run.name={run.name}",
            f"run.train_steps={steps}",
            "eval.interval=0",
            f"checkpoint.interval={checkpoint_interval}",
            "checkpoint.keep_last=8",
            *overrides,
        ],
        log,
    )


def last_checkpoint(run: Path, steps: int) -> Path:
    """Where ``train_tiny``'s checkpoint of its last step is."""
    return layout.step_dir(layout.checkpoints_dir(run), steps)


def print_timings(results: dict) -> None:
    print(
        "timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_seconds"].items())
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument(
        "--pair-fraction", type=float, default=0.5, help="share of two-object scenes"
    )
    parser.add_argument(
        "--vae-steps",
        type=int,
        default=1800,
        help="VAE training steps (1 min on 2 idle cores): a step budget, so that a busy "
        "machine does not train a weaker VAE",
    )
    parser.add_argument("--steps", type=int, default=4000, help="training steps")
    parser.add_argument("--per-kind", type=int, default=48, help="test cases of each kind")
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--spacing", default="leading")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument(
        "--sweep-sampler",
        action="store_true",
        help="also score text -> image for DDPM/DDIM x 25/100/250 steps x each spacing",
    )
    parser.add_argument("--curve", action="store_true", help="also score every saved checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split-seed",
        type=int,
        default=SPLIT_SEED,
        help="which combinations are held out: "
        "another seed checks a change on data it was not tuned on",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished stages (data, VAE, shards, training)"
    )
    parser.add_argument("overrides", nargs="*", help="training config overrides")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    tests = make_inputs(
        out / "inputs", args.train_samples, args.pair_fraction, args.seed, args.split_seed
    )
    timings["prepare_builtin"] = _run(
        [_tool("mtf-prepare-builtin"), "--out", "data/builtin"], out / "builtin.log"
    )
    vae = out / "vae"
    if not (args.reuse and (vae / "config.json").exists()):
        timings["vae"] = _run(
            [
                _tool("mtf-train-vae"),
                "--inputs",
                str(out / "inputs" / "train"),
                "--image-size",
                str(IMAGE_SIZE),
                "--steps",
                str(args.vae_steps),
                "--out",
                str(vae),
            ],
            out / "vae.log",
        )
    shards = out / "shards"
    if not (args.reuse and (shards / "manifest.json").exists()):
        started = time.perf_counter()
        _run(
            [
                _tool("mtf-prepare-data"),
                "shard",
                "--kind",
                "image_caption",
                "--inputs",
                str(out / "inputs" / "train"),
                "--out",
                str(shards),
                "--tokenizer",
                "data/builtin/tokenizer.json",
                "--vae",
                str(vae),
                "--image-size",
                str(IMAGE_SIZE),
            ],
            out / "shard.log",
        )
        _run([_tool("mtf-prepare-data"), "merge", "--out", str(shards)], out / "merge.log")
        timings["shard"] = time.perf_counter() - started

    run = out / RUN_NAME
    if not (args.reuse and last_checkpoint(run, args.steps).exists()):
        timings["train"] = train_tiny(
            run,
            args.steps,
            max(args.steps // 8, 1) if args.curve else args.steps,
            [f"data.sources.1.path={shards}", *MIX_SETTINGS, *OPTIMIZER_SETTINGS, *args.overrides],
            out / "train.log",
        )

    cases = test_cases(tests, args.per_kind, args.seed)
    results = {"config": vars(args), "timings_seconds": timings}
    results["final"] = evaluate(run, out / "eval" / "final", cases, args)
    if args.curve:
        curve_cases = test_cases(tests, max(args.per_kind // 4, 4), args.seed)
        results["curve"] = {}
        for checkpoint in layout.complete_checkpoints(layout.checkpoints_dir(run))[:-1]:
            results["curve"][checkpoint.name] = evaluate(
                checkpoint, out / "eval" / checkpoint.name, curve_cases, args
            )
    if args.sweep_sampler:
        results["sampler_sweep"] = sweep_sampler(run, out / "eval" / "sweep", cases, args.guidance)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_results(results)


def print_results(results: dict) -> None:
    final = results["final"]
    print(
        f"{'text -> image':<16}"
        + "".join(f"{k:>10}" for k in ("colour", "shape", "size", "position", "all"))
    )
    for kind in ("seen", "held_out"):
        row = final["text_to_image"][kind]
        print(
            f"{kind:<16}"
            + "".join(f"{row[k]:>10.0%}" for k in ("colour", "shape", "size", "position", "all"))
        )
    print(
        f"{'two objects':<16}"
        + "".join(f"{k:>10}" for k in ("colours", "shapes", "relation", "all"))
    )
    for kind in ("pairs_seen", "pairs_held_out"):
        row = final["text_to_image"][kind]
        print(
            f"{kind:<16}"
            + "".join(f"{row[k]:>10.0%}" for k in ("colours", "shapes", "relation", "all"))
        )
    print(
        "image -> text exact: "
        + ", ".join(f"{k} {v:.0%}" for k, v in final["image_to_text"].items())
    )
    for step, r in results.get("curve", {}).items():
        t2i = r["text_to_image"]
        print(
            f"{step}: all-correct seen {t2i['seen']['all']:.0%} "
            f"held-out {t2i['held_out']['all']:.0%} "
            f"pairs {t2i['pairs_held_out']['all']:.0%}; "
            f"captions held-out {r['image_to_text']['held_out']:.0%}"
        )
    print_timings(results)


if __name__ == "__main__":
    main()
