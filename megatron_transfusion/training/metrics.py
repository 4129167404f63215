"""Training metrics: model FLOPs for MFU, the step logger (files, tensorboard, Weights &
Biases) and rank 0's console (the peak FLOP/s and memory they are measured against come
from ``platform``).

FLOP conventions (one multiply-add = 2 FLOPs; training = forward + backward = 3×
forward, the backward computing gradients for both inputs and weights):

- Transformer, per token of every kind: 6·N + 12·L·(heads·head_dim)·s, where N counts
  the parameters that multiply activations (QKV, output projection, SwiGLU gate/up/down
  in every layer, plus the LM head, counted at every position as is usual, although
  training runs it only where there is an LM loss, not on images). Left out: the word
  embedding, a row lookup with no arithmetic, and the norm gains, elementwise and
  negligible. The attention term is QKᵀ and AV over the full s×s score matrix of each
  packed row, as Megatron, nanoGPT and PaLM count it: causal masking, document
  boundaries and blocks FlexAttention skips are not discounted, so MFU stays comparable
  with published numbers (it overstates the attention work actually executed).
- Patch layers, per image token: the forward FLOPs of one image through patch-in and
  patch-out (every matmul and convolution, per-image timestep MLPs included, counted by
  torch's FlopCounterMode on the meta device), ×3, divided by the patches per image.
  The patch-in's first layer needs no input gradient; ×3 ignores that small overcount.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from datetime import timedelta
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from megatron_transfusion.config import ConfigError, ExperimentConfig, ModelConfig, WandbConfig
from megatron_transfusion.loss import LossTerms
from megatron_transfusion.model.patch import build_patch_layers


def transformer_flops_per_token(model_cfg: ModelConfig, seq_length: int) -> float:
    h, d, heads = model_cfg.hidden_size, model_cfg.head_dim, model_cfg.num_attention_heads
    qkv = h * (heads + 2 * model_cfg.query_groups) * d
    per_layer = qkv + heads * d * h + 3 * h * model_cfg.ffn_size  # + output proj, SwiGLU
    matmul_params = model_cfg.num_layers * per_layer + model_cfg.padded_vocab_size * h
    return 6.0 * matmul_params + 12.0 * model_cfg.num_layers * heads * d * seq_length


def patch_flops_per_image_token(model_cfg: ModelConfig) -> float:
    c, size = model_cfg.latent_channels, model_cfg.latent_size
    patch_in, patch_out = build_patch_layers(model_cfg)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        latents, timesteps = torch.empty(1, c, size, size), torch.zeros(1, dtype=torch.long)
        patch_out(model_cfg)(patch_in(model_cfg)(latents, timesteps), timesteps)
    return 3.0 * counter.get_total_flops() / model_cfg.patches_per_image


def model_flops_per_token(
    model_cfg: ModelConfig, seq_length: int, image_token_fraction: float
) -> float:
    """Training FLOPs per token, averaged over a mix where ``image_token_fraction`` of the
    tokens are image patches (the loop knows it from its batches)."""
    return transformer_flops_per_token(
        model_cfg, seq_length
    ) + image_token_fraction * patch_flops_per_image_token(model_cfg)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization as a fraction of ``peak_flops``."""
    return tokens_per_second * flops_per_token / peak_flops


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_line(step: int, values: dict[str, float]) -> str:
    """nanoGPT-style console line from the keys it knows; others go to the files only:
    the loss terms (``LossTerms.KEYS``), lr, grad_norm, tokens_per_second, mfu (a fraction),
    memory_gib with predicted_memory_gib (the layout planner's figure) beside it,
    tokens_seen, elapsed_seconds and eta_seconds."""
    parts = [f"step {step}"]
    total, lm, diffusion = LossTerms.KEYS
    if total in values:
        details = [
            f"{label} {values[key]:.3f}"
            for key, label in ((lm, "lm"), (diffusion, "diff"))
            if key in values
        ]
        parts.append(f"loss {values[total]:.3f}" + (f" ({', '.join(details)})" if details else ""))
    if "lr" in values:
        parts.append(f"lr {values['lr']:.1e}")
    if "grad_norm" in values:
        parts.append(f"grad {values['grad_norm']:.2f}")
    if "tokens_per_second" in values:
        parts.append(f"{_si(values['tokens_per_second'])} tok/s")
    if "mfu" in values:
        parts.append(f"mfu {100 * values['mfu']:.1f}%")
    if "memory_gib" in values:
        planned = values.get("predicted_memory_gib")
        beside = "" if planned is None else f" (plan {planned:.2f})"
        parts.append(f"mem {values['memory_gib']:.2f}{beside} GiB")
    if "tokens_seen" in values:
        parts.append(f"{_si(values['tokens_seen'])} tokens")
    for key, label in (("elapsed_seconds", "elapsed"), ("eta_seconds", "eta")):
        if key in values:
            parts.append(f"{label} {timedelta(seconds=round(values[key]))}")
    return " | ".join(parts)


