"""Built-in default data, so the full pipeline runs with no downloads.

- images: ~3,800 colour emoji rendered from Noto Color Emoji, captioned with their Unicode
  names ("grinning face", "flag of france"). The 32x32 render is committed as
  ``builtin/emoji32.npz``; re-rendering needs ``apt-get install fonts-noto-color-emoji``
  and ``pip install emoji``.
- shapes: scenes of one or two flat coloured shapes (``data_prep.shapes``), drawn in code at
  export time from a fixed seed and captioned by what they show ("a large red circle on the
  left", "a green square to the left of a blue triangle"). Its held-out split is a set of
  attribute combinations that training never shows (``make_split``).
- text: the Python language reference topics shipped with CPython (``pydoc_data``).

``export_builtin_inputs`` writes them in the formats users bring (webdataset tars, JSONL),
so the built-in data goes through the same sharding job as user data.

    python -m data_prep.builtin render --out data_prep/builtin/emoji32.npz
    python -m data_prep.builtin export --out runs/builtin_inputs
    python -m data_prep.builtin tokenizer --out runs/tokenizer.json
    python -m data_prep.builtin vae --out data_prep/builtin/vae --minutes 3
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep import shapes
from data_prep.tokenizer import Tokenizer, train_bpe

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
EMOJI_NPZ = BUILTIN_DIR / "emoji32.npz"
NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_STRIKE = 109  # the font is a bitmap (CBDT) font with one strike: 136x128 px glyphs
HELDOUT_EVERY = 20  # every 20th item (5%) is held out for evaluation
SAMPLES_PER_SHARD = 1000
MIN_DOC_CHARS = 1000
SPLITS = ("train", "heldout")
EXPORT_VERSION = 2  # 2: the shapes part
# The shapes part (builtin/README.md: why these numbers). Held out: a sixth of the attribute
# combinations (scenes), each made of parts training shows; benchmarks/learning_quality.py's split.
SHAPES_SAMPLES = {"train": 24000, "heldout": 150}  # 87% of the training images
SHAPES_PAIR_FRACTION = 0.5  # share of two-object scenes
SHAPES_HELD_OUT_FRACTION = 1 / 6
SHAPES_SPLIT_SEED = 0
SHAPES_RENDER_SEED = {"train": 0, "heldout": 1}


def _caption(sequence: str, name: str) -> str:
    """``:flag_in_hole:`` -> "flag in hole". Country and subdivision flags are named by the
    place alone (``:France:``), so they get "flag of"."""
    caption = name.strip(":").replace("_", " ").lower()
    is_flag = unicodedata.name(sequence[0], "").startswith("REGIONAL INDICATOR") or (
        sequence[0] == "\U0001f3f4" and "\U000e007f" in sequence  # England, Scotland, Wales
    )
    return f"flag of {caption}" if is_flag else caption


def render_emoji(
    size: int = 32, font_path: str | Path = NOTO_EMOJI_FONT
) -> tuple[np.ndarray, list[str]]:
    """All fully-qualified emoji the font draws as one glyph, as uint8 [N, size, size, 3] on
    white, with their names; sorted by codepoint sequence."""
    try:
        import emoji
    except ImportError:
        raise ImportError("re-rendering the built-in emoji needs: pip install emoji") from None
    if not Path(font_path).is_file():
        raise FileNotFoundError(
            f"emoji font {font_path} not found: apt-get install fonts-noto-color-emoji "
            "(or use load_builtin_images(), which needs no font)"
        )
    font = ImageFont.truetype(str(font_path), NOTO_STRIKE)
    width, height = 136, 128

    def draw(sequence: str) -> Image.Image:
        glyph = Image.new("RGBA", (width, height), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((0, 0), sequence, font=font, embedded_color=True)
        return glyph

    unknown_flag = np.asarray(draw("\U0001f1e6\U0001f1e6"))  # no country "AA": the "?" flag
    images, captions = [], []
    for sequence in sorted(emoji.EMOJI_DATA):
        data = emoji.EMOJI_DATA[sequence]
        if data["status"] != emoji.STATUS["fully_qualified"] or font.getlength(sequence) > 140:
            continue  # unqualified duplicates, and sequences the font draws as several glyphs
        glyph = draw(sequence)
        blank = glyph.getbbox(alpha_only=True) is None  # codepoints newer than the font
        if blank or np.array_equal(np.asarray(glyph), unknown_flag):
            continue
        square = Image.new("RGB", (width, width), "white")
        square.paste(glyph, (0, (width - height) // 2), glyph)
        images.append(np.asarray(square.resize((size, size), Image.LANCZOS)))
        captions.append(_caption(sequence, data["en"]))
    return np.stack(images), captions


def load_builtin_images() -> tuple[np.ndarray, list[str]]:
    """The committed 32x32 emoji render: uint8 [N, 32, 32, 3] and captions. Needs no font."""
    with np.load(EMOJI_NPZ) as data:
        return data["images"], [str(c) for c in data["captions"]]


def shapes_scenes() -> dict[str, dict[str, list[shapes.Scene]]]:
    """{split: {"single": scenes, "pair": scenes}}: the held-out split's scenes are new
    combinations of attribute values that the train split's scenes show."""
    kinds = {"single": shapes.single_scenes(), "pair": shapes.pair_scenes()}
    parts = {
        kind: shapes.make_split(scenes, SHAPES_HELD_OUT_FRACTION, SHAPES_SPLIT_SEED)
        for kind, scenes in kinds.items()
    }
    return {
        "train": {kind: list(split.seen) for kind, split in parts.items()},
        "heldout": {kind: list(split.held_out) for kind, split in parts.items()},
    }


