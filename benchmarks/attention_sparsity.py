"""How much of the attention a FlexAttention BlockMask skips for paper-like sequences.

    python -m benchmarks.attention_sparsity [--seq 4096] [--block 128] [--rows 64]

Rows of 4096 tokens packed with text documents and caption–image documents (256 patches
per image, 2×2 patches of 32×32×8 latents), 1–4 images per row. Reports the fraction of
128×128 blocks that are fully masked (never computed) and the FLOP saving against a dense
s×s attention and against a plain causal mask (which already skips ~half).
"""

from __future__ import annotations

import argparse

import torch

from kernels.attention import block_mask
from megatron_transfusion.batch import ImageSegment, SpecialTokens, TextSegment, pack_documents
from megatron_transfusion.config import ModelConfig

SPECIAL = SpecialTokens(pad=0, bos=3, eos=4, boi=1, eoi=2)


def paper_like_row(generator: torch.Generator, cfg: ModelConfig, seq: int, images: int) -> list:
    """``images`` caption–image documents plus text documents filling the rest."""
    image_len = cfg.patches_per_image + 2
    documents, used = [], 0
    for _ in range(images):
        caption = int(torch.randint(10, 60, (1,), generator=generator))
        documents.append([TextSegment([5] * caption), ImageSegment(torch.zeros(8, 32, 32))])
        used += caption + image_len
    while used < seq:
        length = min(int(torch.randint(200, 2000, (1,), generator=generator)), seq - used)
        documents.append([TextSegment([5] * length)])
        used += length
    order = torch.randperm(len(documents), generator=generator).tolist()
    return [documents[i] for i in order]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    cfg = ModelConfig()  # 32×32×8 latents, patch 2: 256 patches
    generator = torch.Generator().manual_seed(0)
    blocks = args.seq // args.block
    causal_blocks = blocks * (blocks + 1) // 2
    print(
        f"seq {args.seq}, block {args.block}: {blocks * blocks} blocks dense, "
        f"{causal_blocks} causal"
    )
    for images in (1, 2, 4):
        rows = [paper_like_row(generator, cfg, args.seq, images) for _ in range(args.rows)]
        batch = pack_documents(rows, args.seq, cfg.patches_per_image, (8, 32, 32), SPECIAL)
        mask = block_mask(batch, args.block)
        computed = int(
            (
                mask.kv_num_blocks
                + (mask.full_kv_num_blocks if mask.full_kv_num_blocks is not None else 0)
            ).sum()
        )
        per_row = computed / args.rows
        print(
            f"{images} image(s)/row: {per_row:7.1f} blocks computed per row | skipped "
            f"{1 - per_row / (blocks * blocks):6.1%} of dense, {1 - per_row / causal_blocks:6.1%} "
            f"of causal | attention FLOPs ×{per_row / (blocks * blocks):.3f} of dense"
        )


if __name__ == "__main__":
    main()
