"""AdamW with weight decay only where it regularizes: ≥2-D weights that are not embeddings.

No decay on:
- every 1-D parameter: RMSNorm/LayerNorm gains and all biases (the patch layers' too);
  decaying a gain pulls it towards 0, not towards the identity it starts at.
- the word embedding (any ``nn.Embedding`` / Megatron ``VocabParallelEmbedding``): it is
  a lookup table, so rare tokens' rows would decay on every step while seldom receiving
  a gradient.

Decay on every other weight: attention and MLP matrices, the patch layers' linear and
conv kernels (timestep MLPs included), and the LM head ``output_layer.weight``, which
is untied here and is an ordinary projection; Llama and Megatron decay it too.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from megatron_transfusion.config import OptimizerConfig

_EMBEDDINGS = (nn.Embedding, VocabParallelEmbedding)


def no_decay_parameter_ids(model_chunks: list[torch.nn.Module]) -> set[int]:
    """ids of the parameters that get no weight decay (the rule above)."""
    embedding_params = {
        id(p)
        for chunk in model_chunks
        for module in chunk.modules()
        if isinstance(module, _EMBEDDINGS)
        for p in module.parameters(recurse=False)
    }
    return {
        id(p)
        for chunk in model_chunks
        for p in chunk.parameters()
        if p.ndim < 2 or id(p) in embedding_params
    }


def param_groups(model_chunks: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups over all chunks' parameters: [decayed, not decayed]."""
    exempt = no_decay_parameter_ids(model_chunks)
    decay, no_decay = [], []
    for chunk in model_chunks:
        for p in chunk.parameters():
            (no_decay if id(p) in exempt else decay).append(p)
    # wd_mult names the groups as Megatron's optimizer does: checkpoints match groups by it.
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


def build_adamw(model_chunks: list[torch.nn.Module], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """The learning rate starts at 0: the loop sets it from ``lr_at`` before every step."""
    return torch.optim.AdamW(
        param_groups(model_chunks, cfg.weight_decay),
        lr=0.0,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
