"""Prepare the built-in default data end to end, so the main job needs nothing from the user:

    inputs (tar + jsonl: the committed emoji set, shapes scenes drawn in code, CPython's docs)
      -> tokenizer.json (byte-level BPE) -> VAE (committed weights, or trained here)
      -> MDS shards for text and image–caption pairs, train and held-out splits.

Idempotent: finished pieces are kept, so a re-run after an interruption only does the rest.
Pieces made from other built-in inputs (an older version of this code), another tokenizer or
another VAE (e.g. a newly committed one) are made again.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from data_prep.builtin import (
    export_builtin_inputs,
    export_stamp,
    train_builtin_tokenizer,
    train_builtin_vae,
)
from data_prep.readers import Columns
from data_prep.shard import ShardJob, merge, run_shard_job

BUILTIN_VAE = Path(__file__).parent / "builtin" / "vae"
IMAGE_SIZE = 32
TOKENIZER_VOCAB = 2048


def _vae(out: Path, train_minutes: float | None) -> Path:
    """The committed VAE unless a fresh one is asked for (or none is committed)."""
    if train_minutes is None and (BUILTIN_VAE / "config.json").exists():
        return BUILTIN_VAE
    target = out / "vae"
    if not (target / "config.json").exists():
        train_builtin_vae(target, minutes=train_minutes or 3)
    return target


def prepare_builtin(
    out: str | Path, train_vae_minutes: float | None = None, vae: str | Path | None = None
) -> dict[str, Path]:
    """Returns the prepared dataset directories by name (``text_train``,
    ``images_heldout``, ...)."""
    out = Path(out)
    inputs, tokenizer = out / "inputs", out / "tokenizer.json"
    done, stamp = inputs / "done", export_stamp()
    if not done.exists() or done.read_text() != stamp:
        for stale in (inputs, out / "vae", out / "text", out / "images"):  # all made from inputs
            shutil.rmtree(stale, ignore_errors=True)
        tokenizer.unlink(missing_ok=True)
        export_builtin_inputs(inputs)
        done.write_text(stamp)
    if not tokenizer.exists():
        train_builtin_tokenizer(tokenizer, TOKENIZER_VOCAB)
    vae = Path(vae) if vae else _vae(out, train_vae_minutes)
    made_with = _fingerprints(tokenizer, vae)
    datasets = {}
    for kind, folder in (("text", "text"), ("image_caption", "images")):
        for split in ("train", "heldout"):
            target = out / folder / split
            if _made_with_others(target, kind, made_with):
                shutil.rmtree(target)
            if not (target / "manifest.json").exists():
                job = ShardJob(
                    kind=kind,
                    inputs=[str(inputs / folder / split)],
                    out=str(target),
                    tokenizer=str(tokenizer),
                    vae=str(vae),
                    image_size=IMAGE_SIZE,
                    columns=Columns(),
                )
                run_shard_job(job)
                merge(target)
            datasets[f"{folder}_{split}"] = target
    return datasets


def _fingerprints(tokenizer: Path, vae: Path) -> dict[str, str]:
    from data_prep.tokenizer import Tokenizer
    from data_prep.vae import load_vae

    return {
        "tokenizer": Tokenizer.load(tokenizer).fingerprint()["sha256"],
        "vae": load_vae(vae).fingerprint()["sha256"],
    }


def _made_with_others(target: Path, kind: str, made_with: dict[str, str]) -> bool:
    """Whether the (possibly unfinished) dataset at ``target`` used another tokenizer or VAE."""
    plan = target / "plan.json"
    if not plan.exists():
        return False
    settings = json.loads(plan.read_text())["settings"]
    names = ("tokenizer", "vae") if kind == "image_caption" else ("tokenizer",)
    return any(settings.get(name, {}).get("sha256") != made_with[name] for name in names)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="mtf-prepare-builtin", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="data/builtin")
    parser.add_argument(
        "--train-vae-minutes",
        type=float,
        default=None,
        help="train a fresh VAE for this long instead of using the committed one",
    )
    args = parser.parse_args(argv)
    for name, path in prepare_builtin(args.out, args.train_vae_minutes).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
