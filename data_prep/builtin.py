"""Built-in default data, so the full pipeline runs with no downloads.

- images: ~3,800 colour emoji rendered from Noto Color Emoji, captioned with their Unicode
  names ("grinning face", "flag of france"). The 32x32 render is committed as
  ``builtin/emoji32.npz``; re-rendering needs ``apt-get install fonts-noto-color-emoji``
  and ``pip install emoji``.
- text: the Python language reference topics shipped with CPython (``pydoc_data``).

``export_builtin_inputs`` writes both in the formats users bring (webdataset tars, JSONL),
so the built-in data goes through the same sharding job as user data.

    python -m data_prep.builtin render --out data_prep/builtin/emoji32.npz
    python -m data_prep.builtin export --out runs/builtin_inputs
    python -m data_prep.builtin tokenizer --out runs/tokenizer.json
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep.tokenizer import Tokenizer, train_bpe

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
EMOJI_NPZ = BUILTIN_DIR / "emoji32.npz"
NOTO_EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_STRIKE = 109  # the font is a bitmap (CBDT) font with one strike: 136x128 px glyphs
HELDOUT_EVERY = 20  # every 20th item (5%) is held out for evaluation
SAMPLES_PER_SHARD = 1000
MIN_DOC_CHARS = 1000


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
    """Byte-level BPE on the training split of the built-in text and emoji captions (the
    held-out split stays unseen, for evaluation)."""
    texts = split_heldout(builtin_text_documents())["train"]
    captions = split_heldout(load_builtin_images()[1])["train"]
    return train_bpe(texts + captions, vocab_size, path)


def split_heldout(items: Iterable) -> dict[str, list]:
    """{"train": ..., "heldout": every HELDOUT_EVERY-th item}: a fixed split, no RNG."""
    items = list(items)
    heldout = set(range(HELDOUT_EVERY - 1, len(items), HELDOUT_EVERY))
    return {
        "train": [x for i, x in enumerate(items) if i not in heldout],
        "heldout": [x for i, x in enumerate(items) if i in heldout],
    }


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata (mtime 0, no owner): reproducible tars
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tars(directory: Path, rows: list[int], images, captions) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(rows), SAMPLES_PER_SHARD)):
        path = directory / f"{directory.name}-{shard:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in rows[start : start + SAMPLES_PER_SHARD]:
                png = io.BytesIO()
                Image.fromarray(images[i]).save(png, format="PNG")
                _tar_member(tar, f"{i:09d}.png", png.getvalue())
                _tar_member(tar, f"{i:09d}.txt", captions[i].encode("utf-8"))
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
    """Write the built-in data as user inputs: ``images/{split}/{split}-NNNNNN.tar`` (members
    ``<index>.png`` + ``<index>.txt``, index = row in the npz) and
    ``text/{split}/{split}-NNNNNN.jsonl`` (``{"text": ...}``), split = train or heldout.
    ``split_heldout`` picks the held-out 5%; file names are unique across splits."""
    directory = Path(directory)
    images, captions = load_builtin_images()
    documents = builtin_text_documents()
    rows, docs = split_heldout(range(len(images))), split_heldout(documents)
    paths = {}
    for split in rows:
        paths[f"images_{split}"] = _write_tars(
            directory / "images" / split, rows[split], images, captions
        )
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
    args = parser.parse_args(argv)

    if args.command == "render":
        images, captions = render_emoji(args.size)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.out, images=images, captions=np.array(captions))
        print(f"wrote {len(images)} emoji to {args.out}")
    elif args.command == "export":
        for name, paths in export_builtin_inputs(args.out).items():
            print(f"{name}: {len(paths)} file(s) in {paths[0].parent}")
    else:
        tok = train_builtin_tokenizer(args.out, args.vocab_size)
        print(f"wrote {tok}")


if __name__ == "__main__":
    main()
