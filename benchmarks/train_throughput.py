"""Training throughput and MFU on this machine, as ratios measured in one run.

    python -m benchmarks.train_throughput [--steps 6] [--repeats 3]

For the tiny preset and a ~25M-parameter model (hidden 512, 8 layers, seq 512): full
training steps (forward, backward, optimizer) through the Megatron engine on synthetic
mixed batches, interleaved with fp32 GEMM peak measurements; medians are reported,
because these machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_transfusion import platform
from megatron_transfusion.config import load_config

MODELS = {
    "tiny": ["data.seq_length=256", "data.micro_batch_size=4", "data.global_batch_tokens=2048"],
    "25M": [
        "model.hidden_size=512",
        "model.num_layers=8",
        "model.num_attention_heads=8",
        "model.vocab_size=8192",
        "model.max_sequence_length=512",
        "data.seq_length=512",
        "data.micro_batch_size=4",
        "data.global_batch_tokens=2048",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megatron_transfusion.diffusion import CosineSchedule, noise_images
    from megatron_transfusion.model import build_model
    from megatron_transfusion.model.params import count_parameters
    from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
    from megatron_transfusion.platform import measure_matmul_peak
    from megatron_transfusion.synthetic import random_batch
    from megatron_transfusion.training.megatron_engine import MegatronEngine
    from megatron_transfusion.training.metrics import model_flops_per_token
    from megatron_transfusion.training.step import MicroBatch

    plat = platform.activate()
    base = load_config("tiny", ["data.sources=[]"])
    init_distributed(base.parallel, plat)
    print(f"torch threads: {torch.get_num_threads()}")
    for name, overrides in MODELS.items():
        cfg = load_config("tiny", ["data.sources=[]", *overrides])
        seed_everything(0)
        engine = MegatronEngine(cfg, plat, build_model(cfg, plat))
        generator = torch.Generator().manual_seed(0)
        schedule = CosineSchedule.from_config(cfg.diffusion)
        rows = cfg.data.global_batch_tokens // cfg.data.seq_length
        micro = [
            MicroBatch(
                *noise_images(
                    random_batch(
                        generator, cfg.model, cfg.data.micro_batch_size, cfg.data.seq_length
                    ),
                    schedule,
                    cfg.diffusion,
                    generator,
                )
            )
            for _ in range(rows // cfg.data.micro_batch_size)
        ]
        image_fraction = sum(int((m.batch.image_ids >= 0).sum()) for m in micro) / (
            rows * cfg.data.seq_length
        )
        flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_length, image_fraction)
        engine.train_step(micro, 1e-4)  # warm-up
        rates, peaks = [], []
        for _ in range(args.repeats):
            peaks.append(measure_matmul_peak(seconds=1.0))
            start = time.perf_counter()
            for _ in range(args.steps):
                engine.train_step(micro, 1e-4)
            rates.append(args.steps * cfg.data.global_batch_tokens / (time.perf_counter() - start))
        rate, peak = statistics.median(rates), statistics.median(peaks)
        params = count_parameters(cfg.model).total
        print(
            f"{name:5s} {params / 1e6:6.1f}M params | {rate:8,.0f} tokens/s | "
            f"{rate * flops_per_token / 1e9:6.1f} GFLOP/s model | "
            f"fp32 GEMM peak {peak / 1e9:6.1f} GFLOP/s | "
            f"MFU {rate * flops_per_token / peak:.1%}"
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
