"""The layouts this project can run: TP/SP/PP/VP/DP splits, micro-batch size, recompute and
engine/ZeRO pairs, each checked against the config's rules and the cluster."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Literal

from megatron_transfusion.config import BatchGeometry, ConfigError, ExperimentConfig, validate
from megatron_transfusion.planning.cluster import Cluster


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
        return cls(
            p.tensor_parallel,
            p.pipeline_parallel,
            gpus // (p.tensor_parallel * p.pipeline_parallel),
            p.virtual_pipeline,
            cfg.data.micro_batch_size,
            p.recompute,
            p.engine,
            p.zero_stage,
            p.sequence_parallel,
        )

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` with this layout's fields set (DP is implied by the world size)."""
        parallel = dataclasses.replace(
            cfg.parallel,
            tensor_parallel=self.tp,
            pipeline_parallel=self.pp,
            virtual_pipeline=self.vp,
            recompute=self.recompute,
            engine=self.engine,
            zero_stage=self.zero_stage,
            sequence_parallel=self.sp,
        )
        data = dataclasses.replace(cfg.data, micro_batch_size=self.micro_batch_size)
        return dataclasses.replace(cfg, parallel=parallel, data=data)

    def geometry(self, cfg: ExperimentConfig) -> BatchGeometry:
        """How ``cfg``'s global batch splits in this layout; ConfigError if it does not."""
        data = dataclasses.replace(cfg.data, micro_batch_size=self.micro_batch_size)
        return BatchGeometry.of(data, self.dp)

    def describe(self) -> str:
        return (
            f"TP={self.tp}{'+SP' if self.sp else ''} PP={self.pp} VP={self.vp or '-'} DP={self.dp} "
            f"mb={self.micro_batch_size} recompute={self.recompute} "
            f"{self.engine} ZeRO-{self.zero_stage}"
        )


def check_layout(cfg: ExperimentConfig, cluster: Cluster, layout: Layout) -> None:
    """Raise ConfigError, naming the field, if this project cannot run ``layout``."""
    # The config's own rules: heads/FFN/vocabulary over TP, layers over PP×VP, engine/ZeRO pairs.
    validate(layout.apply(cfg))
    layout.geometry(cfg)  # the global batch splits over DP ranks × micro-batches
    if layout.tp > cluster.gpus_per_node or cluster.gpus_per_node % layout.tp:
        raise ConfigError(
            f"config field 'parallel.tensor_parallel': {layout.tp} must divide the "
            f"{cluster.gpus_per_node} GPUs of a {cluster.name} node "
            "(TP traffic stays on the node's links)"
        )


ENGINES = ("megatron", "deepspeed")
ZERO_STAGES = {"megatron": (0, 1), "deepspeed": (1, 2, 3)}  # what the config schema allows


def enumerate_layouts(
    cfg: ExperimentConfig, cluster: Cluster, gpus: int, engines: tuple[str, ...] = ENGINES
) -> list[tuple[Layout, str | None]]:
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
