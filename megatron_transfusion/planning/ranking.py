"""Each valid layout's predicted memory and step time, and the layouts that fit ranked by
predicted throughput."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_transfusion import platform
from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.planning.cluster import Cluster, platform_cluster
from megatron_transfusion.planning.layouts import ENGINES, Layout, enumerate_layouts
from megatron_transfusion.planning.memory import (
    Memory,
    max_image_token_fraction,
    model_costs,
    stage_memory,
)
from megatron_transfusion.planning.timing import StepTime, default_image_token_fraction, step_time
from megatron_transfusion.training.metrics import transformer_flops_per_token


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


def predict(
    cfg: ExperimentConfig,
    cluster: Cluster,
    layout: Layout,
    image_token_fraction: float | None = None,
) -> Prediction:
    """Memory and time of ``layout``. Memory is that of the most demanding micro-batch (see
    ``planning.memory``); ``image_token_fraction``, the time's, defaults to the data mix's."""
    if image_token_fraction is None:
        image_token_fraction = default_image_token_fraction(cfg)
    stages = [(True, True)] if layout.pp == 1 else [(True, False), (False, True)]
    rows = [0.0] if cfg.data.text_share > 0 else []  # all text
    rows += [max_image_token_fraction(cfg)] if cfg.data.text_share < 1 else []
    memory = max(
        (
            stage_memory(cfg, cluster, layout, row, first, last)
            for row in rows
            for first, last in stages
        ),
        key=lambda mem: mem.total,
    )
    time = step_time(cfg, cluster, layout, image_token_fraction)
    rate = cfg.data.global_batch_tokens / time.total / layout.gpus
    flops = transformer_flops_per_token(cfg.model, cfg.data.seq_length)
    flops += (
        image_token_fraction * model_costs(cfg.model).patch_flops_per_image_token
    )  # = metrics.model_flops_per_token
    return Prediction(layout, memory, time, rate, rate * flops / cluster.peak_flops)


def predicted_memory(cfg: ExperimentConfig, plat: platform.Platform, gpus: int) -> float:
    """Bytes per device the planner predicts for ``cfg``'s own layout on ``gpus`` devices,
    for the trainer to log beside what it measures."""
    return predict(cfg, platform_cluster(plat), Layout.of_config(cfg, gpus)).memory.total


# Predicted throughputs closer than this fraction of the fastest count as equal: finer
# than the model resolves. Among equals the layout with more free memory ranks first.
THROUGHPUT_RESOLUTION = 0.01


def plan(
    cfg: ExperimentConfig,
    cluster: Cluster,
    gpus: int,
    margin: float = 0.1,
    image_token_fraction: float | None = None,
    engines: tuple[str, ...] = ENGINES,
) -> list[Prediction]:
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
