"""Layout planner: how to lay a config out over a cluster, and what that will cost.

For a config (model, sequence length, global batch), a cluster and a GPU count it lists
the TP/SP/PP/DP/ZeRO/recompute layouts this project can run, predicts memory per GPU and
step time with the explicit model below, and ranks the layouts that fit the memory with
a margin by predicted throughput. ``mtf-plan`` prints the ranking; ``mtf-plan --check``
evaluates the config's own ``parallel:`` section, in four lines, for the Slurm dry run.

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
  split norm gradients over TP ranks), so the planner refuses it with DeepSpeed.
- Pipeline: 1F1B bubble (p-1)/(m·v) of the compute (Narayanan et al. 2021), and the
  point-to-point sends of activations and their gradients (2·v per micro-batch),
  unoverlapped.
- Data parallelism, Megatron engine: ZeRO-0 all-reduces fp32 gradients, ZeRO-1
  reduce-scatters them, bucket by bucket during the last micro-batch's backward
  (``overlap_grad_reduce``): only what exceeds that backward (2/3 of its compute) shows;
  ZeRO-1 then all-gathers the e-byte parameters after the step, unoverlapped. DeepSpeed: ZeRO-1 the same
  in e bytes; ZeRO-2 reduce-scatters every micro-batch; ZeRO-3 also all-gathers the
  parameters twice per micro-batch, overlapped with compute (its default): what exceeds
  the micro-batch's compute shows, plus one layer's share that prefetching cannot hide.
- Bandwidth: a group stays on the node's links when its ranks fit in one node (Megatron
  orders ranks TP, then DP, then PP), else the per-GPU network bandwidth bounds it.
- MFU = tokens/s/GPU × model FLOPs per token / peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_transfusion import platform
from megatron_transfusion.batch import image_caption_length
from megatron_transfusion.console import human_size, run_cli
from megatron_transfusion.config import (
    BatchGeometry,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    load_config,
    validate,
)
from megatron_transfusion.model.params import (
    ParameterCount,
    count_parameters,
    transformer_layer_parameters,
)
from megatron_transfusion.model.patch import build_patch_layers
from megatron_transfusion.training.metrics import (
    patch_flops_per_image_token,
    transformer_flops_per_token,
)

GiB = 2**30


@dataclass(frozen=True)
class Cluster:
    """The hardware a layout runs on, per device (GPU, or process on a CPU)."""

    name: str
    gpus_per_node: int
    memory: float  # bytes a training process may use per device
    peak_flops: float  # dense FLOP/s per device in the compute dtype
    intra_node_bandwidth: float  # bytes/s per device per direction (NVLink)
    inter_node_bandwidth: float  # bytes/s per device per direction (network)
    compute_efficiency: float  # achieved fraction of peak on the executed FLOPs
    comm_efficiency: float  # achieved fraction of the link rate in large collectives
    dtype_bytes: int  # compute dtype: parameters and activations
    attention_backend: Literal["sdpa", "flex"]  # what platform.py picks on this device
    framework_memory: float  # bytes, fixed per process
    fragmentation: float  # allocator overhead, a fraction of the activation memory


CLUSTERS = {
    "h100-80gb": Cluster(
        name="h100-80gb",
        gpus_per_node=8,  # DGX/HGX H100
        # nvidia-smi: 81,559 MiB per H100 SXM5 80GB.
        memory=81_559 * 2**20,
        # H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1,979 is with 2:4 sparsity).
        peak_flops=platform.datasheet_peak("H100 SXM5", torch.bfloat16),
        # NVLink 4: 900 GB/s bidirectional per GPU (datasheet), 450 GB/s each way.
        intra_node_bandwidth=450e9,
        # One 400 Gb/s InfiniBand NDR NIC per GPU (DGX H100): 50 GB/s each way.
        inter_node_bandwidth=50e9,
        # Fitted (the one fitted constant): torchtitan's Llama-3 8B, FSDP bf16 on 8×H100,
        # 5,762 tokens/s/GPU (torchtitan paper, Liang et al. 2024), is 0.30 of peak on the
        # FLOPs it executes (causal attention computes half of 12·L·h·s). torchtitan runs
        # eager PyTorch ops like this project's GPU path (Megatron-Core's local layers,
        # unfused RoPE/SwiGLU, compiled FlexAttention); Megatron-Core with Transformer
        # Engine's fused kernels reaches more (see benchmarks/planner_validation.py).
        compute_efficiency=0.30,
        # Assumption, not measured here (no GPU lent): NCCL's large-message bus bandwidth
        # is ~80% of the link rate (nccl-tests busbw on NVLink/IB systems).
        comm_efficiency=0.8,
        dtype_bytes=2,  # bf16
        attention_backend="flex",
        # Assumption: CUDA context (~0.5 GiB), NCCL communicator buffers of the TP/PP/DP
        # groups, cuBLAS workspaces; the usual 2-4 GiB seen outside PyTorch's allocations.
        framework_memory=3 * GiB,
        # Assumption: PyTorch's caching allocator reserves ~5-10% above what is allocated.
        fragmentation=0.10,
    ),
    "cpu": Cluster(
        name="cpu",
        # This project's CI/dev machine: 2 cores, 23 GiB; one process per core.
        gpus_per_node=2,
        memory=11 * GiB,  # half the RAM per process
        # Half the measured 2-thread fp32 GEMM peak, 172-187 GFLOP/s (benchmarks/README.md).
        peak_flops=90e9,
        # Measured here: gloo all-reduce of 64 MB between 2 processes, 0.85 GB/s bus bandwidth.
        intra_node_bandwidth=0.85e9,
        inter_node_bandwidth=0.85e9,
        # benchmarks/README.md: full training steps reach 42% (tiny) to 72% (25M) of the
        # measured GEMM peak; 0.6 lies between.
        compute_efficiency=0.6,
        comm_efficiency=1.0,  # the bandwidth above is already an achieved figure
        dtype_bytes=4,  # fp32
        attention_backend="sdpa",
        # Measured (benchmarks/peak_memory.py): resident growth beyond the counted tensors is
        # a few MiB per process after a warm-up (thread stacks, Python objects).
        framework_memory=4 * 2**20,
        fragmentation=0.0,  # every tensor ≥ 64 KiB is its own mapping there (see that script)
    ),
}


# Fraction of the dense s×s attention FLOPs a kernel executes. Flex: a BlockMask skips
# every block above the diagonal, so at most the causal half (packed documents and
# images skip more: benchmarks/attention_sparsity.py measures 0.17 of dense; not counted,
# as the data decides it). Flash runs only each query's allowed interval: also at most the
# causal half. The dense SDPA mask computes every block.
ATTENTION_COMPUTED = {"flex": 0.5, "flash": 0.5, "sdpa": 1.0}
FLEX_BLOCK = 128  # ModelConfig.flex_block_size default; the BlockMask tables are (s/128)²
# DeepSpeed defaults (deepspeed.runtime.zero.config): reduce_bucket_size 5e8 elements,
# stage3_max_live_parameters 1e9; this project does not override them.
DEEPSPEED_REDUCE_BUCKET = 5e8
DEEPSPEED_LIVE_PARAMETERS = 1e9


@dataclass(frozen=True)
class Layout:
    """One way to run a config: how it is split and what trades memory for time."""

    tp: int
    pp: int
    dp: int
    vp: int | None  # model chunks per pipeline rank (interleaved 1F1B), None: not interleaved
    micro_batch_size: int
    recompute: Literal["none", "selective", "full"]
    engine: Literal["megatron", "deepspeed"]
    zero_stage: int
    sp: bool = False  # sequence parallelism: TP ranks split the sequence outside the matmuls

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def of_config(cls, cfg: ExperimentConfig, gpus: int) -> Layout:
        """The layout a config's ``parallel:`` section gives on ``gpus`` devices."""
        p = cfg.parallel
        if gpus % (p.tensor_parallel * p.pipeline_parallel):
            raise ConfigError(
                f"config field 'parallel.tensor_parallel': {gpus} GPUs are not a multiple of "
                f"parallel.tensor_parallel × parallel.pipeline_parallel = "
                f"{p.tensor_parallel * p.pipeline_parallel}"
            )
        return cls(p.tensor_parallel, p.pipeline_parallel, gpus // (p.tensor_parallel * p.pipeline_parallel),
                   p.virtual_pipeline, cfg.data.micro_batch_size, p.recompute, p.engine, p.zero_stage,
                   p.sequence_parallel)  # fmt: skip

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` with this layout's fields set (DP is implied by the world size)."""
        parallel = dataclasses.replace(
            cfg.parallel, tensor_parallel=self.tp, pipeline_parallel=self.pp, virtual_pipeline=self.vp,
            recompute=self.recompute, engine=self.engine, zero_stage=self.zero_stage,
            sequence_parallel=self.sp,
        )  # fmt: skip
        data = dataclasses.replace(cfg.data, micro_batch_size=self.micro_batch_size)
        return dataclasses.replace(cfg, parallel=parallel, data=data)

    def geometry(self, cfg: ExperimentConfig) -> BatchGeometry:
        """How ``cfg``'s global batch splits in this layout; ConfigError if it does not."""
        return BatchGeometry.of(dataclasses.replace(cfg.data, micro_batch_size=self.micro_batch_size), self.dp)

    def describe(self) -> str:
        return (f"TP={self.tp}{'+SP' if self.sp else ''} PP={self.pp} VP={self.vp or '-'} DP={self.dp} "
                f"mb={self.micro_batch_size} recompute={self.recompute} {self.engine} ZeRO-{self.zero_stage}")  # fmt: skip


def check_layout(cfg: ExperimentConfig, cluster: Cluster, layout: Layout) -> None:
    """Raise ConfigError, naming the field, if this project cannot run ``layout``."""
    # The config's own rules: heads/FFN/vocabulary over TP, layers over PP×VP, engine/ZeRO pairs.
    validate(layout.apply(cfg))
    layout.geometry(cfg)  # the global batch splits over DP ranks × micro-batches
    if layout.tp > cluster.gpus_per_node or cluster.gpus_per_node % layout.tp:
        raise ConfigError(
            f"config field 'parallel.tensor_parallel': {layout.tp} must divide the "
            f"{cluster.gpus_per_node} GPUs of a {cluster.name} node (TP traffic stays on the node's links)"
        )


ENGINES = ("megatron", "deepspeed")
ZERO_STAGES = {"megatron": (0, 1), "deepspeed": (1, 2, 3)}  # what the config schema allows


def enumerate_layouts(cfg: ExperimentConfig, cluster: Cluster, gpus: int,
                      engines: tuple[str, ...] = ENGINES) -> list[tuple[Layout, str | None]]:  # fmt: skip
    """Every candidate layout on ``gpus`` devices with the reason it is refused (None: valid).

    Candidates: TP and PP over the divisors of the GPU count, VP over the chunk counts that
    split the layers, micro-batches of 1-8 sequences, each recompute mode, the engine/ZeRO
    pairs of the config schema (megatron 0-1, deepspeed 1-3) of ``engines``, and sequence
    parallelism on or off where TP > 1.
    """
    layers = cfg.model.num_layers
    divisors = [n for n in range(1, gpus + 1) if gpus % n == 0]
    pairs = [(engine, zero) for engine in engines for zero in ZERO_STAGES[engine]]
    out = []
    for tp in (n for n in divisors if n <= cluster.gpus_per_node):
        for pp in (n for n in divisors if gpus % (tp * n) == 0 and n <= layers):
            vps = [None] + (
                [v for v in range(2, layers // pp + 1) if layers % (pp * v) == 0] if pp > 1 else []
            )
            for vp in vps:
                for mb, recompute, (engine, zero), sp in itertools.product(
                    (1, 2, 4, 8),
                    ("none", "selective", "full"),
                    pairs,
                    (False, True) if tp > 1 else (False,),
                ):
                    layout = Layout(tp, pp, gpus // (tp * pp), vp, mb, recompute, engine, zero, sp)
                    try:
                        check_layout(cfg, cluster, layout)
                        out.append((layout, None))
                    except ConfigError as e:
                        out.append((layout, str(e)))
    return out


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


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
    return ModelCosts(count_parameters(m), transformer_layer_parameters(m),
                      patch_flops_per_image_token(m), saved_in, saved_out)  # fmt: skip


def model_costs(m: ModelConfig) -> ModelCosts:
    return _model_costs(
        tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(m).items())
    )


def attention_backend(m: ModelConfig, cluster: Cluster) -> str:
    """The kernel the model runs on this cluster ("auto": the platform's, as build_model does)."""
    return cluster.attention_backend if m.attention_backend == "auto" else m.attention_backend


def max_image_token_fraction(cfg: ExperimentConfig) -> float:
    """Image positions of the most image-heavy row: as many image-caption pairs as fit, with
    empty captions (an upper bound; 15 of 256 patches in a 4,096-token row)."""
    m, s = cfg.model, cfg.data.seq_length
    return s // image_caption_length(0, m.patches_per_image) * m.patches_per_image / s


def default_image_token_fraction(cfg: ExperimentConfig) -> float:
    """Image positions per token: the image-caption stream's share, its captions counted
    as image (an upper bound; images cost more than text in memory and FLOPs)."""
    m = cfg.model
    return (1.0 - cfg.data.text_token_fraction) * m.patches_per_image / (m.patches_per_image + 2)


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


def stage_memory(cfg: ExperimentConfig, cluster: Cluster, layout: Layout, image_token_fraction: float,
                 first: bool, last: bool) -> Memory:  # fmt: skip
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
        elements += images * costs.patch_out_saved + final_norm * hidden + text * s * b * h  # + head input
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


# --------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Prediction and ranking
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What the planner expects of one layout."""

    layout: Layout
    memory: Memory  # the stage that needs the most
    time: StepTime
    tokens_per_second_per_gpu: float
    mfu: float

    def fits(self, cluster: Cluster, margin: float) -> bool:
        """Fits with ``margin`` (a fraction of the device memory) to spare."""
        return self.memory.total <= (1.0 - margin) * cluster.memory


def predict(cfg: ExperimentConfig, cluster: Cluster, layout: Layout,
            image_token_fraction: float | None = None) -> Prediction:  # fmt: skip
    """Memory and time of ``layout``. Memory is that of the most demanding micro-batch (see the
    module doc); ``image_token_fraction``, the time's, defaults to the data mix's."""
    if image_token_fraction is None:
        image_token_fraction = default_image_token_fraction(cfg)
    stages = [(True, True)] if layout.pp == 1 else [(True, False), (False, True)]
    rows = [0.0] if cfg.data.text_token_fraction > 0 else []  # all text
    rows += [max_image_token_fraction(cfg)] if cfg.data.text_token_fraction < 1 else []
    memory = max((stage_memory(cfg, cluster, layout, row, first, last)
                  for row in rows for first, last in stages), key=lambda mem: mem.total)  # fmt: skip
    time = step_time(cfg, cluster, layout, image_token_fraction)
    rate = cfg.data.global_batch_tokens / time.total / layout.gpus
    flops = transformer_flops_per_token(cfg.model, cfg.data.seq_length)
    flops += (
        image_token_fraction * model_costs(cfg.model).patch_flops_per_image_token
    )  # = metrics.model_flops_per_token
    return Prediction(layout, memory, time, rate, rate * flops / cluster.peak_flops)


def platform_cluster(plat: platform.Platform) -> Cluster:
    """The cluster whose memory model describes ``plat``: on any GPU h100-80gb's (bf16,
    FlexAttention, the CUDA allowance; its memory size and speeds play no part in the
    prediction), on a CPU the cpu one."""
    return CLUSTERS["h100-80gb" if plat.is_gpu else "cpu"]


def predicted_memory(cfg: ExperimentConfig, plat: platform.Platform, gpus: int) -> float:
    """Bytes per device the planner predicts for ``cfg``'s own layout on ``gpus`` devices,
    for the trainer to log beside what it measures."""
    return predict(cfg, platform_cluster(plat), Layout.of_config(cfg, gpus)).memory.total


# Predicted throughputs closer than this fraction of the fastest count as equal: finer
# than the model resolves. Among equals the layout with more free memory ranks first.
THROUGHPUT_RESOLUTION = 0.01


def plan(cfg: ExperimentConfig, cluster: Cluster, gpus: int, margin: float = 0.1,
         image_token_fraction: float | None = None,
         engines: tuple[str, ...] = ENGINES) -> list[Prediction]:  # fmt: skip
    """Valid layouts that fit ``margin``, best first: highest predicted throughput (within
    ``THROUGHPUT_RESOLUTION`` counted as equal), then least memory."""
    fitting = []
    for layout, reason in enumerate_layouts(cfg, cluster, gpus, engines):
        if reason is None:
            prediction = predict(cfg, cluster, layout, image_token_fraction)
            if prediction.fits(cluster, margin):
                fitting.append(prediction)
    fitting.sort(key=lambda p: -p.tokens_per_second_per_gpu)
    ranked = []
    while fitting:  # the fastest left and all within the resolution of it, least memory first
        bound = (1 - THROUGHPUT_RESOLUTION) * fitting[0].tokens_per_second_per_gpu
        tied = [p for p in fitting if p.tokens_per_second_per_gpu >= bound]
        ranked += sorted(tied, key=lambda p: p.memory.total)
        fitting = fitting[len(tied) :]
    return ranked


def pareto(ranked: list[Prediction]) -> list[Prediction]:
    """The ranked layouts that no layout above them beats on memory as well."""
    front, least = [], math.inf
    for p in ranked:
        if p.memory.total < least:
            front.append(p)
            least = p.memory.total
    return front


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _memory_line(mem: Memory) -> str:
    return (f"params {_gib(mem.parameters)}, grads {_gib(mem.gradients)}, optimizer {_gib(mem.optimizer)}, "
            f"buffers {_gib(mem.buffers)}, activations {_gib(mem.activations)}, mask {_gib(mem.mask)}, "
            f"transient {_gib(mem.transient)}, framework {_gib(mem.framework)} GiB "
            f"({mem.stage} stage)")  # fmt: skip


def _time_line(t: StepTime) -> str:
    return (f"compute {t.compute:.2f}, bubble {t.bubble:.2f}, TP {t.tensor_parallel:.2f}, "
            f"PP p2p {t.pipeline_p2p:.2f}, DP {t.data_parallel:.2f} s")  # fmt: skip


def format_table(predictions: list[Prediction]) -> str:
    header = (f"{'#':>3} {'TP':>3} {'SP':>2} {'PP':>3} {'VP':>3} {'DP':>5} {'mb':>3} {'recompute':>9} "
              f"{'engine':>9} {'ZeRO':>4} | {'state':>6} {'activ':>6} {'peak':>6} GiB | "
              f"{'step s':>7} {'tok/s/GPU':>10} {'MFU':>6}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for i, p in enumerate(predictions, 1):
        lay, mem = p.layout, p.memory
        lines.append(
            f"{i:>3} {lay.tp:>3} {'y' if lay.sp else '-':>2} {lay.pp:>3} {lay.vp or '-':>3} "
            f"{lay.dp:>5} {lay.micro_batch_size:>3} "
            f"{lay.recompute:>9} {lay.engine:>9} {lay.zero_stage:>4} | {_gib(mem.state):>6} "
            f"{_gib(mem.activations + mem.mask + mem.transient):>6} {_gib(mem.total):>6}     | "
            f"{p.time.total:>7.2f} {p.tokens_per_second_per_gpu:>10,.0f} {p.mfu:>6.1%}"
        )
    return "\n".join(lines)


def yaml_section(layout: Layout) -> str:
    """The config lines that select ``layout`` (DP follows from the number of GPUs)."""
    return "\n".join([
        "parallel:",
        f"  tensor_parallel: {layout.tp}",
        f"  pipeline_parallel: {layout.pp}",
        f"  virtual_pipeline: {layout.vp if layout.vp else 'null'}",
        f"  sequence_parallel: {str(layout.sp).lower()}",
        f"  recompute: {layout.recompute}",
        f"  engine: {layout.engine}",
        f"  zero_stage: {layout.zero_stage}",
        "data:",
        f"  micro_batch_size: {layout.micro_batch_size}",
    ])  # fmt: skip


class LayoutDoesNotFit(RuntimeError):
    """``--check``: the config's own layout exceeds the memory less the margin."""


def check(cfg: ExperimentConfig, cluster: Cluster, gpus: int, margin: float) -> str:
    """Evaluate the config's ``parallel:`` layout; returns the report, raises if it does not fit."""
    layout = Layout.of_config(cfg, gpus)
    check_layout(cfg, cluster, layout)
    p = predict(cfg, cluster, layout)
    usable = (1.0 - margin) * cluster.memory
    report = "\n".join([
        f"plan: {cfg.run.name} on {gpus} × {cluster.name}: {layout.describe()}",
        f"memory/GPU: {_gib(p.memory.total)} of {_gib(cluster.memory)} GiB; {_memory_line(p.memory)}",
        (f"step: {p.time.total:.2f} s ({_time_line(p.time)}) | "
         f"{p.tokens_per_second_per_gpu:,.0f} tokens/s/GPU | MFU {p.mfu:.1%}"),
    ])  # fmt: skip
    if p.memory.total > usable:
        raise LayoutDoesNotFit(
            f"{report}\nerror: layout {layout.describe()} needs {_gib(p.memory.total)} GiB per GPU, over "
            f"the {_gib(usable)} GiB usable ({_gib(cluster.memory)} GiB less the {margin:.0%} margin); "
            f"run mtf-plan without --check for layouts that fit"
        )
    return (
        report
        + f"\nok: fits with {1 - p.memory.total / cluster.memory:.0%} of memory to spare "
        f"(margin {margin:.0%})"
    )


@run_cli
def main(argv=None) -> None:
    """mtf-plan: rank the layouts of a config on a cluster, or check the config's own."""
    parser = argparse.ArgumentParser(
        description="Enumerate TP/SP/PP/DP/ZeRO/recompute layouts; predict memory per GPU, step time, MFU."
    )
    parser.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    parser.add_argument("--cluster", default="h100-80gb", choices=sorted(CLUSTERS))
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, help="total devices (default: nodes × GPUs per node)")
    parser.add_argument(
        "--margin", type=float, default=0.1, help="memory fraction to keep free (default 0.1)"
    )
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="consider only this engine (e.g. megatron, whose checkpoints reshard)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="also list layouts that one above beats on both speed and memory",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="evaluate the config's own parallel: layout; exit 1 if it does not fit",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=8192")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    cluster = CLUSTERS[args.cluster]
    gpus = args.gpus or args.nodes * cluster.gpus_per_node
    if args.check:
        try:
            print(check(cfg, cluster, gpus, args.margin))
        except LayoutDoesNotFit as e:
            print(e, file=sys.stderr)
            raise SystemExit(1) from None
        return
    ranked = plan(
        cfg, cluster, gpus, args.margin, engines=(args.engine,) if args.engine else ENGINES
    )
    m = cfg.model
    print(f"{cfg.run.name}: {human_size(model_costs(m).parameters.total)} parameters, {m.num_layers} layers "
          f"× {m.hidden_size}, seq {cfg.data.seq_length}, global batch {cfg.data.sequences_per_step} "
          f"sequences; {gpus} × "
          f"{cluster.name} ({_gib(cluster.memory)} GiB, keep {args.margin:.0%} free)")  # fmt: skip
    if not ranked:
        raise SystemExit(f"no layout fits {gpus} × {cluster.name} with a {args.margin:.0%} margin")
    print(format_table((ranked if args.all else pareto(ranked))[: args.top]))
    best = ranked[0]
    print(
        f"\nbest: {best.layout.describe()}\n  memory: {_memory_line(best.memory)}\n"
        f"  step: {_time_line(best.time)}"
    )
    print("  config:\n    " + yaml_section(best.layout).replace("\n", "\n    "))


if __name__ == "__main__":
    main()
