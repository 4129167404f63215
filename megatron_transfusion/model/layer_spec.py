"""The Llama-style layer as a Megatron-Core ModuleSpec: RMSNorm, SwiGLU, RoPE, and the
Transfusion core attention in place of Megatron's DotProductAttention. Sequence parallelism
comes with Megatron's linear layers (gather before, reduce-scatter after); the norms here
support it.

Activation recomputation lives here too, as torch's non-reentrant checkpoint around the
layer ("full") or the core attention ("selective"): Megatron's own recompute saves its
inputs with ``save_for_backward``, which cannot carry the per-forward attention context."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch.utils.checkpoint import checkpoint

from kernels.attention import TransfusionMask, attend, rotary_batch_major
from kernels.elementwise import fusable, rms_norm
from kernels.kv_cache import KVCacheView


@dataclass(frozen=True)
class AttentionContext:
    """What every layer's core attention needs for one forward, built once by the model and
    passed through Megatron's TransformerBlock as its ``attention_mask``."""

    mask: TransfusionMask
    # RoPE (cos, sin), [s, b, 1, head_dim]: computed once per batch, applied by every layer.
    rotary: tuple[torch.Tensor, torch.Tensor]
    # Generation: the layers store this forward's keys/values here and attend to all of them.
    kv_cache: KVCacheView | None = None


class TransfusionCoreAttention(MegatronModule):
    """Megatron core-attention adapter: [s, b, heads, d] in, [s, b, heads·d] out.

    ``backend`` (a spec param) names the kernel; the mask of the per-forward
    ``AttentionContext`` that TransformerBlock passes through untouched must have been
    built for it. ``fused``: RoPE and the reordering of queries/keys/values run compiled.
    """

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        backend: str,
        recompute: bool = False,
        fused: bool = False,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.attention_dropout:
            raise ValueError("attention dropout is not supported by the Transfusion attention")
        self.backend = backend
        self.recompute = recompute
        self.rotary_batch_major = fusable(rotary_batch_major, fused)
        self.layer_number = layer_number  # names this layer's slot in a generation KV cache
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query,
        key,
        value,
        attention_mask: AttentionContext,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("Transfusion attention takes its mask from the PackedBatch only")
        context, mask = attention_mask, attention_mask.mask
        query, key, value = self.rotary_batch_major(query, key, value, context.rotary)
        if context.kv_cache is not None:  # generation: a few queries, dense mask
            key, value = context.kv_cache.update(self.layer_number, key, value)
        elif mask.backend != self.backend:
            raise ValueError(f"mask built for {mask.backend!r}, layer uses {self.backend!r}")
        # [b, heads, s, d] views of [b, s, heads, d] memory (rotary_batch_major, KV cache)
        q, k, v = (t.transpose(0, 1).transpose(1, 2) for t in (query, key, value))
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(attend, q, k, v, mask, self.softmax_scale, use_reentrant=False)
        else:
            out = attend(q, k, v, mask, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as a Megatron norm module, compiled when ``fused``. Under sequence
    parallelism each TP rank normalises its slice of the sequence, so the weight is marked
    for Megatron to sum its gradient over TP ranks (Megatron's own torch-norm wrapper
    refuses sequence parallelism)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, fused: bool = False, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
        self.rms_norm = fusable(rms_norm, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, self.weight, self.eps)


class RecomputedTransformerLayer(TransformerLayer):
    """Keeps only the layer's input; its activations are recomputed in backward."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def transfusion_layer_spec(
    attention_backend: str, recompute: str = "none", fused: bool = False
) -> ModuleSpec:
    """``fused``: compiled norms and RoPE here; SwiGLU is Megatron's own fused kernel
    (``bias_activation_fusion`` in the TransformerConfig)."""
    norm = ModuleSpec(module=RMSNorm, params={"fused": fused})
    return ModuleSpec(
        module=RecomputedTransformerLayer if recompute == "full" else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ModuleSpec(
                        module=TransfusionCoreAttention,
                        params={
                            "backend": attention_backend,
                            "recompute": recompute == "selective",
                            "fused": fused,
                        },
                    ),
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def transfusion_block_spec(
    config,
    attention_backend: str,
    recompute: str = "none",
    vp_stage: int | None = None,
    fused: bool = False,
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (or virtual stage) plus the final RMSNorm."""
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    spec = transfusion_layer_spec(attention_backend, recompute, fused)
    norm = ModuleSpec(module=RMSNorm, params={"fused": fused})
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=norm)
