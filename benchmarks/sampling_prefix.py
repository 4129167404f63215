"""Cost of drawing one image after a long vs a short prompt, as ratios from one run.

    python -m benchmarks.sampling_prefix [--steps 25] [--repeats 3]

A ~25M-parameter model (hidden 512, 8 layers; random weights: cost does not depend on
them) with paper-sized images (32×32×8 latents, 2×2 patches: 256 positions). With the KV
cache the prompt is encoded once and every diffusion step runs the 256 image queries
(and their unconditional twins, which never read the prompt); what a long prompt adds is
attention to its keys, plus encoding the prompt once (which the per-step ratio leaves out:
it matters less the more steps are run). The uncached rows recompute the whole sequence
every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_transfusion import platform
from megatron_transfusion.batch import SpecialTokens, TextSegment
from megatron_transfusion.config import load_config

MODEL = [
    "model.hidden_size=512",
    "model.num_layers=8",
    "model.num_attention_heads=8",
    "model.vocab_size=8192",
    "model.max_sequence_length=2048",
    "model.latent_size=32",
    "model.patch_size=2",
    "data.seq_length=2048",
    "data.global_batch_tokens=8192",
    "data.sources=[]",
    "eval.interval=0",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25, help="diffusion steps per image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megatron_transfusion.inference.generate import Generator, SamplingConfig
    from megatron_transfusion.model import build_model
    from megatron_transfusion.parallel import init_distributed, seed_everything

    plat = platform.activate()
    cfg = load_config("tiny", MODEL)
    init_distributed(cfg.parallel, plat)
    seed_everything(0)
    (model,) = build_model(cfg, plat)
    special = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)
    prompts = {length: [TextSegment([1, *range(10, 9 + length)])] for length in (10, 1000)}

    def seconds(length: int, use_cache: bool, steps: int) -> tuple[float, float]:
        """(whole generation, one diffusion step): the step excludes the one-time prefill."""
        sampling = SamplingConfig(
            max_new_tokens=0, diffusion_steps=steps, guidance_scale=5.0, use_cache=use_cache
        )
        marks = []
        started = time.perf_counter()
        Generator(model, cfg, special, sampling).generate(
            [prompts[length]],
            force_image=True,
            progress=lambda step, total: marks.append(time.perf_counter()),
        )
        return time.perf_counter() - started, (marks[-1] - marks[0]) / (len(marks) - 1)

    seconds(10, True, 2)  # warm-up
    print(
        f"torch threads: {torch.get_num_threads()}; "
        f"{cfg.model.patches_per_image} patches per image, "
        f"guidance on (two branches per step)"
    )
    for use_cache, steps in ((True, args.steps), (False, max(3, args.steps // 5))):
        times = {length: [] for length in prompts}
        for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
            for length in prompts:
                times[length].append(seconds(length, use_cache, steps))
        (short, short_step), (long, long_step) = (
            [statistics.median(t[i] for t in times[length]) for i in (0, 1)] for length in prompts
        )
        name = "cached  " if use_cache else "uncached"
        print(
            f"{name} {steps:3d} steps: 10-token prompt {short:6.2f} s ({short_step:.3f} s/step) | "
            f"1000-token prompt {long:6.2f} s ({long_step:.3f} s/step) | ratio {long / short:.2f}x "
            f"({long_step / short_step:.2f}x per diffusion step)"
        )


if __name__ == "__main__":
    main()
