"""TransfusionModel: one Llama-style Megatron-Core transformer over text and images.

First pipeline stage: token embeddings, with image positions overwritten by the patch-in
layer's vectors. Every stage: its share of the TransformerBlock under the Transfusion
mask (built once per micro-batch from the PackedBatch and handed to the layers, with the
RoPE tables, as their ``AttentionContext``). Last stage: the tensor-parallel LM head and
the patch-out layer predicting each image's noise ε.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels.attention import build_attention_mask
from kernels.kv_cache import KVCacheView
from megatron_transfusion.batch import PackedBatch
from megatron_transfusion.config import ModelConfig
from megatron_transfusion.model.layer_spec import AttentionContext, transfusion_block_spec
from megatron_transfusion.model.patch import build_patch_layers, sincos_2d


@dataclass
class TransfusionOutput:
    """Last-stage outputs. ``token_losses`` when labels were given, else ``logits``."""

    predicted_noise: torch.Tensor  # [n, C, H, W]
    token_losses: torch.Tensor | None = None  # [b, s] cross entropy where lm_targets trains, else 0
    logits: torch.Tensor | None = None  # [s, b, vocab / TP]


class TransfusionModel(LanguageModule):
    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: ModelConfig,
        attention_backend: str,
        recompute: str = "none",
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by the pipeline schedules
        self.model_cfg = model_cfg
        self.attention_backend = attention_backend
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False
        vocab = model_cfg.padded_vocab_size
        patch_in, patch_out = build_patch_layers(model_cfg)

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab,
                max_sequence_length=model_cfg.max_sequence_length,
                position_embedding_type="rope",
                scatter_to_sequence_parallel=False,  # _embed scatters after placing the patches
            )
            self.patch_in = patch_in(model_cfg)
            grid = model_cfg.latent_size // model_cfg.patch_size
            positions = (
                sincos_2d(grid, model_cfg.hidden_size)
                if model_cfg.image_position_embedding == "sincos2d"
                else None
            )
            self.register_buffer("patch_positions", positions, persistent=False)  # fixed: not saved
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=model_cfg.rope_base,
            rope_scaling=model_cfg.rope_scaling_factor is not None,
            rope_scaling_factor=model_cfg.rope_scaling_factor or 1.0,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        self.decoder = TransformerBlock(
            config=config,
            spec=transfusion_block_spec(
                config, attention_backend, recompute, vp_stage, model_cfg.fuse_elementwise
            ),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
            )
            self.patch_out = patch_out(model_cfg)
        self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand a non-first stage its input activations here."""
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        self.decoder.set_input_tensor(input_tensor)

    def _embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings with image positions replaced by patch vectors. The patch layer
        runs even on zero images, so every parameter is in every step's graph (ZeRO-2/3
        reduce gradients by hooks, which must fire alike on every rank)."""
        hidden = self.embedding(input_ids=batch.tokens, position_ids=None)  # [s, b, h]
        rows, cols = batch.image_positions()
        patches = self.patch_in(batch.latents.to(hidden.dtype), batch.timesteps)
        if self.patch_positions is not None:
            patches = patches + self.patch_positions.to(patches.dtype)
        hidden = hidden.index_put((cols, rows), patches.reshape(-1, hidden.shape[-1]))
        if self.config.sequence_parallel:  # each TP rank keeps its slice of the sequence
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return hidden

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) per position, [s, b, 1, d]: positions restart in every document.
        Once per batch for all layers, which apply it in the core attention (Megatron's
        SelfAttention would recompute cos/sin and copy queries and keys in every layer)."""
        table = self.rotary_pos_emb(self.model_cfg.max_sequence_length)[:, 0, 0, :]
        angles = table[positions.t()].unsqueeze(2)
        return angles.cos().to(self.config.params_dtype), angles.sin().to(self.config.params_dtype)

    def _predict_noise(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """ε̂ per image from the whole sequence's hidden states [s, b, h] (the patch-out
        layer runs replicated on every TP rank)."""
        rows, cols = batch.image_positions()
        shape = (batch.num_images, self.model_cfg.patches_per_image, hidden.shape[-1])
        return self.patch_out(hidden[cols, rows].reshape(shape), batch.timesteps)

    def _text_losses(self, hidden: torch.Tensor, labels: torch.Tensor, batch: PackedBatch):
        """Cross entropy [b, s] at the positions with an LM loss (``lm_targets``), 0 elsewhere.
        The LM head runs on those positions only: image positions never have one, and they
        are about half of a row that holds an image. ``hidden`` is the whole sequence's."""
        rows, cols = torch.nonzero(batch.lm_targets()[1], as_tuple=True)
        selected = hidden[cols, rows].unsqueeze(1)  # [n, 1, h]
        if self.config.sequence_parallel:  # the head gathers its input: give it this rank's share
            tp = self.config.tensor_model_parallel_size
            selected = F.pad(selected, (0, 0, 0, 0, 0, -len(rows) % tp))
            selected = tensor_parallel.scatter_to_sequence_parallel_region(selected)
        logits, _ = self.output_layer(selected)
        losses = self.compute_language_model_loss(labels[rows, cols][None], logits[: len(rows)])
        return losses.new_zeros(labels.shape).index_put((rows, cols), losses[0])

    def forward(
        self,
        batch: PackedBatch,
        labels: torch.Tensor | None = None,
        kv_cache: KVCacheView | None = None,
        text_logits: bool = True,
    ):
        """Hidden states [s, b, h] on non-last stages, ``TransfusionOutput`` on the last.
        Generation passes a ``kv_cache`` view (``batch`` then holds only the new positions,
        masked by the view) and skips the LM head (``text_logits=False``) while denoising."""
        if kv_cache is None:
            mask = build_attention_mask(
                batch, self.attention_backend, self.model_cfg.flex_block_size
            )
        else:
            mask = kv_cache.mask
        context = AttentionContext(mask, self._rotary(batch.positions), kv_cache)
        hidden = self._embed(batch) if self.pre_process else None
        hidden = self.decoder(hidden_states=hidden, attention_mask=context)
        if not self.post_process:
            return hidden
        whole = hidden  # the heads pick positions from the whole sequence
        if self.config.sequence_parallel:
            whole = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        output = TransfusionOutput(predicted_noise=self._predict_noise(whole, batch))
        if not text_logits:
            return output
        if labels is None:
            output.logits, _ = self.output_layer(hidden)
        else:
            output.token_losses = self._text_losses(whole, labels, batch)
        return output
