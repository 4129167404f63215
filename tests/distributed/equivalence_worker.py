"""Runs under torchrun: one training step of a small Transfusion model in some TP/PP
layout, to be compared with the same step at TP=1/PP=1.

The step's micro-batches are uneven (the first holds text alone, the others images too,
in different numbers), so their losses add up to the global batch's only if L_LM and
L_DDPM are normalised by the global batch's token and image counts.

``--layout reference`` (1 process): save the initial weights w0, run the step on the
same samples as ONE micro-batch, apply p -= grad, save w1_reference, record the loss.
Any other layout: load w0 through dist-checkpointing (resharding it to this layout),
run the same step, apply p -= grad, save w1_<layout>; then re-form the world as TP=1
and compare the two w1 checkpoints (so grads are compared as w0 - w1) on rank 0.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from checkpoints.sharded import load_sharded, model_sharded_state_dict, save_sharded
from megatron_transfusion import platform
from megatron_transfusion.batch import PackedBatch, TextSegment, pack_documents
from megatron_transfusion.config import load_config
from megatron_transfusion.diffusion import CosineSchedule, noise_images
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
from megatron_transfusion.synthetic import SPECIAL, random_documents
from megatron_transfusion.training.step import MicroBatch, batch_losses, forward_backward

OVERRIDES = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.vocab_size=200",
    "model.make_vocab_size_divisible_by=8",
    "model.max_sequence_length=96",
    "model.latent_size=4",
    "model.patch_size=2",
    "model.patch_layer=unet",
    "model.unet_channels=[8, 16]",
    "model.unet_blocks_per_level=1",
    "model.timestep_frequency_dim=16",
    "data.seq_length=96",
    "data.micro_batch_size=2",
    "data.global_batch_tokens=384",
    "diffusion.caption_dropout=0.5",
]
NUM_MICRO_BATCHES = 2


def sample_batch(generator, cfg, text_only: bool = False) -> PackedBatch:
    """Random mixed documents per row, or only their text documents (no image, fewer tokens)."""
    m = cfg.model
    rows = [
        random_documents(generator, m, cfg.data.seq_length)
        for _ in range(cfg.data.micro_batch_size)
    ]
    if text_only:
        rows = [
            [doc for doc in row if all(isinstance(s, TextSegment) for s in doc)] for row in rows
        ]
    return pack_documents(
        rows,
        cfg.data.seq_length,
        m.patches_per_image,
        (m.latent_channels, m.latent_size, m.latent_size),
        SPECIAL,
    )


def micro_batches(cfg, seed: int = 7) -> list[MicroBatch]:
    """The first text only, the others with images."""
    generator = torch.Generator().manual_seed(seed)
    schedule = CosineSchedule.from_config(cfg.diffusion)
    out = []
    for i in range(NUM_MICRO_BATCHES):
        batch = sample_batch(generator, cfg, text_only=i == 0)
        out.append(MicroBatch(*noise_images(batch, schedule, cfg.diffusion, generator)))
    return out


def one_batch(micro_batches: list[MicroBatch]) -> MicroBatch:
    """The micro-batches' rows as one micro-batch (images renumbered in row-major order)."""
    batches = [m.batch for m in micro_batches]
    offsets = torch.tensor([0, *(b.num_images for b in batches)]).cumsum(0)
    image_ids = [
        torch.where(b.image_ids >= 0, b.image_ids + offset, -1)
        for b, offset in zip(batches, offsets)
    ]
    fields = {
        name: torch.cat([getattr(b, name) for b in batches])
        for name in (
            "tokens",
            "positions",
            "document_ids",
            "latents",
            "timesteps",
            "caption_first",
            "unconditional",
            "given",
        )
    }
    noise = torch.cat([m.noise for m in micro_batches])
    return MicroBatch(PackedBatch(image_ids=torch.cat(image_ids), **fields), noise)


def train_step(cfg, chunks, reference: bool):
    batches = micro_batches(cfg)
    reports = forward_backward(
        chunks, [one_batch(batches)] if reference else batches, cfg.diffusion.loss_weight
    )
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                if p.grad is not None:
                    p -= p.grad
    return batch_losses(reports).as_dict() if reports else None


def load_model_shards(chunks, directory: Path) -> None:
    """Fill model chunks, in any layout, from a save of ``model_sharded_state_dict``."""
    state = load_sharded(model_sharded_state_dict(chunks), directory)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"])


def full_state(cfg, plat, directory: Path) -> dict:
    (model,) = build_model(cfg, plat)
    load_model_shards([model], directory)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True)  # reference | tp2 | pp2 | tp2pp2 | pp2vpp2
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    layouts = {
        "reference": (1, 1, None),
        "tp2": (2, 1, None),
        "pp2": (1, 2, None),
        "tp2pp2": (2, 2, None),
        "pp2vpp2": (1, 2, 2),
    }
    tp, pp, vpp = layouts[args.layout]
    plat = platform.activate()
    base = load_config("tiny", OVERRIDES)
    cfg = load_config(
        "tiny",
        OVERRIDES
        + [
            f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}",
            f"parallel.virtual_pipeline={vpp or 'null'}",
        ],
    )
    init_distributed(cfg.parallel, plat)
    seed_everything(1234)
    chunks = build_model(cfg, plat)
    if args.layout == "reference":
        save_sharded(model_sharded_state_dict(chunks), args.workdir / "w0")
    else:
        load_model_shards(chunks, args.workdir / "w0")
    report = train_step(cfg, chunks, reference=args.layout == "reference")
    save_sharded(model_sharded_state_dict(chunks), args.workdir / f"w1_{args.layout}")
    if report is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        (args.workdir / f"loss_{args.layout}.json").write_text(json.dumps(report))
    if args.layout == "reference":
        return destroy_distributed()

    parallel_state.destroy_model_parallel()
    init_distributed(base.parallel, plat)
    w0 = full_state(base, plat, args.workdir / "w0")
    reference = full_state(base, plat, args.workdir / "w1_reference")
    ours = full_state(base, plat, args.workdir / f"w1_{args.layout}")
    if dist.get_rank() == 0:
        grad_diff = {k: float(((w0[k] - reference[k]) - (w0[k] - ours[k])).abs().max()) for k in w0}
        grad_max = {k: float((w0[k] - reference[k]).abs().max()) for k in w0}
        (args.workdir / f"compare_{args.layout}.json").write_text(
            json.dumps({"grad_diff": grad_diff, "grad_max": grad_max})
        )
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
