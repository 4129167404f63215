"""Image editing: does a text-to-image model fine-tuned on edit examples do what the
instruction says, and leave the rest alone? (Transfusion §4.5, on the shapes set.)

    python -m benchmarks.editing --base runs/quality --out runs/editing

On top of a finished learning-quality run (``--base``: ``benchmarks.learning_quality``'s
output directory), with the documented tools only:

1. edit examples on one-object shapes scenes (``data_prep.shapes``: recolour, move, reshape,
   add a second object), as a Parquet of ``input_image`` (PNG), ``instruction``,
   ``output_image`` (PNG). Per edit kind a sixth of the (source scene, edit) combinations is
   held out of training, each a new combination of parts training shows
   (``shapes.edit_split``). Every scene, input or result, training or test, is one the base
   run's split shows in training (same ``--split-seed``): the held-out test asks for new
   edits, not for the base run's held-out scenes;
2. ``mtf-prepare-data shard --kind image_edit`` + ``merge``, with the tokenizer, VAE and image
   size the base run's shapes shards were made with;
3. fine-tunes the base run's last checkpoint (``checkpoint.init_from``): the tiny preset
   under the torchrun launcher, on the base run's text and shapes captions and the edits;
4. ``mtf-generate`` draws the result of each test edit from its input image and instruction,
   scored against the scene asked for (``shapes.score_edit``): exactly right, and the share
   of the attributes the instruction did not name that are untouched;
5. what the fine-tune kept: the learning-quality benchmark's text -> image and image -> text
   on the base run's test scenes, by the base checkpoint and by the edited model.

Prints both per edit kind on seen and held-out edits, next to what copying the input scores
(0% exactly right, 100% untouched: doing nothing does not reach the score); writes
``<out>/results.json``. Extra arguments are training config overrides (the mix is
``data.sources.0``-``2``: text, captions, edits).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.learning_quality import (
    HELD_OUT_FRACTION,
    OPTIMIZER_SETTINGS,
    RUN_NAME,
    SPLIT_SEED,
    _accuracy,
    _run,
    _tool,
    generate_images,
    last_checkpoint,
    print_timings,
    scene_splits,
    test_cases,
    test_scenes,
    train_tiny,
)
from benchmarks.learning_quality import evaluate as evaluate_learning_quality
from checkpoints import layout
from data_prep.images import decode_image, encode_png
from data_prep.shapes import (
    EDIT_KINDS,
    Edit,
    Scene,
    Split,
    apply_edit,
    edit_instruction,
    edit_split,
    render,
    score_edit,
)

# Token shares of the fine-tuning mix, by source kind: most on the new task; the base run's
# captions keep up the drawing of scenes that editing builds on, its text the language model.
# At 0.1 / 0.2 / 0.7 the 3,000 steps were too few edits to learn to copy what the
# instruction leaves alone (benchmarks/README.md, "Image editing").
MIX = {"text": 0.05, "image_caption": 0.1, "image_edit": 0.85}
SPLITS = ("seen", "held_out")
Case = tuple[Scene, Edit]


@dataclass(frozen=True)
class Base:
    """The run the fine-tuning starts from, and what its edit data must be made with."""

    checkpoint: Path
    text: str  # its text source
    captions: str  # its shapes image-caption shards
    tokenizer: str
    vae: str
    image_size: int


def find_base(base: Path) -> Base:
    """A learning-quality output directory's run: its latest checkpoint, its data sources (from
    the run's config), and the tokenizer, VAE and image size its captions were made with
    (from their manifest: ``checkpoint.init_from`` checks the edits were made with the same)."""
    run = base / RUN_NAME
    checkpoint = layout.find_checkpoint(run)
    sources = yaml.safe_load(layout.run_config_file(run).read_text())["data"]["sources"]
    paths = {source["kind"]: source["path"] for source in sources}
    manifest = json.loads((Path(paths["image_caption"]) / "manifest.json").read_text())
    return Base(
        checkpoint,
        paths["text"],
        paths["image_caption"],
        manifest["tokenizer"]["path"],
        manifest["vae"]["path"],
        manifest["image_size"],
    )


# ---------------------------------------------------------------------------------------------
# The data


def edit_cases(split_seed: int = SPLIT_SEED) -> dict[str, Split[Case]]:
    """Per edit kind, its training and held-out edits: from the base split's seen one-object
    scenes to its seen scenes."""
    singles, pairs = scene_splits(split_seed)
    return edit_split(
        list(singles.seen), list(singles.seen + pairs.seen), HELD_OUT_FRACTION, split_seed
    )


def _render_edit(case: Case, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Input and result drawn with the same jitter: what the edit does not name stays put."""
    scene, edit = case
    return (
        render(scene, image_size, random.Random(seed)),
        render(apply_edit(scene, edit), image_size, random.Random(seed)),
    )