def builtin_shapes(split: str, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """``SHAPES_SAMPLES[split]`` shapes scenes of ``split`` drawn at ``size`` px: uint8
    [N, size, size, 3] and captions. Deterministic (fixed seeds); a two-object scene is
    captioned left-to-right or right-to-left at random."""
    scenes, rng = shapes_scenes()[split], random.Random(SHAPES_RENDER_SEED[split])
    images, captions = [], []
    for _ in range(SHAPES_SAMPLES[split]):
        scene = rng.choice(scenes["pair" if rng.random() < SHAPES_PAIR_FRACTION else "single"])
        images.append(shapes.render(scene, size, rng))
        captions.append(scene.caption(left_first=rng.random() < 0.5))
    return np.stack(images), captions


def builtin_image_captions(split: str) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The built-in image–caption pairs of ``split`` by part: {"emoji": (images, captions),
    "shapes": (images, captions)}."""
    images, captions = load_builtin_images()
    rows = split_heldout(range(len(images)))[split]
    return {"emoji": (images[rows], [captions[i] for i in rows]), "shapes": builtin_shapes(split)}


def builtin_text_documents() -> list[str]:
    """The CPython language reference topics, cut at paragraph breaks into documents of at
    least ``MIN_DOC_CHARS`` characters. Fixed for a given Python version.

    Topics overlap ("compound" contains "if"), so a long paragraph seen before is dropped:
    otherwise the same text could land in both the train and held-out splits.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    documents: list[str] = []
    for text in sorted(topics.values()):
        first, chunk = len(documents), []
        for paragraph in text.split("\n\n"):
            if not paragraph.strip() or (len(paragraph) >= 100 and paragraph in seen):
                continue
            seen.add(paragraph)
            chunk.append(paragraph)
            if sum(map(len, chunk)) >= MIN_DOC_CHARS:
                documents.append("\n\n".join(chunk))
                chunk = []
        if chunk and len(documents) > first and sum(map(len, chunk)) < MIN_DOC_CHARS // 2:
            documents[-1] += "\n\n" + "\n\n".join(chunk)  # a short tail joins its topic
        elif chunk:
            documents.append("\n\n".join(chunk))
    return documents


def train_builtin_tokenizer(path: str | Path, vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE on the training split of the built-in text and captions (emoji and
    shapes; the held-out split stays unseen, for evaluation)."""
    texts = split_heldout(builtin_text_documents())["train"]
    captions = [c for _, part in builtin_image_captions("train").values() for c in part]
    return train_bpe(texts + captions, vocab_size, path)


def train_builtin_vae(
    out: str | Path, minutes: float | None = 3.0, steps: int | None = None, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Train the built-in VAE (``VAEConfig()``) on the train split's images for ``minutes``
    and/or ``steps`` and save it to ``out``: every emoji and as many shapes scenes (the first
    ones; the rest only repeat the same 150 scenes, and would crowd the emoji out). Returns the
    held-out PSNR per part: {"emoji": {"vae": dB, "bilinear": dB, "images": n}, "shapes": ...}."""
    from data_prep.vae import (
        VAEConfig,
        bilinear_baseline,
        psnr,
        reconstruct,
        save_vae,
        scaling_factor,
        train_vae,
    )

    parts = builtin_image_captions("train")
    emoji = parts["emoji"][0]
    train = np.concatenate([emoji, parts["shapes"][0][: len(emoji)]])
    config = VAEConfig()
    max_seconds = None if minutes is None else 60 * minutes
    model, history = train_vae(train, config, steps=steps, max_seconds=max_seconds, seed=seed)
    save_vae(model, config, scaling_factor(model, train), out)
    report: dict[str, dict[str, float]] = {
        "training": {"steps": len(history), "images": len(train), "seconds": history[-1]["seconds"]}
    }
    for part, (held, _) in builtin_image_captions("heldout").items():
        report[part] = {
            "vae": psnr(reconstruct(model, held), held),
            "bilinear": psnr(bilinear_baseline(held, config.downsample), held),
            "images": len(held),
        }
    return report


def split_heldout(items: Iterable) -> dict[str, list]:
    """{"train": ..., "heldout": every HELDOUT_EVERY-th item}: a fixed split, no RNG."""
    items = list(items)
    heldout = set(range(HELDOUT_EVERY - 1, len(items), HELDOUT_EVERY))
    return {
        "train": [x for i, x in enumerate(items) if i not in heldout],
        "heldout": [x for i, x in enumerate(items) if i in heldout],
    }


def export_stamp() -> str:
    """What ``export_builtin_inputs`` writes, in one line: a prepared copy made with another
    stamp is stale. Bump ``EXPORT_VERSION`` when the export changes in a way this misses."""
    return json.dumps(
        {
            "version": EXPORT_VERSION,
            "emoji": len(load_builtin_images()[0]),
            "shapes": SHAPES_SAMPLES,
            "pair_fraction": SHAPES_PAIR_FRACTION,
            "held_out_fraction": SHAPES_HELD_OUT_FRACTION,
            "split_seed": SHAPES_SPLIT_SEED,
            "render_seed": SHAPES_RENDER_SEED,
        }
    )


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata (mtime 0, no owner): reproducible tars
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tars(directory: Path, samples: list[tuple[str, np.ndarray, str]]) -> list[Path]:
    """``samples``: (key, image, caption)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(samples), SAMPLES_PER_SHARD)):
        path = directory / f"{directory.name}-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, caption in samples[start : start + SAMPLES_PER_SHARD]:
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                _tar_member(tar, f"{key}.png", png.getvalue())
                _tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
        paths.append(path)
    return paths


def _write_jsonl(directory: Path, documents: list[str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(documents), SAMPLES_PER_SHARD)):
        path = directory / f"{directory.name}-{shard:06d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for text in documents[start : start + SAMPLES_PER_SHARD]:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def export_builtin_inputs(directory: str | Path) -> dict[str, list[Path]]:
    """Write the built-in data as user inputs: ``images/{split}/{split}-NNNNNN.tar`` and
    ``text/{split}/{split}-NNNNNN.jsonl`` (``{"text": ...}``), split = train or heldout.

    The tars hold the emoji (members ``<index>.png`` + ``<index>.txt``, index = row in the
    npz, nine digits), then the shapes scenes (``shapes<n>``, n counting over both splits).
    ``split_heldout`` holds out every 20th emoji and text document; the shapes' held-out
    split is its own scenes (``shapes_scenes``). File names are unique across splits."""
    directory = Path(directory)
    images, captions = load_builtin_images()
    rows, docs = split_heldout(range(len(images))), split_heldout(builtin_text_documents())
    paths, shapes_done = {}, 0
    for split in SPLITS:
        shape_images, shape_captions = builtin_shapes(split)
        samples = [(f"{i:09d}", images[i], captions[i]) for i in rows[split]]
        samples += [
            (f"shapes{shapes_done + n:06d}", image, caption)
            for n, (image, caption) in enumerate(zip(shape_images, shape_captions, strict=True))
        ]
        shapes_done += len(shape_images)
        paths[f"images_{split}"] = _write_tars(directory / "images" / split, samples)
        paths[f"text_{split}"] = _write_jsonl(directory / "text" / split, docs[split])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.builtin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="render the emoji to an npz (needs the font and emoji)")
    render.add_argument("--out", default=str(EMOJI_NPZ))
    render.add_argument("--size", type=int, default=32)
    export = sub.add_parser("export", help="write the built-in data as tar/jsonl inputs")
    export.add_argument("--out", required=True)
    tokenizer = sub.add_parser("tokenizer", help="train the built-in BPE tokenizer")
    tokenizer.add_argument("--out", required=True)
    tokenizer.add_argument("--vocab-size", type=int, default=4096)
    vae = sub.add_parser("vae", help="train the built-in VAE on the train split's images")
    vae.add_argument("--out", required=True)
    vae.add_argument("--minutes", type=float, help="wall-time budget (default 3 without --steps)")
    vae.add_argument("--steps", type=int, help="step budget (deterministic given --seed)")
    vae.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "render":
        images, captions = render_emoji(args.size)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out, images=images, captions=np.array(captions))
        print(f"wrote {len(images)} emoji to {args.out}")
    elif args.command == "export":
        for name, paths in export_builtin_inputs(args.out).items():
            print(f"{name}: {len(paths)} file(s) in {paths[0].parent}")
    elif args.command == "tokenizer":
        tok = train_builtin_tokenizer(args.out, args.vocab_size)
        print(f"wrote {tok}")
    else:
        minutes = 3.0 if args.minutes is None and args.steps is None else args.minutes
        report = train_builtin_vae(args.out, minutes, args.steps, args.seed)
        t = report.pop("training")
        print(
            f"{t['steps']} steps in {t['seconds']:.0f}s on {t['images']} images; "
            f"saved to {args.out}"
        )
        for part, r in report.items():
            print(
                f"held-out {part} ({r['images']} images): PSNR VAE {r['vae']:.2f} dB, "
                f"bilinear baseline {r['bilinear']:.2f} dB"
            )


if __name__ == "__main__":
    main()
