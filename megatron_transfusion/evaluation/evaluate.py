"""Held-out evaluation: losses and text perplexity, captioning (CIDEr-D, BLEU-4 against a
constant-caption baseline) and image generation (caption match, FID, Inception score, CLIP
score).

The trainer calls ``heldout_losses`` (every layout and engine), ``caption_metrics`` and
``sample_grid`` (PP=1) every ``eval.interval`` steps; ``mtf-evaluate`` runs everything on a
checkpoint (``evaluation.cli``) and writes JSON, a sample grid, tensorboard scalars and, where
``wandb.mode`` is on, a W&B evaluation run beside the training run.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from megatron_transfusion import platform
from megatron_transfusion.batch import ImageSegment, TextSegment
from megatron_transfusion.config import ExperimentConfig, SourceConfig
from megatron_transfusion.evaluation.captions import bleu4, cider_d, tokenize
from megatron_transfusion.inference.generate import Generator, SamplingConfig


def heldout_config(cfg: ExperimentConfig, source: SourceConfig) -> ExperimentConfig:
    """``cfg`` with one held-out dataset as its only data source."""
    only = dataclasses.replace(source, weight=1.0)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=[only]))


def heldout_losses(
    evaluate, cfg: ExperimentConfig, dp_rank: int = 0, dp_size: int = 1
) -> dict[str, float]:
    """Each held-out source's losses (``heldout/<name>/...``) over ``eval.batches`` global
    batches of it, the same batches and noise at every evaluation, scored as one batch
    (L_LM the mean over all their trained tokens, so the perplexity is per token);
    ``evaluate(micro_batches)`` is the engine's forward."""
    from megatron_transfusion.data.loader import MixedModalityLoader
    from megatron_transfusion.diffusion.schedule import CosineSchedule
    from megatron_transfusion.training.step import MicroBatch

    schedule = CosineSchedule.from_config(cfg.diffusion)
    device = platform.current().device()
    report = {}
    for source in cfg.eval.sources:
        loader = MixedModalityLoader(heldout_config(cfg, source), dp_rank, dp_size)
        generator = torch.Generator().manual_seed(cfg.run.seed + 17 + dp_rank)
        micro = []
        for _ in range(cfg.eval.batches):
            for batch in loader.next_step():
                micro.append(MicroBatch.draw(batch, schedule, cfg.diffusion, generator, device))
        losses = evaluate(micro).as_dict()
        if not source.has_images:
            del losses["diffusion_loss"]  # none to score
        losses["perplexity"] = math.exp(losses["lm_loss"])
        report |= {f"heldout/{source.name}/{key}": value for key, value in losses.items()}
    return report


def _caption_samples(location: str, n: int, tokenizer) -> tuple[list[torch.Tensor], list[str]]:
    from megatron_transfusion.data.source import PreparedDataset

    dataset = PreparedDataset(location)
    if dataset.kind != "image_caption":
        raise ValueError(
            f"'{location}' holds {dataset.kind} data, not image_caption (its eval.sources kind)"
        )
    samples = [dataset[i] for i in range(min(n, len(dataset)))]
    latents = [torch.from_numpy(s["latent"].astype(np.float32)) for s in samples]
    return latents, [tokenizer.decode(s["caption"].tolist()) for s in samples]


def caption_metrics(
    model, cfg: ExperimentConfig, tokenizer, batch_size: int = 16
) -> dict[str, float]:
    """Greedy captions of ``eval.captions`` held-out images vs their captions, and the best
    constant caption (any one reference used for every image) as the baseline to beat."""
    latents, references = _caption_samples(
        cfg.eval.image_caption_data, cfg.eval.captions, tokenizer
    )
    special = tokenizer.special
    sampling = SamplingConfig(max_new_tokens=32, temperature=0.0, max_images=0, guidance_scale=1.0)
    generator = Generator(model, cfg, special, sampling, tokenizer.vocab_size)
    hypotheses = []
    for start in range(0, len(latents), batch_size):
        prompts = [
            [TextSegment([special.bos]), ImageSegment(x, caption_first=False)]
            for x in latents[start : start + batch_size]
        ]
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


