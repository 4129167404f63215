"""Transfusion attention: one mask rule, two kernels.

The rule (``transfusion_mask_mod``): a query may attend a key in the same document when
the key is not later (causal), or when both lie in the same image (bidirectional inside
an image). An image trained without its caption (CFG dropout) sees only itself, so its
unconditional branch at inference needs no prefix. Padding attends only to itself, so
no row is fully masked.

The rule is written once, as a FlexAttention ``mask_mod`` over index tensors, and
materialised per batch, once, shared by every layer through ``TransfusionMask``, in the
form its backend needs:

- ``sdpa``: a dense boolean mask for SDPA (CPU path and reference);
- ``flex``: a block-sparse ``BlockMask`` for FlexAttention (GPU path): blocks the rule
  masks entirely are never computed; the kernel is compiled once per process;
- ``flash``: the rule as query runs over key intervals (``AttentionRuns``), for varlen
  kernels. Every query's keys form one interval of its row: a text query sees its
  document up to itself; an image query its document up to the image's last patch (the
  causal prefix plus its own image), or only its image when trained unconditionally;
  padding only itself. So text runs are causal varlen attention with keys = document
  start .. run end (causal aligned bottom-right, flash-attn's convention since 2.1), image
  runs full varlen attention over their interval, and padding copies its value. With
  flash-attn installed and CUDA tensors, ``flash_attn_varlen_func`` runs them (two calls
  per layer: causal and full); otherwise each run is one SDPA call, which is how the
  decomposition is checked against the dense reference on CPU (tests/test_mask.py).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_transfusion import platform
from megatron_transfusion.batch import PackedBatch

BACKENDS = ("sdpa", "flex", "flash")


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
        transfusion_mask_mod(batch),
        b,
        None,
        s,
        s,
        device=batch.tokens.device,
        BLOCK_SIZE=block_size,
    )


@dataclass(frozen=True)
class VarlenRuns:
    """Query runs and their key intervals in varlen form, over flattened [b·s] positions."""

    queries: torch.Tensor  # [total_q] flat positions, run after run
    keys: torch.Tensor  # [total_k] flat positions, run after run
    cu_queries: torch.Tensor  # [runs + 1] int32 offsets into ``queries``
    cu_keys: torch.Tensor  # [runs + 1] int32 offsets into ``keys``
    max_queries: int
    max_keys: int

    @classmethod
    def from_intervals(cls, runs: list[tuple[int, int, int, int]], device) -> VarlenRuns:
        """``runs``: (query start, query end, key start, key end) in flat positions."""

        def pack(spans):
            lengths = [end - start for start, end in spans]
            index = [i for start, end in spans for i in range(start, end)]
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            return (
                torch.tensor(index, dtype=torch.long, device=device),
                torch.tensor(offsets, dtype=torch.int32, device=device),
                max(lengths, default=0),
            )

        queries, cu_queries, max_queries = pack([(q0, q1) for q0, q1, _, _ in runs])
        keys, cu_keys, max_keys = pack([(k0, k1) for _, _, k0, k1 in runs])
        return cls(queries, keys, cu_queries, cu_keys, max_queries, max_keys)


@dataclass(frozen=True)
class AttentionRuns:
    """The mask as varlen attention calls: every query lies in exactly one of them."""

    causal: VarlenRuns  # text: bottom-right-aligned causal over the key interval
    full: VarlenRuns  # images: every key of the interval
    alone: torch.Tensor  # flat positions that see only themselves (padding)


def attention_runs(batch: PackedBatch) -> AttentionRuns:
    """Split every row into maximal runs of one (document, image) and give each run its
    key interval (see the module docstring for why one interval per query suffices)."""
    b, s = batch.tokens.shape
    document, image = batch.document_ids.cpu(), batch.image_ids.cpu()
    isolated = torch.zeros_like(image, dtype=torch.bool)
    if batch.num_images:
        isolated = (image >= 0) & batch.unconditional.cpu()[image.clamp(min=0)]
    new_document = torch.ones_like(document, dtype=torch.bool)
    new_document[:, 1:] = document[:, 1:] != document[:, :-1]
    new_run = new_document.clone()
    new_run[:, 1:] |= image[:, 1:] != image[:, :-1]
    column = torch.arange(s).expand(b, s)
    document_start = torch.where(new_document, column, 0).cummax(dim=1).values
    rows, starts = new_run.nonzero(as_tuple=True)
    last_in_row = torch.ones_like(rows, dtype=torch.bool)
    last_in_row[:-1] = rows[1:] != rows[:-1]
    ends = torch.where(last_in_row, s, starts.roll(-1))
    causal, full, alone = [], [], []
    for row, start, end, doc, img, first, iso in zip(
        rows.tolist(),
        starts.tolist(),
        ends.tolist(),
        document[rows, starts].tolist(),
        image[rows, starts].tolist(),
        document_start[rows, starts].tolist(),
        isolated[rows, starts].tolist(),
    ):
        q0, q1 = row * s + start, row * s + end
        if doc < 0:  # padding
            alone.extend(range(q0, q1))
        elif img < 0:  # text: its document up to itself
            causal.append((q0, q1, row * s + first, q1))
        else:  # an image: its document up to its last patch, or only itself
            full.append((q0, q1, q0 if iso else row * s + first, q1))
    device = batch.tokens.device
    return AttentionRuns(
        VarlenRuns.from_intervals(causal, device),
        VarlenRuns.from_intervals(full, device),
        torch.tensor(alone, dtype=torch.long, device=device),
    )


@dataclass(frozen=True)
class TransfusionMask:
    """The per-batch mask, in its backend's form."""

    backend: str
    dense: torch.Tensor | None = None  # sdpa: [b, 1, queries, keys]
    blocks: BlockMask | None = None  # flex
    runs: AttentionRuns | None = None  # flash


