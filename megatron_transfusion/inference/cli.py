"""``mtf-generate``: samples from a checkpoint, as PNGs, a grid and a JSONL of texts.

Prompts are text with optional ``<image:PATH>`` tags that splice a (clean) image in:

    mtf-generate runs/tiny --prompt "red heart"                       # text -> image
    mtf-generate runs/tiny --mode text --prompt "<image:cat.png>"      # captioning
    mtf-generate runs/tiny --mode text --prompt "The module"           # text (images if BOI)
    mtf-generate runs/tiny --geneval evaluation_metadata.jsonl         # GenEval's layout

Under torchrun every rank runs this and the model is tensor-parallel over them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_transfusion.batch import Document, ImageSegment, TextSegment
from megatron_transfusion.console import run_cli
from megatron_transfusion.diffusion.sampler import SPACINGS
from megatron_transfusion.inference.images import save_grid

IMAGE_TAG = re.compile(r"<image:([^>]*)>")
GENEVAL_SAMPLES = 4  # images per prompt, as GenEval's own generation script draws


def parse_prompt(text: str, tokenizer, vae, image_size: int, mode: str) -> Document:
    """BOS, then text and ``<image:PATH>`` images in order, laid out as training documents:
    an image whose prompt has no text after it is followed by its caption (captioning),
    text with no image after it is followed by the image to generate (mode "image")."""
    from data_prep.images import center_crop_resize, decode_image, to_model_range

    document: Document = []
    tokens = [tokenizer.special.bos]
    for i, part in enumerate(IMAGE_TAG.split(text)):
        if i % 2 == 0:
            tokens += tokenizer.encode(part.strip()) if part.strip() else []
            continue
        if not part.strip():
            raise ValueError(f"prompt '{text}' has an image tag without a path: write <image:PATH>")
        path = Path(part).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt image '{path}' does not exist")
        try:
            pixels = center_crop_resize(decode_image(path.read_bytes()), image_size)
        except ValueError as e:
            raise ValueError(f"prompt image '{path}': {e}") from None
        document += [TextSegment(tokens)] if tokens else []
        document.append(ImageSegment(vae.encode(to_model_range(pixels[None]))[0].cpu()))
        tokens = []
    if tokens:
        document.append(TextSegment(tokens))
    if mode == "image" and document and isinstance(document[-1], ImageSegment):
        raise ValueError(
            f"prompt '{text}' ends with an image: use --mode text to continue after it"
        )
    return document


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file '{path}' does not exist")
        try:
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts file '{path}' is not UTF-8 text ({e})") from None
    if not prompts:
        source = (
            f"prompts file '{args.prompts_file}' holds none" if args.prompts_file else "no prompts"
        )
        raise ValueError(
            f"{source}: pass --prompt TEXT (repeatable) or --prompts-file FILE (one per line)"
        )
    return prompts


def read_geneval(path: str) -> list[dict]:
    """GenEval's prompt metadata (``prompts/evaluation_metadata.jsonl``): a JSON object with
    a ``prompt`` per line, each copied whole into its folder for GenEval's scorer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--geneval file '{path}' does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--geneval file '{path}' line {number} is not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(
                f"--geneval file '{path}' line {number} has no \"prompt\" string: "
                "give GenEval's prompts/evaluation_metadata.jsonl"
            )
        records.append(record)
    if not records:
        raise ValueError(f"--geneval file '{path}' holds no prompts")
    return records


def image_name(index: int, n: int, geneval: bool) -> str:
    """Where image ``n`` of sample ``index`` goes: ``sample_<index>_<n>.png``, or GenEval's
    ``<prompt>/samples/<k>.png`` for sample k of a prompt (image mode draws one image)."""
    if not geneval:
        return f"sample_{index:04d}_{n}.png"
    prompt, sample = divmod(index, GENEVAL_SAMPLES)
    return f"{prompt:05d}/samples/{sample:04d}.png"