def write_training_examples(
    path: Path, cases: dict[str, Split[Case]], count: int, image_size: int, seed: int
) -> list[Case]:
    """``count`` examples, each edit kind equally likely, each a random training edit drawn
    afresh, as the Parquet ``mtf-prepare-data shard --kind image_edit`` reads; the edits
    written, in order."""
    rng = random.Random(seed)
    written, rows = [], {"input_image": [], "instruction": [], "output_image": []}
    for _ in range(count):
        case = rng.choice(cases[rng.choice(EDIT_KINDS)].seen)
        before, after = _render_edit(case, image_size, rng.getrandbits(32))
        rows["input_image"].append(encode_png(before))
        rows["instruction"].append(edit_instruction(*case, rng))
        rows["output_image"].append(encode_png(after))
        written.append(case)
    schema = pa.schema(
        [("input_image", pa.binary()), ("instruction", pa.string()), ("output_image", pa.binary())]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=schema), path)
    return written


def edit_test_cases(
    cases: dict[str, Split[Case]], per_kind: int, seed: int
) -> dict[tuple[str, str], list[Case]]:
    """``per_kind`` edits of each kind from its training edits (seen; drawn afresh) and from its
    held-out ones, picked as ``learning_quality.test_cases`` picks scenes."""
    groups = {
        (kind, split): list(getattr(cases[kind], split)) for kind in EDIT_KINDS for split in SPLITS
    }
    return test_cases(groups, per_kind, seed)


def write_edit_prompts(
    cases: list[Case], directory: Path, image_size: int, seed: int
) -> tuple[list[Path], list[str]]:
    """Each edit's input image (``directory/NNNN.png``) and its ``mtf-generate`` prompt,
    ``<image:ABSOLUTE PATH> instruction``."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths, prompts = [], []
    for index, case in enumerate(cases):
        path = (directory / f"{index:04d}.png").resolve()
        path.write_bytes(encode_png(render(case[0], image_size, rng)))
        paths.append(path)
        prompts.append(f"<image:{path}> {edit_instruction(*case, rng)}")
    return paths, prompts


# ---------------------------------------------------------------------------------------------
# Scoring


def read_image(path: Path) -> np.ndarray:
    return np.asarray(decode_image(path.read_bytes()))


def read_samples(samples_dir: Path, prompts: list[str]) -> list[np.ndarray]:
    """``mtf-generate``'s image for each prompt, in order; SystemExit if it drew other prompts."""
    records = [
        json.loads(line) for line in (samples_dir / "samples.jsonl").read_text().splitlines()
    ]
    if [record["prompt"] for record in records] != prompts:
        raise SystemExit(
            f"{samples_dir}: its {len(records)} samples are not of the {len(prompts)} prompts"
        )
    return [read_image(samples_dir / f"sample_{i:04d}_0.png") for i in range(len(records))]