def build_attention_mask(
    batch: PackedBatch, backend: str, block_size: int = 128
) -> TransfusionMask:
    if backend == "sdpa":
        return TransfusionMask(backend, dense=dense_mask(batch))
    if backend == "flex":
        return TransfusionMask(backend, blocks=block_mask(batch, block_size))
    if backend == "flash":
        return TransfusionMask(backend, runs=attention_runs(batch))
    raise ValueError(f"unknown attention backend {backend!r} (choose from {BACKENDS})")


@functools.cache
def flex_kernel(compiled: bool):
    """FlexAttention compiled once per process (GPU: the fused kernel), or eager (CPU, where
    torch 2.14 has no FlexAttention backward; the forward checks the GPU path against SDPA).
    A new batch's BlockMask reuses the compiled kernel: its tensors are inputs, not
    constants (tests/test_mask.py counts the graphs); a new batch or sequence size compiles
    again (dynamic=False)."""
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: TransfusionMask,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over [b, heads, s, d] tensors; keys may have fewer (grouped) heads."""
    gqa = key.shape[1] != query.shape[1]
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask.dense, scale=scale, enable_gqa=gqa
        )
    if mask.backend == "flash":
        return split_attention(query, key, value, mask.runs, scale)
    kernel = flex_kernel(compiled=platform.current().is_gpu)
    return kernel(query, key, value, block_mask=mask.blocks, scale=scale, enable_gqa=gqa)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [s, b, heads, d], rotating halves (Megatron's non-interleaved convention;
    the same arithmetic as its unfused path, without its per-layer cos/sin and copy)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def rotary_batch_major(query, key, value, rotary: tuple[torch.Tensor, torch.Tensor] | None):
    """RoPE on queries and keys; [s, b, heads, d] in, [s, b, heads, d] views of
    [b, s, heads, d] memory out: the order SDPA's CPU kernel runs ~15% faster on, and the
    KV cache's. Compiled (kernels.elementwise), rotation and reordering are one pass."""
    if rotary is not None:
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
    return tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in (query, key, value))


def varlen_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """``flash_attn_varlen_func``'s contract, one SDPA call per run: [total, heads, d]
    tensors, causal aligned to the bottom-right corner of each run's score block."""
    out = []
    bounds = zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        mask = causal_lower_right(q1 - q0, k1 - k0) if causal else None
        qr, kr, vr = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        o = F.scaled_dot_product_attention(
            qr, kr, vr, attn_mask=mask, scale=softmax_scale, enable_gqa=kr.shape[0] != qr.shape[0]
        )
        out.append(o.transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(0, q.shape[1], v.shape[2])


def _varlen_kernel(tensor: torch.Tensor):
    if tensor.is_cuda and importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    return varlen_sdpa


def split_attention(
    query, key, value, runs: AttentionRuns, scale: float | None = None
) -> torch.Tensor:
    """The ``flash`` backend: [b, heads, s, d] in and out, computed run by run."""
    b, heads, s, _ = query.shape
    q, k, v = (
        t.permute(0, 2, 1, 3).reshape(b * s, t.shape[1], t.shape[3]) for t in (query, key, value)
    )
    kernel = _varlen_kernel(q)
    out = q.new_zeros(b * s, heads, value.shape[3])
    for r, causal in ((runs.causal, True), (runs.full, False)):
        if r.queries.numel():
            o = kernel(
                q[r.queries],
                k[r.keys],
                v[r.keys],
                r.cu_queries,
                r.cu_keys,
                r.max_queries,
                r.max_keys,
                softmax_scale=scale,
                causal=causal,
            )
            out = out.index_copy(0, r.queries, o)
    if runs.alone.numel():  # softmax over one key: the value itself
        out = out.index_copy(
            0, runs.alone, v[runs.alone].repeat_interleave(heads // v.shape[1], dim=1)
        )
    return out.reshape(b, s, heads, -1).permute(0, 2, 1, 3)
