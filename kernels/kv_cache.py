"""The KV cache of generation: keys/values of every layer for each row's slots.

A row's slot i holds its i-th sequence position. Besides keys and values, the cache keeps
the per-slot tables the Transfusion mask rule reads (document, image, isolated), so the
mask of any new queries is derived from the same rule as in training
(``kernels.attention.position_mask_mod``) instead of a second hand-written one.

An image being denoised is written to the same slots at every diffusion step: its keys
and values replace the previous noise level's, which is therefore never attended to.
"""

from __future__ import annotations

import torch

from kernels.attention import TransfusionMask, position_mask_mod


class KVCache:
    def __init__(self, rows: int, capacity: int, device: torch.device):
        self.capacity = capacity
        self.document = torch.full((rows, capacity), -1, dtype=torch.long, device=device)
        self.image = torch.full((rows, capacity), -1, dtype=torch.long, device=device)
        self.isolated = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # [rows, capacity, heads, d]

    def view(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        document: torch.Tensor,
        image: torch.Tensor,
        isolated: torch.Tensor,
    ) -> KVCacheView:
        """Record what ``slots`` [len(rows), q] of ``rows`` will hold and return the view
        through which the model's layers write their keys/values there, with the mask of
        queries at those slots (attending to slots 0..max(slots) of their rows)."""
        if int(slots.max()) >= self.capacity:
            raise ValueError(f"generation needs more than the cache's {self.capacity} positions")
        r = rows[:, None]
        self.document[r, slots] = document
        self.image[r, slots] = image
        self.isolated[r, slots] = isolated
        keys = int(slots.max()) + 1
        mask_mod = position_mask_mod(self.document[rows], self.image[rows], self.isolated[rows])
        batch = torch.arange(len(rows), device=slots.device)[:, None, None]
        dense = mask_mod(batch, 0, slots[:, :, None], torch.arange(keys, device=slots.device))
        return KVCacheView(self, rows, slots, keys, TransfusionMask("sdpa", dense=dense[:, None]))


class KVCacheView:
    """One forward's window into the cache: which rows, which slots it writes, and the
    mask of its queries over the keys they see."""

    def __init__(
        self,
        cache: KVCache,
        rows: torch.Tensor,
        slots: torch.Tensor,
        keys: int,
        mask: TransfusionMask,
    ):
        self.cache, self.rows, self.slots, self.keys, self.mask = cache, rows, slots, keys, mask

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store this layer's [q, b, heads, d] keys/values; return all keys/values of the
        rows' first ``keys`` slots, [keys, b, heads, d], for attention."""
        cache = self.cache
        if layer not in cache.layers:
            shape = (cache.document.shape[0], cache.capacity, *key.shape[2:])
            cache.layers[layer] = tuple(
                torch.zeros(shape, dtype=key.dtype, device=key.device) for _ in "kv"
            )
        stored_keys, stored_values = cache.layers[layer]
        r = self.rows[:, None]
        stored_keys[r, self.slots] = key.transpose(0, 1)
        stored_values[r, self.slots] = value.transpose(0, 1)
        window = slice(0, self.keys)
        return (
            stored_keys[self.rows, window].transpose(0, 1),
            stored_values[self.rows, window].transpose(0, 1),
        )
