"""Parameter counts from a config alone (no model is built), for sizing and planning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_transfusion.config import ModelConfig
from megatron_transfusion.model.patch import build_patch_layers


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    transformer: int  # all layers plus the final norm
    lm_head: int
    patch_layers: int  # patch-in + patch-out

    @property
    def language_model(self) -> int:
        """What the paper's size names count: the transformer with its embeddings."""
        return self.embedding + self.transformer + self.lm_head

    @property
    def total(self) -> int:
        return self.language_model + self.patch_layers


def transformer_layer_parameters(cfg: ModelConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    attention = h * (cfg.num_attention_heads + 2 * cfg.query_groups) * d  # fused QKV
    attention += cfg.num_attention_heads * d * h  # output projection
    mlp = h * 2 * cfg.ffn_size + cfg.ffn_size * h  # SwiGLU: gate+up, down
    norms = 2 * h
    return attention + mlp + norms


def patch_layer_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only, no memory
        layers = [layer(cfg) for layer in build_patch_layers(cfg)]
    return sum(p.numel() for layer in layers for p in layer.parameters())


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    vocab_rows = cfg.padded_vocab_size * cfg.hidden_size
    return ParameterCount(
        embedding=vocab_rows,
        transformer=cfg.num_layers * transformer_layer_parameters(cfg) + cfg.hidden_size,
        lm_head=vocab_rows,
        patch_layers=patch_layer_parameters(cfg),
    )
