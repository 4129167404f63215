"""The planner's text: the ranking table, a layout's config lines, and ``--check``'s
four-line report on a config's own layout."""

from __future__ import annotations

from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.planning.cluster import Cluster, GiB
from megatron_transfusion.planning.layouts import Layout, check_layout
from megatron_transfusion.planning.memory import Memory
from megatron_transfusion.planning.ranking import Prediction, predict
from megatron_transfusion.planning.timing import StepTime


def gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def memory_line(mem: Memory) -> str:
    return (
        f"params {gib(mem.parameters)}, grads {gib(mem.gradients)}, "
        f"optimizer {gib(mem.optimizer)}, "
        f"buffers {gib(mem.buffers)}, activations {gib(mem.activations)}, mask {gib(mem.mask)}, "
        f"transient {gib(mem.transient)}, framework {gib(mem.framework)} GiB "
        f"({mem.stage} stage)"
    )


def time_line(t: StepTime) -> str:
    return (
        f"compute {t.compute:.2f}, bubble {t.bubble:.2f}, TP {t.tensor_parallel:.2f}, "
        f"PP p2p {t.pipeline_p2p:.2f}, DP {t.data_parallel:.2f} s"
    )


def format_table(predictions: list[Prediction]) -> str:
    header = (
        f"{'#':>3} {'TP':>3} {'SP':>2} {'PP':>3} {'VP':>3} {'DP':>5} {'mb':>3} {'recompute':>9} "
        f"{'engine':>9} {'ZeRO':>4} | {'state':>6} {'activ':>6} {'peak':>6} GiB | "
        f"{'step s':>7} {'tok/s/GPU':>10} {'MFU':>6}"
    )
    lines = [header, "-" * len(header)]
    for i, p in enumerate(predictions, 1):
        lay, mem = p.layout, p.memory
        lines.append(
            f"{i:>3} {lay.tp:>3} {'y' if lay.sp else '-':>2} {lay.pp:>3} {lay.vp or '-':>3} "
            f"{lay.dp:>5} {lay.micro_batch_size:>3} "
            f"{lay.recompute:>9} {lay.engine:>9} {lay.zero_stage:>4} | {gib(mem.state):>6} "
            f"{gib(mem.activations + mem.mask + mem.transient):>6} {gib(mem.total):>6}     | "
            f"{p.time.total:>7.2f} {p.tokens_per_second_per_gpu:>10,.0f} {p.mfu:>6.1%}"
        )
    return "\n".join(lines)


def yaml_section(layout: Layout) -> str:
    """The config lines that select ``layout`` (DP follows from the number of GPUs)."""
    return "\n".join(
        [
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
        ]
    )


class LayoutDoesNotFit(RuntimeError):
    """``--check``: the config's own layout exceeds the memory less the margin."""


def check(cfg: ExperimentConfig, cluster: Cluster, gpus: int, margin: float) -> str:
    """Evaluate the config's ``parallel:`` layout; returns the report, raises if it does not fit."""
    layout = Layout.of_config(cfg, gpus)
    check_layout(cfg, cluster, layout)
    p = predict(cfg, cluster, layout)
    usable = (1.0 - margin) * cluster.memory
    report = "\n".join(
        [
            f"plan: {cfg.run.name} on {gpus} × {cluster.name}: {layout.describe()}",
            (
                f"memory/GPU: {gib(p.memory.total)} of {gib(cluster.memory)} GiB; "
                f"{memory_line(p.memory)}"
            ),
            (
                f"step: {p.time.total:.2f} s ({time_line(p.time)}) | "
                f"{p.tokens_per_second_per_gpu:,.0f} tokens/s/GPU | MFU {p.mfu:.1%}"
            ),
        ]
    )
    if p.memory.total > usable:
        raise LayoutDoesNotFit(
            f"{report}\nerror: layout {layout.describe()} "
            f"needs {gib(p.memory.total)} GiB per GPU, over "
            f"the {gib(usable)} GiB usable "
            f"({gib(cluster.memory)} GiB less the {margin:.0%} margin); "
            f"run mtf-plan without --check for layouts that fit"
        )
    return (
        report + f"\nok: fits with {1 - p.memory.total / cluster.memory:.0%} of memory to spare "
        f"(margin {margin:.0%})"
    )
