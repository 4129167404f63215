"""``mtf-evaluate``: every held-out metric of ``evaluation.evaluate`` on one checkpoint, written
as JSON (plus a sample grid, tensorboard scalars and, where the run used W&B, its W&B
evaluation run)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from megatron_transfusion.console import run_cli
from megatron_transfusion.evaluation.evaluate import caption_metrics, heldout_losses, image_metrics
from megatron_transfusion.evaluation.images import check_weights
from megatron_transfusion.inference.cli import add_loading_arguments


@run_cli(also=(ValueError,))
def main(argv=None) -> None:
    """Evaluate a checkpoint on held-out data; ``eval.*`` overrides choose what and how much."""
    parser = argparse.ArgumentParser(prog="mtf-evaluate", description=main.__doc__)
    parser.add_argument(
        "checkpoint", help="run dir, checkpoints dir, step_N dir, or an exported .safetensors"
    )
    parser.add_argument(
        "overrides", nargs="*", help="eval.* settings, e.g. eval.captions=200 eval.images=64"
    )
    parser.add_argument("--out", help="results JSON (default: <run>/eval/step_N.json)")
    add_loading_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow --out
    bad = [o for o in args.overrides if not o.startswith("eval.")]
    if bad:
        raise ValueError(f"only eval.* settings can be overridden here, got {bad}")

    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from data_prep.images import from_model_range
    from megatron_transfusion.config import EVAL_SOURCES_EXAMPLE, config_from_tree
    from megatron_transfusion.inference.images import image_grid
    from megatron_transfusion.inference.load import (
        load_for_inference,
        load_image_vae,
        load_tokenizer,
    )
    from megatron_transfusion.parallel import destroy_distributed
    from megatron_transfusion.training.metrics import log_checkpoint_evaluation, require_wandb
    from megatron_transfusion.training.step import batch_losses, forward_backward

    loaded = load_for_inference(
        args.checkpoint,
        tensor_parallel=int(os.environ.get("WORLD_SIZE", 1)),
        verify=not args.no_verify,
    )
    try:
        cfg = config_from_tree(loaded.cfg.to_dict(), args.overrides)
        e = cfg.eval
        if not e.sources:
            raise ValueError(
                f"no held-out data: list it in eval.sources, e.g. {EVAL_SOURCES_EXAMPLE}"
            )
        if e.images and e.image_caption_data:
            check_weights(e)
        tracked = loaded.run_dir is not None and cfg.wandb.mode != "disabled"
        if tracked:
            require_wandb(cfg.wandb)
        tokenizer = load_tokenizer(cfg, args.tokenizer or loaded.bundled_tokenizer)
        model = loaded.model

        def evaluate(micro_batches):
            with torch.no_grad():
                return batch_losses(
                    forward_backward(
                        [model], micro_batches, cfg.diffusion.loss_weight, forward_only=True
                    )
                )

        metrics, details = heldout_losses(evaluate, cfg), {}
        if e.captions and e.image_caption_data:
            scores, details["captions"] = caption_metrics(model, cfg, tokenizer)
            metrics.update(scores)
        drawn = None
        if e.images and e.image_caption_data:
            scores, drawn = image_metrics(model, cfg, tokenizer, load_image_vae(cfg, args.vae))
            metrics.update(scores)
            details["skipped"] = drawn["skipped"]
        if int(os.environ.get("RANK", 0)) == 0:
            default = loaded.output_dir("eval")
            out = Path(args.out) if args.out else default.with_name(f"{default.name}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            result = {
                "checkpoint": str(loaded.source),
                "step": loaded.step,
                "metrics": metrics,
                **details,
            }
            out.write_text(json.dumps(result, indent=1))
            grids = {}
            if drawn is not None:  # guided samples above their unconditional twins
                rows = [from_model_range(drawn["images"][k]) for k in ("guided", "unconditional")]
                grid = image_grid([*rows[0], *rows[1]], columns=len(rows[0]))
                Image.fromarray(grid).save(out.with_suffix(".png"))
                caption = "guided above unconditional: " + "; ".join(drawn["captions"])
                grids["samples"] = (grid, caption)
            if loaded.run_dir is not None:
                with SummaryWriter(log_dir=str(loaded.run_dir / "tensorboard")) as writer:
                    for key, value in metrics.items():
                        writer.add_scalar(f"eval/{key}", value, loaded.step)
            if tracked:
                log_checkpoint_evaluation(loaded.run_dir, cfg, loaded.step, metrics, grids)
            print(json.dumps(metrics, indent=1))
            print(f"wrote {out}")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
