"""mtf-plan: the layout planner's command line (see ``megatron_transfusion.planning``)."""

from __future__ import annotations

import argparse
import sys

from megatron_transfusion.config import load_config
from megatron_transfusion.console import human_size, run_cli
from megatron_transfusion.planning.cluster import CLUSTERS
from megatron_transfusion.planning.layouts import ENGINES
from megatron_transfusion.planning.memory import model_costs
from megatron_transfusion.planning.ranking import pareto, plan
from megatron_transfusion.planning.report import (
    LayoutDoesNotFit,
    check,
    format_table,
    gib,
    memory_line,
    time_line,
    yaml_section,
)


@run_cli
def main(argv=None) -> None:
    """mtf-plan: rank the layouts of a config on a cluster, or check the config's own."""
    parser = argparse.ArgumentParser(
        description="Enumerate TP/SP/PP/DP/ZeRO/recompute layouts; "
        "predict memory per GPU, step time, MFU."
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
    print(
        f"{cfg.run.name}: {human_size(model_costs(m).parameters.total)} parameters, "
        f"{m.num_layers} layers × {m.hidden_size}, seq {cfg.data.seq_length}, "
        f"global batch {cfg.data.sequences_per_step} sequences; "
        f"{gpus} × {cluster.name} ({gib(cluster.memory)} GiB, keep {args.margin:.0%} free)"
    )
    if not ranked:
        raise SystemExit(f"no layout fits {gpus} × {cluster.name} with a {args.margin:.0%} margin")
    print(format_table((ranked if args.all else pareto(ranked))[: args.top]))
    best = ranked[0]
    print(
        f"\nbest: {best.layout.describe()}\n  memory: {memory_line(best.memory)}\n"
        f"  step: {time_line(best.time)}"
    )
    print("  config:\n    " + yaml_section(best.layout).replace("\n", "\n    "))


if __name__ == "__main__":
    main()
