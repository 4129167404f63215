"""Prepare the built-in default data end to end, so the main job needs nothing from the user:

    inputs (tar + jsonl, from the committed emoji set and CPython's docs)
      -> tokenizer.json (byte-level BPE) -> VAE (committed weights, or trained here)
      -> MDS shards for text and image–caption pairs, train and held-out splits.

Idempotent: finished pieces are kept, so a re-run after an interruption only does the rest.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from data_prep.builtin import export_builtin_inputs, load_builtin_images, train_builtin_tokenizer
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
        from data_prep.vae import save_vae, scaling_factor, train_vae, VAEConfig

        images, _ = load_builtin_images()
        config = VAEConfig()
        model, _ = train_vae(images, config, max_seconds=60 * (train_minutes or 3))
        save_vae(model, config, scaling_factor(model, images), target)
    return target


def prepare_builtin(
    out: str | Path, train_vae_minutes: float | None = None, vae: str | Path | None = None
) -> dict[str, Path]:
    """Returns the prepared dataset directories by name (``text_train``, ``images_heldout``, ...)."""
    out = Path(out)
    inputs = out / "inputs"
    if not (inputs / "done").exists():
        shutil.rmtree(inputs, ignore_errors=True)
        export_builtin_inputs(inputs)
        (inputs / "done").touch()
    tokenizer = out / "tokenizer.json"
    if not tokenizer.exists():
        train_builtin_tokenizer(tokenizer, TOKENIZER_VOCAB)
    vae = Path(vae) if vae else _vae(out, train_vae_minutes)
    datasets = {}
    for kind, folder in (("text", "text"), ("image_caption", "images")):
        for split in ("train", "heldout"):
            target = out / folder / split
            if not (target / "manifest.json").exists():
                job = ShardJob(kind=kind, inputs=[str(inputs / folder / split)], out=str(target),
                               tokenizer=str(tokenizer), vae=str(vae), image_size=IMAGE_SIZE,
                               max_text_tokens=254, columns=Columns())  # fmt: skip
                run_shard_job(job)
                merge(target)
            datasets[f"{folder}_{split}"] = target
    return datasets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mtf-prepare-builtin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/builtin")
    parser.add_argument("--train-vae-minutes", type=float, default=None,
                        help="train a fresh VAE for this long instead of using the committed one")
    args = parser.parse_args(argv)
    for name, path in prepare_builtin(args.out, args.train_vae_minutes).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
