"""Model construction: config -> Megatron TransformerConfig -> TransfusionModel chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.model.transfusion import TransfusionModel, TransfusionOutput
from megatron_transfusion.platform import Platform

__all__ = ["TransfusionModel", "TransfusionOutput", "build_model", "transformer_config"]


def transformer_config(cfg: ExperimentConfig, platform: Platform) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        ffn_hidden_size=m.ffn_size,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=platform.dtype,
        pipeline_dtype=platform.dtype,
        bf16=platform.dtype == torch.bfloat16,
        use_cpu_initialization=True,  # same init for every TP layout given the seed
        apply_rope_fusion=False,
        bias_activation_fusion=m.fuse_elementwise,  # Megatron's compiled SwiGLU
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=False,  # batched p2p gives wrong grads with interleaving over gloo
    )


def build_model(cfg: ExperimentConfig, platform: Platform) -> list[TransfusionModel]:
    """This rank's model chunks (one per virtual pipeline stage) on the platform device."""
    config = transformer_config(cfg, platform)
    backend = cfg.model.attention_backend
    backend = platform.attention_backend if backend == "auto" else backend
    vp_size = cfg.parallel.virtual_pipeline or 1
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = cfg.parallel.pipeline_parallel
    chunks = []
    for vp_stage in range(vp_size):
        chunk = TransfusionModel(
            config,
            cfg.model,
            backend,
            recompute=cfg.parallel.recompute,
            pre_process=pp_rank == 0 and vp_stage == 0,
            post_process=pp_rank == pp_size - 1 and vp_stage == vp_size - 1,
            vp_stage=vp_stage if cfg.parallel.virtual_pipeline else None,
        )
        chunks.append(chunk.to(device=platform.device(), dtype=platform.dtype))
    return chunks