def score_edits(
    images: list[np.ndarray], cases: list[tuple[tuple[str, str], Case]]
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean ``exactly_right`` and ``untouched_preserved`` (``shapes.score_edit``) of each
    image as the result of its (kind, split) edit: per kind and split, and ``overall`` per
    split and in ``all``."""
    rows = defaultdict(list)
    for image, ((kind, split), (scene, edit)) in zip(images, cases, strict=True):
        score = score_edit(image, scene, edit)
        for group in ((kind, split), ("overall", split), ("overall", "all")):
            rows[group].append(score)
    results = defaultdict(dict)
    for (kind, split), scores in rows.items():
        results[kind][split] = _accuracy(scores)
    return dict(results)


# ---------------------------------------------------------------------------------------------
# The pipeline


def shard_edits(parquet: Path, shards: Path, base: Base, logs: Path) -> float:
    """``mtf-prepare-data shard --kind image_edit`` + ``merge``, as the base run's captions were
    made; returns the seconds."""
    return _run(
        [
            _tool("mtf-prepare-data"),
            "shard",
            "--kind",
            "image_edit",
            "--inputs",
            str(parquet),
            "--out",
            str(shards),
            "--tokenizer",
            base.tokenizer,
            "--vae",
            base.vae,
            "--image-size",
            str(base.image_size),
        ],
        logs / "shard.log",
    ) + _run([_tool("mtf-prepare-data"), "merge", "--out", str(shards)], logs / "merge.log")


def fine_tune(run: Path, base: Base, edits: Path, steps: int, overrides: list[str]) -> float:
    """The tiny preset from the base run's weights (fresh optimizer and data order) on ``MIX``,
    with the base run's optimizer settings; its log beside the run. Returns the seconds."""
    sources = [
        {"name": kind, "kind": kind, "path": str(path), "weight": MIX[kind]}
        for kind, path in (
            ("text", base.text),
            ("image_caption", base.captions),
            ("image_edit", edits),
        )
    ]
    return train_tiny(
        run,
        steps,
        steps,
        [
            f"data.sources={json.dumps(sources)}",
            f"checkpoint.init_from={base.checkpoint}",
            *OPTIMIZER_SETTINGS,
            *overrides,
        ],
        run.parent / "train.log",
    )


def evaluate(
    run: Path,
    out: Path,
    cases: dict[tuple[str, str], list[Case]],
    image_size: int,
    args: argparse.Namespace,
) -> dict:
    """Every test edit through ``mtf-generate``, scored, and its input scored as if copied."""
    flat = [(group, case) for group, group_cases in cases.items() for case in group_cases]
    inputs, prompts = write_edit_prompts(
        [case for _, case in flat], out / "inputs", image_size, args.seed + 2
    )
    seconds = generate_images(
        run, prompts, out / "samples", args.diffusion_steps, args.guidance, args.sampler
    )
    return {
        "edited": score_edits(read_samples(out / "samples", prompts), flat),
        "copy_input": score_edits([read_image(path) for path in inputs], flat),
        "generation_seconds": seconds,
    }


def retained(base: Base, run: Path, out: Path, args: argparse.Namespace) -> dict:
    """What fine-tuning on edits keeps of the base model: the learning-quality benchmark's
    text -> image and image -> text on the base run's test scenes, for the base checkpoint
    and the edited model alike (the same cases, seeds and sampler)."""
    cases = test_cases(test_scenes(args.split_seed), args.retained_per_kind, args.seed)
    settings = argparse.Namespace(
        sampler=args.sampler,
        diffusion_steps=args.diffusion_steps,
        spacing="leading",
        guidance=args.guidance,
        seed=args.seed,
    )
    return {
        name: evaluate_learning_quality(model, out / name, cases, settings)
        for name, model in (("base", base.checkpoint), ("edited", run))
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/quality", help="a learning-quality --out")
    parser.add_argument("--out", default="runs/editing")
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument(
        "--steps",
        type=int,
        default=3000,
        help="fine-tuning steps (~8 minutes on 2 idle cores)",
    )
    parser.add_argument(
        "--per-kind", type=int, default=24, help="test edits of each kind, seen and held out"
    )
    parser.add_argument(
        "--retained-per-kind",
        type=int,
        default=24,
        help="learning-quality test cases of each kind, drawn and captioned by the base and "
        "the edited model",
    )
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--sampler", default="ddpm")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split-seed",
        type=int,
        default=SPLIT_SEED,
        help="the base run's --split-seed (its held-out scenes stay out), and the edits' split",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep finished stages (data, shards, training)"
    )
    parser.add_argument("overrides", nargs="*", help="training config overrides")
    args = parser.parse_args(argv)
    try:
        base = find_base(Path(args.base))
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(
            f"--base {args.base}: not a finished learning-quality run ({e}); "
            f"run python -m benchmarks.learning_quality --out {args.base} first"
        ) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    cases = edit_cases(args.split_seed)
    parquet = out / "inputs" / "edits.parquet"
    if not (args.reuse and parquet.exists()):
        started = time.perf_counter()
        write_training_examples(parquet, cases, args.train_examples, base.image_size, args.seed)
        timings["data"] = time.perf_counter() - started
    shards = out / "shards" / "edits"
    if not (args.reuse and (shards / "manifest.json").exists()):
        timings["shard"] = shard_edits(parquet, shards, base, out)
    run = out / RUN_NAME
    if not (args.reuse and last_checkpoint(run, args.steps).exists()):
        timings["train"] = fine_tune(run, base, shards, args.steps, args.overrides)

    tests = edit_test_cases(cases, args.per_kind, args.seed)
    results = evaluate(run, out / "eval", tests, base.image_size, args)
    timings["generate"] = results.pop("generation_seconds")
    kept = retained(base, run, out / "eval" / "retained", args)
    timings["retained"] = sum(r.pop("generation_seconds") for r in kept.values())
    results = {
        "config": vars(args),
        "base": {k: str(v) for k, v in asdict(base).items()},
        "timings_seconds": timings,
        **results,
        "retained": kept,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_results(results)


def print_results(results: dict) -> None:
    edited, copied = results["edited"], results["copy_input"]
    print(
        f"{'edit':<10}{'split':<10}{'exactly right':>15}{'untouched':>11}"
        f"  | copy input:{'exactly right':>15}{'untouched':>11}"
    )
    for kind in (*EDIT_KINDS, "overall"):
        for split in (*SPLITS, "all") if kind == "overall" else SPLITS:
            row, copy = edited[kind][split], copied[kind][split]
            print(
                f"{kind:<10}{split:<10}{row['exactly_right']:>15.0%}"
                f"{row['untouched_preserved']:>11.0%}"
                f"  | {'':<11}{copy['exactly_right']:>15.0%}{copy['untouched_preserved']:>11.0%}"
            )
    kept = results["retained"]
    print(f"{'retained':<16}{'text -> image, all right':>26}{'captions exact':>22}")
    print(f"{'':<16}{'base':>14}{'edited':>12}{'base':>12}{'edited':>10}")
    for kind in kept["base"]["image_to_text"]:
        t2i = [kept[m]["text_to_image"][kind]["all"] for m in ("base", "edited")]
        i2t = [kept[m]["image_to_text"][kind] for m in ("base", "edited")]
        print(f"{kind:<16}{t2i[0]:>14.0%}{t2i[1]:>12.0%}{i2t[0]:>12.0%}{i2t[1]:>10.0%}")
    print_timings(results)


if __name__ == "__main__":
    main()
