"""Data loader speed vs what the trainer consumes, measured in one run.

    python benchmarks/loader_throughput.py [--config tiny] [--steps 20]

Prepares the built-in data if needed, then times (a) the loader producing global batches
(planning + reading + packing) and (b) forward+backward of the model on those batches,
and prints both rates and their ratio (> 1: the loader keeps up).
"""

from __future__ import annotations

import argparse
import time

from megatron_transfusion import platform
from megatron_transfusion.config import load_config, sources_override


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from data_prep.prepare_builtin import prepare_builtin

    paths = prepare_builtin(args.data)
    cfg = load_config(
        args.config,
        [
            sources_override(paths["text_train"], paths["images_train"]),
            *args.overrides,
        ],
    )
    from megatron_transfusion.data import MixedModalityLoader
    from megatron_transfusion.diffusion import CosineSchedule, noise_images
    from megatron_transfusion.model import build_model
    from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
    from megatron_transfusion.training.step import MicroBatch, forward_backward

    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    seed_everything(cfg.run.seed)
    loader = MixedModalityLoader(cfg)
    loader.next_step()  # warm the page cache
    start = time.perf_counter()
    steps = [loader.next_step() for _ in range(args.steps)]
    load_seconds = time.perf_counter() - start
    tokens = args.steps * cfg.data.global_batch_tokens
    rows = sum(b.tokens.shape[0] for step in steps for b in step)
    samples = sum(
        int(b.document_ids.max(dim=1).values.add(1).sum()) for step in steps for b in step
    )

    (model,) = build_model(cfg, plat)
    import torch

    generator = torch.Generator().manual_seed(0)
    schedule = CosineSchedule.from_config(cfg.diffusion)
    prepared = [
        [MicroBatch(*noise_images(b, schedule, cfg.diffusion, generator)) for b in step]
        for step in steps
    ]
    forward_backward([model], prepared[0], cfg.diffusion.loss_weight)  # warm-up
    start = time.perf_counter()
    for micro_batches in prepared[1:]:
        forward_backward([model], micro_batches, cfg.diffusion.loss_weight)
    train_seconds = time.perf_counter() - start
    destroy_distributed()

    load_rate = tokens / load_seconds
    train_rate = (args.steps - 1) * cfg.data.global_batch_tokens / train_seconds
    print(
        f"loader : {load_rate:12,.0f} tokens/s  {samples / load_seconds:9,.0f} samples/s  "
        f"({rows} sequences of {cfg.data.seq_length})"
    )
    print(f"trainer: {train_rate:12,.0f} tokens/s  (forward+backward, {cfg.run.name})")
    print(f"ratio loader/trainer: {load_rate / train_rate:.1f}x")


if __name__ == "__main__":
    main()
