"""The memory model: bytes per GPU of a layout.

Memory, bytes per GPU, for the first and the last pipeline stage (the larger is
reported; middle stages hold less than the first). e = compute dtype bytes (bf16 on GPU,
fp32 on CPU, as ``platform.py`` picks), N = parameters of the stage's TP shard
(``count_parameters``; patch-in and patch-out counted as half each), d = DP size:

- Megatron engine: parameters e·N; gradients 4·N (``grad_reduce_in_fp32``: an fp32
  buffer); Adam m, v (8 B) plus an fp32 master copy when e < 4, divided by d under the
  distributed optimizer (ZeRO-1). bf16: 6 + 12/d B/param (ZeRO-1) or 18; fp32: 8 + 8/d.
- DeepSpeed engine: parameters e·N (ZeRO-3: /d), gradients e·N (ZeRO-2/3: /d), and
  16·N/d of fp32 master, Adam m, v and the fp32 gradient partition of the step, plus its
  default buckets (ZeRO-2/3: 5e8-element reduce bucket; ZeRO-3: 1e9 live parameters).
- Activations per layer and micro-batch, in elements (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", §4: count the tensors autograd
  keeps for backward), for this project's Llama layer; s, b, h, d = head dim, a heads,
  g query groups, f FFN width, t = TP, r = t with sequence parallelism, else 1:

      none:      s·b·6h/r + s·b·((a+2g)·d + 2a·d + 5f)/t
      selective: a·d less (the attention output)
      full:      s·b·h/r  (the layer input; one layer is rebuilt at a time)
      fused elementwise (``model.fuse_elementwise``): 4h/r for 6h/r and 3f for 5f

  plus RoPE's cos and sin, 2·s·b·d per micro-batch, shared by the layers. 6h: both
  RMSNorms keep input and normalised output (compiled: the input only), QKV and FC1 keep
  their inputs (replicated over TP, or sequence slices under SP); (a+2g)·d: rotated
  queries, keys and values in the attention kernel's [b, s] order; a·d: the attention
  output, and a·d its copy in Megatron's order that the projection keeps; 5f: SwiGLU
  keeps FC1's output (2f), two f-wide intermediates (compiled: none), and FC2's input.
  Neither kernel keeps the s×s scores
  (SDPA's CPU kernel and FlexAttention keep a log-sum-exp), so Korthikanti's 5as/h term
  and what selective recompute saves there do not apply; what selective recompute does
  save here is the mask below. Read off a real layer's saved tensors (autograd's
  saved-tensor hooks) and checked against the measured peak memory of CPU training steps
  (benchmarks/peak_memory.py, tests/test_plan.py).
- The attention mask: on the SDPA path (CPU) a [b,1,s,s] boolean per micro-batch, which
  SDPA turns into an additive mask of the compute dtype that every layer keeps (b·s²·e
  per layer, dropped by selective recompute); on the flex path (GPU) a BlockMask of a few
  int32 tables of b·(s/128)² entries: negligible.
- In flight: a micro-batch's activations live until its backward. PP=1: one; 1F1B: the
  first stage holds p; interleaved: Megatron's warm-up count, 2(p-1) + (v-1)p (+1), of
  chunk micro-batches of L/(p·v) layers (``schedules.get_pp_rank_microbatches``).
- Per stage once: patch-in (first) / patch-out (last) activations per image, counted from
  the modules' saved tensors on the meta device; final norm and LM-head input (2·s·b·h/r,
  fused 1·s·b·h/r, + x·s·b·h, x the text fraction of positions); each non-last stage keeps
  its output until the backward (``deallocate_pipeline_outputs`` is off). Transient peak,
  the larger of: the LM head, which runs on text positions only (fp32 logits kept by the
  vocab-parallel cross entropy, plus the compute-dtype logits when they are a separate
  tensor, plus the head's weight gradient) and a layer (its activation gradients
  s·b·(h + 2f/t), the FC1 weight gradient, and under full recompute its rebuilt
  activations).
- Framework: a fixed allowance per cluster (GPU: CUDA context, NCCL and cuBLAS buffers;
  CPU: measured) plus a fraction of the activations for allocator fragmentation.
- The micro-batch: the most demanding one the packer can make, not the average of the
  data mix. Rows come out nearly all text or all images (a long document fills rows; the
  CPU rehearsal's were 0% and 94% image), and memory is largest at one end: an all-text
  row (the LM head's logits) or a row packed with image-caption pairs (patch-layer
  activations). Time uses the data mix's average.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from megatron_transfusion.batch import image_caption_length
from megatron_transfusion.config import ExperimentConfig, ModelConfig
from megatron_transfusion.model.params import (
    ParameterCount,
    count_parameters,
    transformer_layer_parameters,
)
from megatron_transfusion.model.patch import build_patch_layers
from megatron_transfusion.planning.cluster import Cluster, attention_backend
from megatron_transfusion.planning.layouts import Layout
from megatron_transfusion.training.metrics import patch_flops_per_image_token

FLEX_BLOCK = 128  # ModelConfig.flex_block_size default; the BlockMask tables are (s/128)²
# DeepSpeed defaults (deepspeed.runtime.zero.config): reduce_bucket_size 5e8 elements,
# stage3_max_live_parameters 1e9; this project does not override them.
DEEPSPEED_REDUCE_BUCKET = 5e8
DEEPSPEED_LIVE_PARAMETERS = 1e9


@dataclass(frozen=True)
class Memory:
    """Predicted bytes per GPU by component, for the stage that needs the most."""

    stage: str  # "only" (PP=1), "first" or "last"
    parameters: float
    gradients: float
    optimizer: float  # Adam moments, fp32 master weights (and DeepSpeed's fp32 grad partition)
    buffers: float  # engine communication buckets / gathered parameters
    activations: float  # kept for backward by every in-flight micro-batch, patch layers included
    mask: float  # attention masks of the in-flight micro-batches
    transient: float  # backward working set at its peak (logits or one layer)
    framework: float  # fixed allowance + fragmentation

    @property
    def state(self) -> float:
        """What stays between steps."""
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> float:
        return self.state + self.activations + self.mask + self.transient + self.framework


def layer_activation_elements(
    m: ModelConfig, s: int, b: int, tp: int, recompute: str, sp: bool
) -> float:
    """Elements one transformer layer keeps for backward per micro-batch (see module doc)."""
    sequence_split = tp if sp else 1
    if recompute == "full":
        return s * b * m.hidden_size / sequence_split
    h, d, f, a, g = m.hidden_size, m.head_dim, m.ffn_size, m.num_attention_heads, m.query_groups
    norm, swiglu = (1, 3) if m.fuse_elementwise else (2, 5)  # per RMSNorm, in h; in f
    attention_output = 0 if recompute == "selective" else a * d
    split = (a + 2 * g) * d + attention_output + a * d + swiglu * f
    return s * b * (2 * norm + 2) * h / sequence_split + s * b * split / tp


@dataclass(frozen=True)
class ModelCosts:
    """What the planner needs from a model config, worked out once per config."""

    parameters: ParameterCount
    layer_parameters: int
    patch_flops_per_image_token: float  # training FLOPs, patch-in + patch-out
    patch_in_saved: float  # elements patch-in keeps for backward, per image
    patch_out_saved: float


def _saved_elements(layer: torch.nn.Module, x: torch.Tensor) -> float:
    """Floating-point elements ``layer`` keeps for backward (on the meta device: no memory)."""
    params = {p.untyped_storage()._cdata for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params and t.is_floating_point():
            saved[storage._cdata] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, torch.zeros(1, dtype=torch.long))
    return float(sum(saved.values()))


@functools.cache
def _model_costs(key: tuple) -> ModelCosts:
    m = ModelConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in key})
    patch_in, patch_out = build_patch_layers(m)
    with torch.device("meta"):
        latents = torch.empty(1, m.latent_channels, m.latent_size, m.latent_size)
        hidden = torch.empty(1, m.patches_per_image, m.hidden_size, requires_grad=True)
        saved_in, saved_out = (
            _saved_elements(patch_in(m), latents),
            _saved_elements(patch_out(m), hidden),
        )
    return ModelCosts(
        count_parameters(m),
        transformer_layer_parameters(m),
        patch_flops_per_image_token(m),
        saved_in,
        saved_out,
    )


def model_costs(m: ModelConfig) -> ModelCosts:
    return _model_costs(
        tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(m).items())
    )


def max_image_token_fraction(cfg: ExperimentConfig) -> float:
    """Image positions of the most image-heavy row: as many image-caption pairs as fit, with
    empty captions (an upper bound; 15 of 256 patches in a 4,096-token row)."""
    m, s = cfg.model, cfg.data.seq_length
    return s // image_caption_length(0, m.patches_per_image) * m.patches_per_image / s


def _in_flight(layout: Layout, rank: int, micro_batches: int) -> float:
    """Micro-batches' worth of this pipeline rank's layers alive at its peak."""
    p, v = layout.pp, layout.vp or 1
    if p == 1:
        return 1
    if layout.vp is None:
        return min(p - rank, micro_batches)
    chunks = min((p - rank - 1) * 2 + (v - 1) * p + 1, micro_batches * v)
    return chunks / v


def stage_parameters(m: ModelConfig, layout: Layout, first: bool, last: bool) -> float:
    """Parameters held by one TP rank of a pipeline stage."""
    costs = model_costs(m)
    count, h = costs.parameters, m.hidden_size
    per_layer = (costs.layer_parameters - 2 * h) / layout.tp + 2 * h  # norms replicated
    n = m.num_layers // layout.pp * per_layer
    if first:
        n += count.embedding / layout.tp + count.patch_layers / 2
    if last:
        n += count.lm_head / layout.tp + h + count.patch_layers / 2  # + final norm
    return n


def _state(cluster: Cluster, layout: Layout, n: float) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer, buffers) bytes for ``n`` parameters on one rank."""
    e, d = cluster.dtype_bytes, layout.dp
    if layout.engine == "megatron":
        optimizer = (8 + (4 if e < 4 else 0)) * n
        return e * n, 4 * n, optimizer / (d if layout.zero_stage == 1 else 1), 0.0
    z = layout.zero_stage
    buffers = 0.0
    if z >= 2:
        buffers += min(DEEPSPEED_REDUCE_BUCKET, n) * e
    if z == 3:
        buffers += min(DEEPSPEED_LIVE_PARAMETERS, n) * e
    return e * n / (d if z == 3 else 1), e * n / (d if z >= 2 else 1), 16 * n / d, buffers


