"""The time model: seconds per optimizer step of a layout.

Time per step, the slowest pipeline stage:

- Compute: executed FLOPs / (peak × efficiency). Model FLOPs per token are those of
  ``training.metrics`` (MFU's definition); executed FLOPs differ in three ways: attention
  computes only the blocks the mask allows (flex: at most the causal half; the dense
  SDPA mask computes all), recompute adds a forward (full: the layer; selective: the
  core attention), and the LM head runs on text positions only. Patch layers are
  replicated over TP ranks, so not divided by t.
- Tensor parallelism: 4 all-reduces of s·b·h·e per layer and micro-batch (2 forward, 2
  backward; +2 under full recompute), +1 for the embedding and +1 for the LM head, ring
  time 2(t-1)/t · bytes / bandwidth, not overlapped (synchronous in Megatron's layers).
  Sequence parallelism replaces each by an all-gather and a reduce-scatter: same time.
  It runs with the Megatron engine only (the DeepSpeed engine does not sum the sequence-
  split norm gradients over TP ranks), so config validation refuses it with DeepSpeed.
- Pipeline: 1F1B bubble (p-1)/(m·v) of the compute (Narayanan et al. 2021), and the
  point-to-point sends of activations and their gradients (2·v per micro-batch),
  unoverlapped.
- Data parallelism, Megatron engine: ZeRO-0 all-reduces fp32 gradients, ZeRO-1
  reduce-scatters them, bucket by bucket during the last micro-batch's backward
  (``overlap_grad_reduce``): only what exceeds that backward (2/3 of its compute) shows;
  ZeRO-1 then all-gathers the e-byte parameters after the step, unoverlapped.
  DeepSpeed: ZeRO-1 the same in e bytes; ZeRO-2 reduce-scatters every micro-batch;
  ZeRO-3 also all-gathers the parameters twice per micro-batch, overlapped with compute
  (its default): what exceeds the micro-batch's compute shows, plus one layer's share
  that prefetching cannot hide.
- Bandwidth: a group stays on the node's links when its ranks fit in one node (Megatron
  orders ranks TP, then DP, then PP), else the per-GPU network bandwidth bounds it.
- MFU = tokens/s/GPU × model FLOPs per token / peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_transfusion.config import ExperimentConfig, ModelConfig
from megatron_transfusion.planning.cluster import Cluster, attention_backend
from megatron_transfusion.planning.layouts import Layout
from megatron_transfusion.planning.memory import model_costs, stage_parameters
from megatron_transfusion.training.metrics import transformer_flops_per_token

# Fraction of the dense s×s attention FLOPs a kernel executes. Flex: a BlockMask skips
# every block above the diagonal, so at most the causal half (packed documents and
# images skip more: benchmarks/attention_sparsity.py measures 0.17 of dense; not counted,
# as the data decides it). Flash runs only each query's allowed interval: also at most the
# causal half. The dense SDPA mask computes every block.
ATTENTION_COMPUTED = {"flex": 0.5, "flash": 0.5, "sdpa": 1.0}


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per optimizer step, by what the slowest stage spends them on."""

    compute: float  # all micro-batches, recompute included
    bubble: float  # pipeline fill and drain
    tensor_parallel: float
    pipeline_p2p: float
    data_parallel: float  # the exposed part

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.bubble
            + self.tensor_parallel
            + self.pipeline_p2p
            + self.data_parallel
        )


def default_image_token_fraction(cfg: ExperimentConfig) -> float:
    """Image positions per token: the image-caption stream's share, its captions counted
    as image (an upper bound; images cost more than text in memory and FLOPs)."""
    m = cfg.model
    return (1.0 - cfg.data.text_share) * m.patches_per_image / (m.patches_per_image + 2)


def _bandwidth(cluster: Cluster, ranks_spanned: int) -> float:
    """Achieved bytes/s of a group whose ranks span ``ranks_spanned`` consecutive ranks."""
    link = (
        cluster.intra_node_bandwidth
        if ranks_spanned <= cluster.gpus_per_node
        else cluster.inter_node_bandwidth
    )
    return link * cluster.comm_efficiency


