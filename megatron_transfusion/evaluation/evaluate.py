"""Held-out evaluation: losses and text perplexity, captioning (CIDEr-D, BLEU-4 against a
constant-caption baseline) and image generation (caption match, FID, CLIP score).

The trainer calls ``heldout_losses`` (every layout and engine) and ``caption_metrics``
(PP=1) every ``eval.interval`` steps; ``mtf-evaluate`` runs everything on a checkpoint
and writes JSON plus tensorboard scalars.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from checkpoints import layout
from megatron_transfusion import platform
from megatron_transfusion.batch import ImageSegment, TextSegment
from megatron_transfusion.console import run_cli
from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.evaluation.captions import bleu4, cider_d, tokenize
from megatron_transfusion.inference.generate import Generator, SamplingConfig


def heldout_losses(evaluate, cfg: ExperimentConfig, dp_rank: int = 0, dp_size: int = 1) -> dict[str, float]:
    """Losses over ``eval.batches`` global batches of held-out data, the same batches and
    noise at every evaluation, scored as one batch (L_LM the mean over all their trained
    tokens, so the perplexity is per token); ``evaluate(micro_batches)`` is the engine's
    forward."""
    from megatron_transfusion.data.loader import MixedModalityLoader
    from megatron_transfusion.diffusion.schedule import CosineSchedule
    from megatron_transfusion.training.step import MicroBatch

    e = cfg.eval
    heldout = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, text_data=e.text_data, image_caption_data=e.image_caption_data))  # fmt: skip
    loader = MixedModalityLoader(heldout, dp_rank, dp_size)
    schedule = CosineSchedule.from_config(cfg.diffusion)
    generator = torch.Generator().manual_seed(cfg.run.seed + 17 + dp_rank)
    device = platform.current().device()
    micro = []
    for _ in range(e.batches):
        for batch in loader.next_step():
            micro.append(MicroBatch.draw(batch, schedule, cfg.diffusion, generator, device))
    losses = evaluate(micro)
    report = {f"heldout_{k}": v for k, v in losses.as_dict().items()}
    if e.text_data:
        report["heldout_perplexity"] = math.exp(losses.lm)
    return report


def _caption_samples(location: str, n: int, tokenizer) -> tuple[list[torch.Tensor], list[str]]:
    from megatron_transfusion.data.source import PreparedDataset

    dataset = PreparedDataset(location)
    if dataset.kind != "image_caption":
        raise ValueError(f"'{location}' holds {dataset.kind} data, not image_caption (eval.image_caption_data)")
    samples = [dataset[i] for i in range(min(n, len(dataset)))]
    latents = [torch.from_numpy(s["latent"].astype(np.float32)) for s in samples]
    return latents, [tokenizer.decode(s["caption"].tolist()) for s in samples]


def caption_metrics(model, cfg: ExperimentConfig, tokenizer, batch_size: int = 16) -> dict[str, float]:
    """Greedy captions of ``eval.captions`` held-out images vs their captions, and the best
    constant caption (any one reference used for every image) as the baseline to beat."""
    latents, references = _caption_samples(cfg.eval.image_caption_data, cfg.eval.captions, tokenizer)
    special = tokenizer.special
    sampling = SamplingConfig(max_new_tokens=32, temperature=0.0, max_images=0, guidance_scale=1.0)
    generator = Generator(model, cfg, special, sampling, tokenizer.vocab_size)
    hypotheses = []
    for start in range(0, len(latents), batch_size):
        prompts = [[TextSegment([special.bos]), ImageSegment(x, caption_first=False)]
                   for x in latents[start : start + batch_size]]  # fmt: skip
        for result in generator.generate(prompts):
            tokens = [t for s in result if isinstance(s, TextSegment) for t in s.tokens]
            hypotheses.append(tokenize(tokenizer.decode(tokens)))
    refs = [[tokenize(r)] for r in references]
    candidates = sorted({r[0] for r in refs})
    constant = max(candidates, key=lambda c: cider_d([c] * len(refs), refs))
    return {
        "caption_cider": cider_d(hypotheses, refs),
        "caption_bleu4": bleu4(hypotheses, refs),
        "constant_caption_cider": cider_d([constant] * len(refs), refs),
        "constant_caption_bleu4": bleu4([constant] * len(refs), refs),
        "captions_evaluated": len(refs),
    }, {"constant_caption": constant, "examples": list(zip(references[:8], hypotheses[:8]))}


def image_metrics(model, cfg: ExperimentConfig, tokenizer, vae, batch_size: int = 16) -> tuple[dict, dict]:
    """Images for ``eval.images`` held-out captions, guided and unconditional (guidance 0):
    caption match for both; FID and CLIP score where weights are configured."""
    from megatron_transfusion.evaluation.images import caption_match, clip_score, fid

    e = cfg.eval
    latents, captions = _caption_samples(e.image_caption_data, e.images, tokenizer)
    real = vae.decode(torch.stack(latents)).cpu()
    generated = {}
    for name, scale in (("guided", e.guidance_scale), ("unconditional", 0.0)):
        sampling = SamplingConfig(diffusion_steps=e.diffusion_steps, guidance_scale=scale, max_new_tokens=0)
        generator = Generator(model, cfg, tokenizer.special, sampling)
        images = []
        for start in range(0, len(captions), batch_size):
            prompts = [[TextSegment([tokenizer.special.bos, *tokenizer.encode(c)])]
                       for c in captions[start : start + batch_size]]  # fmt: skip
            results = generator.generate(prompts, force_image=True, seeds=list(range(start, start + len(prompts))))
            images += [s.latent for r in results for s in r if isinstance(s, ImageSegment)]
        generated[name] = vae.decode(torch.stack(images)).cpu()
    metrics = {"caption_match": caption_match(generated["guided"], real),
               "caption_match_unconditional": caption_match(generated["unconditional"], real),
               "images_evaluated": len(captions)}  # fmt: skip
    skipped = {}
    if e.inception_weights:
        metrics["fid"] = fid(generated["guided"], real, e.inception_weights)
    else:
        skipped["fid"] = "skipped: set eval.inception_weights to a local Inception-v3 state dict"
    if e.clip_model:
        metrics["clip_score"] = clip_score(generated["guided"], captions, e.clip_model)
    else:
        skipped["clip_score"] = "skipped: set eval.clip_model to a local Hugging Face CLIP directory"
    return metrics, {"skipped": skipped, "images": generated}


@run_cli(also=(ValueError,))
def evaluate_main(argv=None) -> None:
    """Evaluate a checkpoint on held-out data; ``eval.*`` overrides choose what and how much."""
    parser = argparse.ArgumentParser(prog="mtf-evaluate", description=evaluate_main.__doc__)
    parser.add_argument("checkpoint", help="run dir, checkpoints dir, step_N dir, or an exported .safetensors")
    parser.add_argument("overrides", nargs="*", help="eval.* settings, e.g. eval.captions=200 eval.images=64")
    parser.add_argument("--out", help="results JSON (default: <run>/eval/step_N.json)")
    parser.add_argument("--tokenizer", help="default: the one the training data was made with")
    parser.add_argument("--vae", help="default: the one the training latents were made with")
    parser.add_argument("--no-verify", action="store_true",
                        help="load the checkpoint without checking its files against its manifest "
                             "(an exported file: against its SHA-256)")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith("eval.")]
    if bad:
        raise ValueError(f"only eval.* settings can be overridden here, got {bad}")

    from torch.utils.tensorboard import SummaryWriter

    from data_prep.images import from_model_range
    from megatron_transfusion.config import config_from_tree
    from megatron_transfusion.inference.images import save_grid
    from megatron_transfusion.inference.load import load_for_inference, load_image_vae, load_tokenizer
    from megatron_transfusion.parallel import destroy_distributed
    from megatron_transfusion.training.step import batch_losses, forward_backward

    loaded = load_for_inference(args.checkpoint, tensor_parallel=int(os.environ.get("WORLD_SIZE", 1)),
                               verify=not args.no_verify)  # fmt: skip
    try:
        cfg = config_from_tree(loaded.cfg.to_dict(), args.overrides)
        e = cfg.eval
        if not (e.text_data or e.image_caption_data):
            raise ValueError("no held-out data: set eval.text_data and/or eval.image_caption_data")
        tokenizer = load_tokenizer(cfg, args.tokenizer)
        model = loaded.model

        def evaluate(micro_batches):
            with torch.no_grad():
                return batch_losses(forward_backward([model], micro_batches, cfg.diffusion.loss_weight,
                                                     forward_only=True))  # fmt: skip

        metrics, details = heldout_losses(evaluate, cfg), {}
        if e.captions and e.image_caption_data:
            scores, details["captions"] = caption_metrics(model, cfg, tokenizer)
            metrics.update(scores)
        images = None
        if e.images and e.image_caption_data:
            scores, extra = image_metrics(model, cfg, tokenizer, load_image_vae(cfg, args.vae))
            metrics.update(scores)
            details["skipped"], images = extra["skipped"], extra["images"]
        if int(os.environ.get("RANK", 0)) == 0:
            out = Path(args.out) if args.out else _default_out(loaded)
            out.parent.mkdir(parents=True, exist_ok=True)
            result = {"checkpoint": str(loaded.source), "step": loaded.step, "metrics": metrics, **details}
            out.write_text(json.dumps(result, indent=1))
            if images is not None:  # guided samples above their unconditional twins
                rows = [from_model_range(images[k]) for k in ("guided", "unconditional")]
                save_grid([*rows[0], *rows[1]], out.with_suffix(".png"), columns=len(rows[0]))
            if loaded.source.suffix != ".safetensors":
                with SummaryWriter(log_dir=str(loaded.source.parent.parent / "tensorboard")) as writer:
                    for key, value in metrics.items():
                        writer.add_scalar(f"eval/{key}", value, loaded.step)
            print(json.dumps(metrics, indent=1))
            print(f"wrote {out}")
    finally:
        destroy_distributed()


def _default_out(loaded) -> Path:
    if loaded.source.suffix == ".safetensors":
        return loaded.source.with_name(f"{loaded.source.stem}_eval.json")
    return loaded.source.parent.parent / "eval" / f"{layout.step_name(loaded.step)}.json"


if __name__ == "__main__":
    evaluate_main()