def render(
    document: Document, tokenizer, out: Path, name: Callable[[int], str], vae
) -> tuple[str, list[np.ndarray]]:
    """Generated text with ``<image:FILE>`` tags, and the decoded images it wrote (image n
    to ``out / name(n)``)."""
    from data_prep.images import from_model_range

    parts, images = [], []
    for segment in document:
        if isinstance(segment, TextSegment):
            parts.append(tokenizer.decode(segment.tokens))
            continue
        pixels = from_model_range(vae.decode(segment.latent[None]))[0]
        path = out / name(len(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        parts.append(f"<image:{path.relative_to(out)}>")
        images.append(pixels)
    return "".join(parts), images


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """What every command that loads a checkpoint for inference takes besides its path."""
    parser.add_argument(
        "--tokenizer",
        help="default: the one the training data was made with (a Hugging Face export: its own)",
    )
    parser.add_argument("--vae", help="default: the one the training latents were made with")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="load the checkpoint without checking its files against its manifest "
        "(an exported file: against its SHA-256)",
    )


def check_args(args) -> None:
    """ValueError naming the first flag whose value cannot mean anything."""
    for flag, value, ok, what in [
        ("--batch-size", args.batch_size, args.batch_size >= 1, "must be ≥ 1"),
        ("--steps", args.steps, args.steps >= 1, "must be ≥ 1"),
        ("--max-images", args.max_images, args.max_images >= 0, "must be ≥ 0"),
        (
            "--max-new-tokens",
            args.max_new_tokens,
            args.max_new_tokens is None or args.max_new_tokens >= 0,
            "must be ≥ 0",
        ),
        (
            "--guidance",
            args.guidance,
            args.guidance >= 0,
            "must be ≥ 0 (1: no guidance, 0: unconditional)",
        ),
        ("--temperature", args.temperature, args.temperature >= 0, "must be ≥ 0 (0: greedy)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "must lie in (0, 1]"),
    ]:
        if not ok:
            raise ValueError(f"{flag} {value}: {what}")


@run_cli(also=(ValueError,))
def generate_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mtf-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="run dir, checkpoints dir, step_N dir, or an exported .safetensors"
    )
    parser.add_argument("--prompt", action="append", help="prompt text; repeatable")
    parser.add_argument("--prompts-file", help="one prompt per line")
    parser.add_argument(
        "--geneval",
        metavar="FILE",
        help="GenEval's evaluation_metadata.jsonl: its prompts, 4 images each, written in "
        "GenEval's layout (OUT/00000/metadata.jsonl, OUT/00000/samples/0000.png ...)",
    )
    parser.add_argument(
        "--mode",
        choices=("image", "text"),
        default="image",
        help="image: generate an image after each prompt; text: LM mode (switching to "
        "diffusion whenever the model emits BOI)",
    )
    parser.add_argument("--out", help="output directory (default: <run>/samples/step_N)")
    parser.add_argument(
        "--steps", type=int, default=250, help="diffusion steps (of the 1000 trained)"
    )
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument(
        "--spacing",
        choices=SPACINGS,
        default="leading",
        help="where the respaced chain starts: leading (DDIM's, default), uncapped, "
        "trailing (t = T-1, where the cosine schedule is degenerate)",
    )
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="classifier-free guidance scale"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--max-new-tokens", type=int, help="default: 0 in image mode, 64 in text mode"
    )
    parser.add_argument("--max-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence every step"
    )
    add_loading_arguments(parser)
    args = parser.parse_args(argv)
    check_args(args)

    from tqdm import tqdm

    from megatron_transfusion.inference.generate import Generator, SamplingConfig
    from megatron_transfusion.inference.load import (
        load_for_inference,
        load_image_vae,
        load_tokenizer,
    )
    from megatron_transfusion.parallel import destroy_distributed

    if args.geneval:
        if args.prompt or args.prompts_file or args.mode != "image":
            raise ValueError(
                "--geneval takes its prompts from its file, in image mode: "
                "drop --prompt, --prompts-file and --mode text"
            )
        geneval = read_geneval(args.geneval)
        prompts = [r["prompt"] for r in geneval for _ in range(GENEVAL_SAMPLES)]
    else:
        prompts = read_prompts(args)
    loaded = load_for_inference(
        args.checkpoint,
        tensor_parallel=int(os.environ.get("WORLD_SIZE", 1)),
        verify=not args.no_verify,
    )
    try:
        cfg = loaded.cfg
        tokenizer = load_tokenizer(cfg, args.tokenizer or loaded.bundled_tokenizer)
        vae = load_image_vae(cfg, args.vae)
        image_size = cfg.model.latent_size * vae.downsample
        documents = [parse_prompt(p, tokenizer, vae, image_size, args.mode) for p in prompts]
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens
            if args.max_new_tokens is not None
            else (64 if args.mode == "text" else 0),
            temperature=args.temperature,
            top_p=args.top_p,
            diffusion_steps=args.steps,
            sampler=args.sampler,
            spacing=args.spacing,
            guidance_scale=args.guidance,
            max_images=args.max_images,
            seed=args.seed,
            use_cache=not args.no_cache,
        )
        generator = Generator(loaded.model, cfg, tokenizer.special, sampling, tokenizer.vocab_size)
        generator.check_prompts(documents, force_image=args.mode == "image")
        rank0 = int(os.environ.get("RANK", 0)) == 0
        out = Path(args.out) if args.out else loaded.output_dir("samples")
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
        records, all_images, count = [], [], 0
        for start in range(0, len(documents), args.batch_size):
            batch = documents[start : start + args.batch_size]
            bar = tqdm(
                desc=f"prompts {start}-{start + len(batch) - 1}",
                total=args.steps,
                disable=not rank0,
            )

            # Called only inside this iteration's generate(), so `bar` is this batch's bar.
            def progress(step: int, total: int) -> None:
                bar.reset(total) if step == 1 else None  # a new image started  # noqa: B023
                bar.update(1)  # noqa: B023

            seeds = [args.seed + index for index in range(start, start + len(batch))]  # per prompt
            results = generator.generate(
                batch, force_image=args.mode == "image", progress=progress, seeds=seeds
            )
            bar.close()
            if not rank0:
                continue
            for k in generator.stopped_at_context_limit:
                print(
                    f"notice: prompt {start + k} stopped at the model's context limit "
                    f"(max_sequence_length={cfg.model.max_sequence_length}) "
                    f"before --max-new-tokens {sampling.max_new_tokens}"
                )
            for k, result in enumerate(results):
                index = start + k
                name = partial(image_name, index, geneval=bool(args.geneval))
                text, images = render(result, tokenizer, out, name, vae)
                if args.geneval and index % GENEVAL_SAMPLES == 0:
                    record = geneval[index // GENEVAL_SAMPLES]
                    folder = (out / name(0)).parents[1]  # OUT/<prompt>, above samples/
                    (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
                records.append({"prompt": prompts[index], "output": text, "seed": seeds[k]})
                count += len(images)
                if not args.geneval:  # thousands of images: no quick-look grid
                    all_images += images
        if rank0:
            with open(out / "samples.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            save_grid(all_images, out / "grid.png")
            print(f"wrote {len(records)} samples ({count} images) to {out}")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    generate_main()