def _ring(bytes_: float, n: int, bandwidth: float) -> float:
    """Seconds for a ring reduce-scatter or all-gather of ``bytes_`` over ``n`` ranks."""
    return (n - 1) / n * bytes_ / bandwidth if n > 1 else 0.0


def flops_per_token_parts(m: ModelConfig, seq_length: int) -> tuple[float, float, float]:
    """(matmul per layer, attention per layer, LM head) training FLOPs per token, split out
    of ``training.metrics.transformer_flops_per_token`` (the one FLOP formula)."""
    total = transformer_flops_per_token(m, seq_length)
    head = transformer_flops_per_token(dataclasses.replace(m, num_layers=0), seq_length)
    attention = (total - transformer_flops_per_token(m, 0)) / m.num_layers
    return (total - head) / m.num_layers - attention, attention, head


def step_time(
    cfg: ExperimentConfig, cluster: Cluster, layout: Layout, image_token_fraction: float
) -> StepTime:
    """Seconds per optimizer step by component (see the module docstring)."""
    m, e = cfg.model, cluster.dtype_bytes
    s, b, t, p, v, d = (
        cfg.data.seq_length,
        layout.micro_batch_size,
        layout.tp,
        layout.pp,
        layout.vp or 1,
        layout.dp,
    )
    backend = attention_backend(m, cluster)
    micro_batches = layout.geometry(cfg).micro_batches
    tokens = s * b  # per micro-batch

    matmul, attention, head = flops_per_token_parts(m, s)
    attention *= ATTENTION_COMPUTED[backend]
    head *= 1 - image_token_fraction
    layer = matmul + attention
    layer += {"none": 0.0, "selective": attention / 3, "full": layer / 3}[
        layout.recompute
    ]  # a forward again
    patch = (
        image_token_fraction * model_costs(m).patch_flops_per_image_token / 2
    )  # half on each end
    layers = m.num_layers // p
    first = layers * layer / t + patch + (0 if p > 1 else head / t + patch)
    last = layers * layer / t + patch + head / t
    compute_mb = tokens * max(first, last) / (cluster.peak_flops * cluster.compute_efficiency)

    activation_bytes = tokens * m.hidden_size * e
    all_reduces = layers * (4 + (2 if layout.recompute == "full" else 0)) + (2 if p == 1 else 1)
    tp_mb = all_reduces * 2 * _ring(activation_bytes, t, _bandwidth(cluster, t))
    sent = activation_bytes / (t if layout.sp else 1)  # a stage's output (SP: its slice)
    p2p_mb = 2 * v * sent / _bandwidth(cluster, layout.gpus) if p > 1 else 0.0

    params = max(
        stage_parameters(m, layout, True, p == 1), stage_parameters(m, layout, p == 1, True)
    )
    dp_bandwidth = _bandwidth(cluster, t * d)
    gather = _ring(e * params, d, dp_bandwidth)  # all-gather of the parameters
    if layout.engine == "megatron":
        reduce = _ring(4 * params, d, dp_bandwidth)  # fp32 gradient buffer
        backward = 2 / 3 * compute_mb  # of the last micro-batch, which the reduction overlaps
        if layout.zero_stage == 0:
            data_parallel = max(0.0, 2 * reduce - backward)
        else:
            data_parallel = max(0.0, reduce - backward) + gather
    else:
        reduce = _ring(e * params, d, dp_bandwidth)
        data_parallel = {
            1: reduce + gather,
            2: micro_batches * reduce + gather,
            # Prefetching hides the gathers behind compute, except the first layer's.
            3: micro_batches
            * (max(0.0, 2 * gather + reduce - compute_mb) + (2 * gather + reduce) / m.num_layers),
        }[layout.zero_stage]
    return StepTime(
        compute=micro_batches * compute_mb,
        bubble=(p - 1) / v * (compute_mb + tp_mb + p2p_mb),
        tensor_parallel=micro_batches * tp_mb,
        pipeline_p2p=micro_batches * p2p_mb,
        data_parallel=data_parallel,
    )