def stage_memory(
    cfg: ExperimentConfig,
    cluster: Cluster,
    layout: Layout,
    image_token_fraction: float,
    first: bool,
    last: bool,
) -> Memory:
    """Memory per GPU of the first and/or last pipeline stage (both when PP=1)."""
    m, e = cfg.model, cluster.dtype_bytes
    s, b, t = cfg.data.seq_length, layout.micro_batch_size, layout.tp
    h, f = m.hidden_size, m.ffn_size
    backend = attention_backend(m, cluster)
    micro_batches = layout.geometry(cfg).micro_batches
    rank = 0 if first else layout.pp - 1
    in_flight = _in_flight(layout, rank, micro_batches)
    layers = m.num_layers // layout.pp
    images = image_token_fraction * s * b / m.patches_per_image
    text = 1 - image_token_fraction  # the LM head's positions
    costs = model_costs(m)

    hidden = s * b * h / (t if layout.sp else 1)  # one [s, b, h] activation (SP: a slice)
    layer = layer_activation_elements(m, s, b, t, layout.recompute, layout.sp)
    elements = in_flight * (layers * layer + 2 * s * b * m.head_dim)  # + RoPE's cos, sin
    chunks = in_flight * (layout.vp or 1)  # chunk micro-batches alive on this rank
    if first:
        elements += math.ceil(in_flight) * images * costs.patch_in_saved
    if last:
        final_norm = 1 if m.fuse_elementwise else 2
        elements += (
            images * costs.patch_out_saved + final_norm * hidden + text * s * b * h
        )  # + head input
        chunks -= in_flight  # the final chunk sends nothing on
    elements += chunks * hidden  # outputs sent on, kept until their backward
    activations = elements * e

    masks = math.ceil(in_flight)  # micro-batches whose mask is alive
    if backend == "sdpa":
        mask = masks * b * s * s  # the boolean [b,1,s,s]
        if layout.recompute == "none":
            mask += in_flight * layers * b * s * s * e  # each layer's additive copy
    else:
        mask = masks * 4 * 4 * b * (s / FLEX_BLOCK) ** 2  # four int32 block tables
    layer_work = s * b * (h + 2 * f / t) * e + 2 * f * h / t * e
    if layout.recompute == "full":
        layer_work += layer_activation_elements(m, s, b, t, "none", layout.sp) * e
        if backend == "sdpa":
            layer_work += b * s * s * e
    transient = layer_work
    if last:
        vocab = m.padded_vocab_size / t
        logits = text * s * b * vocab * (4 + (e if e < 4 else 0)) + vocab * h * e
        transient = max(transient, logits)

    params, grads, optimizer, buffers = _state(
        cluster, layout, stage_parameters(m, layout, first, last)
    )
    framework = cluster.framework_memory + cluster.fragmentation * (activations + mask + transient)
    stage = "only" if first and last else ("first" if first else "last")
    return Memory(stage, params, grads, optimizer, buffers, activations, mask, transient, framework)