def draw_images(
    model, cfg: ExperimentConfig, tokenizer, captions: list[str], scale: float, batch_size: int = 16
) -> torch.Tensor:
    """Latents for ``captions`` at guidance ``scale`` (``eval.diffusion_steps``), image i
    seeded by i: the same noise at every evaluation."""
    sampling = SamplingConfig(
        diffusion_steps=cfg.eval.diffusion_steps, guidance_scale=scale, max_new_tokens=0
    )
    generator = Generator(model, cfg, tokenizer.special, sampling)
    images = []
    for start in range(0, len(captions), batch_size):
        prompts = [
            [TextSegment([tokenizer.special.bos, *tokenizer.encode(c)])]
            for c in captions[start : start + batch_size]
        ]
        results = generator.generate(
            prompts, force_image=True, seeds=list(range(start, start + len(prompts)))
        )
        images += [s.latent for r in results for s in r if isinstance(s, ImageSegment)]
    return torch.stack(images)


def sample_grid(model, cfg: ExperimentConfig, tokenizer, vae) -> tuple[np.ndarray, str]:
    """Guided images of the first ``eval.samples`` held-out captions: one grid [H, W, 3]
    uint8 and its captions in order. The same captions and noise at every evaluation, so
    that the grids of successive steps compare."""
    from data_prep.images import from_model_range
    from megatron_transfusion.inference.images import image_grid

    _, captions = _caption_samples(cfg.eval.image_caption_data, cfg.eval.samples, tokenizer)
    latents = draw_images(model, cfg, tokenizer, captions, cfg.eval.guidance_scale)
    pixels = from_model_range(vae.decode(latents).cpu())
    return image_grid(list(pixels), columns=min(8, len(pixels))), "; ".join(captions)


def image_metrics(model, cfg: ExperimentConfig, tokenizer, vae) -> tuple[dict, dict]:
    """Images for ``eval.images`` held-out captions, guided and unconditional (guidance 0):
    caption match for both; FID, Inception score and CLIP score where weights are
    configured."""
    from megatron_transfusion.evaluation.images import (
        INCEPTION_SCORE_MIN_IMAGES,
        INCEPTION_SCORE_SPLITS,
        caption_match,
        clip_score,
        fid,
        inception_score,
    )

    e = cfg.eval
    latents, captions = _caption_samples(e.image_caption_data, e.images, tokenizer)
    real = vae.decode(torch.stack(latents)).cpu()
    generated = {
        name: vae.decode(draw_images(model, cfg, tokenizer, captions, scale)).cpu()
        for name, scale in (("guided", e.guidance_scale), ("unconditional", 0.0))
    }
    metrics = {
        "caption_match": caption_match(generated["guided"], real),
        "caption_match_unconditional": caption_match(generated["unconditional"], real),
        "images_evaluated": len(captions),
    }
    skipped = {}
    if not e.inception_weights:
        weights = "set eval.inception_weights to a local pt_inception-2015-12-05-6726825d.pth"
        skipped["fid"] = skipped["inception_score"] = f"skipped: {weights}"
    else:
        metrics["fid"] = fid(generated["guided"], real, e.inception_weights)
        if len(captions) < INCEPTION_SCORE_MIN_IMAGES:
            skipped["inception_score"] = (
                f"skipped: {len(captions)} images for {INCEPTION_SCORE_SPLITS} splits; "
                f"set eval.images ≥ {INCEPTION_SCORE_MIN_IMAGES}"
            )
        else:
            metrics["inception_score"] = inception_score(generated["guided"], e.inception_weights)
    if e.clip_model:
        metrics["clip_score"] = clip_score(generated["guided"], captions, e.clip_model)
    else:
        skipped["clip_score"] = (
            "skipped: set eval.clip_model to a local Hugging Face CLIP directory"
        )
    return metrics, {"skipped": skipped, "images": generated, "captions": captions}
