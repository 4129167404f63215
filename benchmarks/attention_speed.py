"""Attention forward time per backend at several sequence lengths, on this machine.

    python -m benchmarks.attention_speed [--seqs 512,1024,2048,4096] [--images 2] [--repeats 5]

Rows packed like ``benchmarks.attention_sparsity`` (text documents plus caption–image
documents, 256 patches per image), 8 heads of 64 (width 512), one row. Backends, each on
the same q, k, v and mask rule:

- ``sdpa``: dense boolean mask, torch SDPA (the CPU training path and the reference);
- ``flex eager``: FlexAttention without compile. On CPU this is torch's reference
  implementation (it materialises every score); it is NOT the GPU kernel;
- ``flex compiled``: FlexAttention under torch.compile; on CPU, inductor's C++ template
  (block-sparse, forward only), again not the GPU (Triton) kernel;
- ``split``: the ``flash`` backend's run decomposition with one SDPA call per run (what runs
  where flash-attn is absent); on a GPU with flash-attn the same runs go to its varlen kernel.

Mask construction (once per batch, shared by all layers) is timed separately. Timings are
medians of interleaved repeats; ratios are against ``sdpa`` at the same length.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from benchmarks.attention_sparsity import SPECIAL, paper_like_row
from kernels.attention import attend, build_attention_mask, flex_kernel
from megatron_transfusion.batch import pack_documents
from megatron_transfusion.config import ModelConfig

HEADS, HEAD_DIM = 8, 64


def timed(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", default="512,1024,2048,4096")
    parser.add_argument(
        "--images", type=int, default=2, help="images per row (fewer where they do not fit)"
    )
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-eager", action="store_true", help="skip eager flex (slow, s² memory)")
    args = parser.parse_args()
    cfg = ModelConfig()  # 32×32×8 latents in 2×2 patches: 256 per image
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{HEADS} heads × {HEAD_DIM}, "
        f"block {args.block}, forward only; flex on CPU is not the GPU kernel"
    )
    compiled = flex_kernel(compiled=True)
    for seq in (int(s) for s in args.seqs.split(",")):
        generator = torch.Generator().manual_seed(seq)
        images = min(args.images, (seq - 20) // (cfg.patches_per_image + 2 + 60))
        row = paper_like_row(generator, cfg, seq, images)
        batch = pack_documents([row], seq, cfg.patches_per_image, (8, 32, 32), SPECIAL)
        q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, generator=generator) for _ in range(3))
        masks = {
            name: build_attention_mask(batch, name, args.block)
            for name in ("sdpa", "flex", "flash")
        }
        build = {
            name: timed(partial(build_attention_mask, batch, name, args.block), 3) for name in masks
        }
        methods = {
            "sdpa": partial(attend, q, k, v, masks["sdpa"]),
            "flex compiled": partial(compiled, q, k, v, block_mask=masks["flex"].blocks),
            "split": partial(attend, q, k, v, masks["flash"]),
        }
        if not args.no_eager:
            methods["flex eager"] = partial(
                flex_kernel(compiled=False), q, k, v, block_mask=masks["flex"].blocks
            )
        reference = methods["sdpa"]()
        for name, fn in methods.items():  # warm-up (compiles) and check
            torch.testing.assert_close(fn(), reference, atol=1e-4, rtol=1e-4, msg=name)
        times = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times[name].append(timed(fn))
        median = {name: statistics.median(t) for name, t in times.items()}
        blocks = masks["flex"].blocks
        dense_blocks = (seq // args.block) ** 2
        computed = int(
            blocks.kv_num_blocks.sum()
            + (blocks.full_kv_num_blocks.sum() if blocks.full_kv_num_blocks is not None else 0)
        )
        print(
            f"seq {seq:5d}, {images} image(s), {computed}/{dense_blocks} blocks computed "
            f"| mask build: dense {build['sdpa'] * 1e3:.1f} ms, "
            f"BlockMask {build['flex'] * 1e3:.1f} ms, "
            f"runs {build['flash'] * 1e3:.1f} ms"
        )
        for name, t in median.items():
            print(f"    {name:14s} {t * 1e3:9.1f} ms   ×{median['sdpa'] / t:5.2f} vs sdpa")


if __name__ == "__main__":
    main()