class MetricsLogger:
    """Per-step scalars to ``run_dir/logs/metrics.jsonl`` (appended, so a resumed run
    continues the file), ``run_dir/tensorboard/`` and, where ``cfg.wandb.mode`` is not
    disabled, a Weights & Biases run. Ranks other than 0 write nothing.
    """

    def __init__(self, run_dir: Path, rank0: bool, cfg: ExperimentConfig | None = None):
        self.rank0 = rank0
        self.run_dir = run_dir
        self._eval_jsonl = None
        self._wandb = None
        if rank0:
            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            # Open for the logger's lifetime (appended every few steps), closed by close().
            self._jsonl = open(run_dir / "logs" / "metrics.jsonl", "a")  # noqa: SIM115
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if cfg is not None and cfg.wandb.mode != "disabled":
                self._wandb = _wandb_run(run_dir, cfg)

    def log(self, step: int, values: dict[str, float]) -> str:
        """Record ``values`` at ``step``; returns the console line for the caller to print.

        Non-finite values are written as JSON null (strict JSON has no NaN/Infinity)."""
        self._write(self._jsonl if self.rank0 else None, step, values, "", {})
        return format_line(step, values)

    def log_eval(
        self, step: int, values: dict[str, float], images: dict[str, tuple] | None = None
    ) -> str:
        """Held-out metrics: ``logs/eval.jsonl`` and tensorboard / W&B keys ``eval/<name>``;
        ``images`` (name -> (grid [H, W, 3] uint8, caption)) to ``eval_<name>/step_N.png``
        too (``samples/`` is mtf-generate's)."""
        if self.rank0 and self._eval_jsonl is None:
            # Opened at the first eval, kept open for the logger's lifetime, closed by close().
            self._eval_jsonl = open(self.run_dir / "logs" / "eval.jsonl", "a")  # noqa: SIM115
        self._write(self._eval_jsonl, step, values, "eval/", images or {})
        return f"eval step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items())

    def _write(self, jsonl, step: int, values: dict, prefix: str, images: dict) -> None:
        if not self.rank0:
            return
        record = {"step": step}
        for key, value in values.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
            self._tensorboard.add_scalar(prefix + key, value, step)
        for name, (grid, caption) in images.items():
            directory = self.run_dir / (prefix.replace("/", "_") + name)
            directory.mkdir(exist_ok=True)
            Image.fromarray(grid).save(directory / f"step_{step:08d}.png")
            (directory / f"step_{step:08d}.txt").write_text(caption + "\n")
            self._tensorboard.add_image(prefix + name, grid, step, dataformats="HWC")
        jsonl.write(json.dumps(record) + "\n")
        jsonl.flush()  # written every few steps: keep files current
        self._tensorboard.flush()
        if self._wandb is not None:
            logged = {prefix + key: float(value) for key, value in values.items()}
            self._wandb.log({**logged, **_wandb_images(images, prefix)}, step)

    def close(self) -> None:
        if self.rank0:
            self._jsonl.close()
            if self._eval_jsonl is not None:
                self._eval_jsonl.close()
            self._tensorboard.close()
            if self._wandb is not None:
                self._wandb.finish()


def require_wandb(w: WandbConfig) -> None:
    """Where W&B is on, a ConfigError unless wandb is installed; cheap, for every rank."""
    if w.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"config field 'wandb.mode': {w.mode} needs the wandb package: "
            "pip install 'megatron_transfusion[wandb]'"
        )


def _wandb_run(run_dir: Path, cfg: ExperimentConfig, job: str = "train"):
    """The run directory's W&B run of job type ``job``: its id is kept in
    ``logs/wandb_run_id`` (``logs/wandb_<job>_run_id`` for other jobs), so a resumed run (a
    requeued job) continues the same W&B run. The jobs of one run directory share a W&B
    group; W&B's files go to ``run_dir/wandb/``."""
    import wandb

    id_file = run_dir / "logs" / ("wandb_run_id" if job == "train" else f"wandb_{job}_run_id")
    w = cfg.wandb
    name = w.name or cfg.run.name
    run = wandb.init(
        project=w.project,
        entity=w.entity,
        name=name if job == "train" else f"{name}-{job}",
        group=name,
        job_type=job,
        tags=w.tags,
        mode=w.mode,
        id=id_file.read_text().strip() if id_file.exists() else None,
        resume="allow",
        dir=run_dir,
        config=cfg.to_dict(),
    )
    id_file.write_text(run.id)
    return run


def _wandb_images(images: dict[str, tuple], prefix: str) -> dict:
    if not images:
        return {}
    import wandb

    return {prefix + k: wandb.Image(grid, caption=caption) for k, (grid, caption) in images.items()}


def log_checkpoint_evaluation(
    run_dir: Path, cfg: ExperimentConfig, step: int, values: dict, images: dict[str, tuple]
) -> None:
    """``mtf-evaluate``'s results in the run directory's W&B evaluation run (job type
    "eval", in the training run's group), one record per checkpoint against
    ``checkpoint_step``. Not in the training run itself: that may still be running, and W&B
    drops records at steps below the last one it has."""
    run = _wandb_run(run_dir, cfg, job="eval")
    run.define_metric("checkpoint_step")
    run.define_metric("eval/*", step_metric="checkpoint_step")
    logged = {f"eval/{key}": float(value) for key, value in values.items()}
    run.log({"checkpoint_step": step, **logged, **_wandb_images(images, "eval/")})
    run.finish()


class Console:
    """Rank 0's lines. Where stdout is a terminal they print above a tqdm progress bar over
    the run's steps; in a batch log (Slurm's, any file) they stay plain lines, which carry
    the elapsed time and the ETA themselves."""

    def __init__(self, rank0: bool, total_steps: int, done_steps: int):
        self.rank0 = rank0
        self._bar = None
        if rank0 and sys.stdout.isatty():
            self._bar = tqdm(
                total=total_steps, initial=done_steps, unit="step", file=sys.stdout, leave=False
            )

    def print(self, line: str) -> None:
        if not self.rank0:
            return
        if self._bar is None:
            print(line, flush=True)
        else:
            self._bar.write(line, file=sys.stdout)

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
