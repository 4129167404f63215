"""Transfusion attention: one mask rule, two kernels.

The rule (``transfusion_mask_mod``): a query may attend a key in the same document when
the key is not later (causal), or when both lie in the same image (bidirectional inside
an image). An image trained without its caption (CFG dropout) sees only itself, so its
unconditional branch at inference needs no prefix. Padding attends only to itself, so
no row is fully masked.

The rule is written once, as a FlexAttention ``mask_mod`` over index tensors, and
materialised either as a dense boolean mask for SDPA (CPU path and reference) or as a
block-sparse ``BlockMask`` (GPU path). Either is built once per batch and shared by
every layer through ``TransfusionMask``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_transfusion import platform
from megatron_transfusion.batch import PackedBatch

if TYPE_CHECKING:
    from megatron_transfusion.inference.kv_cache import KVCacheView

BACKENDS = ("sdpa", "flex")


def transfusion_mask_mod(batch: PackedBatch):
    """mask_mod(b, h, q, kv) -> True where query q may attend key kv."""
    image = batch.image_ids
    # Per position: it belongs to an image that must not see its context.
    isolated = torch.zeros_like(image, dtype=torch.bool)
    if batch.num_images:
        isolated = (image >= 0) & batch.unconditional[image.clamp(min=0)]
    return position_mask_mod(batch.document_ids, image, isolated)


def position_mask_mod(document: torch.Tensor, image: torch.Tensor, isolated: torch.Tensor):
    """The rule over per-position tables [b, s]: document (-1 = padding), image (-1 = text;
    only compared within a row) and isolated (an image position that sees only its image).
    Training reads the tables from a PackedBatch, generation from its KV cache."""

    def mask_mod(b, h, q, kv):
        same_document = (document[b, q] == document[b, kv]) & (document[b, q] >= 0)
        same_image = (image[b, q] >= 0) & (image[b, q] == image[b, kv])
        causal = (kv <= q) & ~isolated[b, q]
        return (q == kv) | (same_document & (causal | same_image))

    return mask_mod


def dense_mask(batch: PackedBatch) -> torch.Tensor:
    """[b, 1, s, s] boolean, True = may attend (SDPA's convention, not Megatron's)."""
    b, s = batch.tokens.shape
    device = batch.tokens.device
    mask_mod = transfusion_mask_mod(batch)
    rows = torch.arange(b, device=device)[:, None, None]
    q = torch.arange(s, device=device)[None, :, None]
    kv = torch.arange(s, device=device)[None, None, :]
    return mask_mod(rows, 0, q, kv)[:, None]


def block_mask(batch: PackedBatch, block_size: int = 128) -> BlockMask:
    b, s = batch.tokens.shape
    return create_block_mask(
        transfusion_mask_mod(batch), b, None, s, s, device=batch.tokens.device,
        BLOCK_SIZE=block_size,
    )  # fmt: skip


@dataclass(frozen=True)
class TransfusionMask:
    """The per-batch mask travelling through Megatron's layers, in its backend's form."""

    backend: str
    dense: torch.Tensor | None = None  # sdpa: [b, 1, queries, keys]
    blocks: BlockMask | None = None  # flex
    # Generation: the layers store this step's keys/values here and attend to all of them.
    kv_cache: KVCacheView | None = None


def build_attention_mask(batch: PackedBatch, backend: str, block_size: int = 128) -> TransfusionMask:
    if backend == "sdpa":
        return TransfusionMask(backend, dense=dense_mask(batch))
    if backend == "flex":
        return TransfusionMask(backend, blocks=block_mask(batch, block_size))
    raise ValueError(f"unknown attention backend {backend!r} (choose from {BACKENDS})")


@functools.cache
def _flex_kernel():
    # Compiled once per process on GPU (the fused kernel); eager on CPU, where only the
    # forward is supported and is used to check the GPU path against SDPA.
    return torch.compile(flex_attention, dynamic=False) if platform.current().is_gpu else flex_attention


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: TransfusionMask,
    scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention over [b, heads, s, d] tensors; keys may have fewer (grouped) heads."""
    gqa = key.shape[1] != query.shape[1]
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask.dense, scale=scale, enable_gqa=gqa
        )
    return _flex_kernel()(query, key, value, block_mask=mask.blocks, scale=scale, enable_gqa=gqa)
