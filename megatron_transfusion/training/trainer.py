"""The pretraining loop, top to bottom.

    platform -> process groups -> model -> data -> [init_from] -> engine -> [resume] ->
    for each step: batches -> noise -> engine.train_step -> log -> checkpoint

Along the way, where the config asks: a W&B run beside the metrics files, profiler traces
and memory snapshots (``profile``), a watchdog that dumps every rank's stacks when no step
finishes (``distributed.hang_watchdog_minutes``; ``training.diagnostics``).

Faults: a non-finite loss or gradient norm skips the update on every rank and is counted;
``max_consecutive_skips`` in a row stop the run with an error. SIGTERM/SIGUSR1 and a first
Ctrl-C (SIGINT) finish the current step, save a checkpoint and exit with ``EXIT_PREEMPTED``
so a batch script can requeue the job; ``--resume auto`` then continues from it. A second
Ctrl-C exits at once, saving nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state, tensor_parallel

from checkpoints import layout, train_state
from checkpoints.sources import check_made_with, initialize_weights
from megatron_transfusion import platform
from megatron_transfusion.config import EXIT_PREEMPTED, ConfigError, ExperimentConfig
from megatron_transfusion.data import MixedModalityLoader
from megatron_transfusion.diffusion import CosineSchedule
from megatron_transfusion.evaluation.evaluate import caption_metrics, heldout_losses, sample_grid
from megatron_transfusion.inference.load import load_image_vae, load_tokenizer
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
from megatron_transfusion.planning.ranking import predicted_memory
from megatron_transfusion.training.diagnostics import HangWatchdog, Profiling
from megatron_transfusion.training.engine import Engine
from megatron_transfusion.training.metrics import (
    Console,
    MetricsLogger,
    mfu,
    model_flops_per_token,
    require_wandb,
)
from megatron_transfusion.training.schedule import lr_at
from megatron_transfusion.training.step import MicroBatch


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


class _StopRequest:
    """Set by SIGTERM/SIGUSR1/SIGINT; acted on at the next step boundary, agreed by all
    ranks. After a first SIGINT the next SIGINT or SIGTERM gets the default action (the
    process ends at once, even inside a collective): Ctrl-C twice means "now". SIGTERM
    too, because under torchrun a second Ctrl-C reaches torchrun, which then stops its
    workers with SIGTERM."""

    def __init__(self):
        self.requested = False
        self.announce = dist.get_rank() == 0
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.announce:  # os.write: print() may be mid-write in the interrupted code
                os.write(
                    2,
                    b"interrupted: saving a checkpoint after this step; Ctrl-C again to exit "
                    b"at once without saving\n",
                )

    def agreed(self) -> bool:
        flag = torch.tensor(float(self.requested))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def build_engine(cfg: ExperimentConfig, plat, chunks) -> Engine:
    if cfg.parallel.engine == "deepspeed":
        from megatron_transfusion.training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, chunks)
    from megatron_transfusion.training.megatron_engine import MegatronEngine

    return MegatronEngine(cfg, plat, chunks)


def _rng_state(noise_generator: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"noise": noise_generator.get_state(), "torch": torch.get_rng_state()}
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        states[f"tracker/{name}"] = state
    return states


def _restore_rng(states: dict[str, torch.Tensor], noise_generator: torch.Generator) -> None:
    noise_generator.set_state(states["noise"])
    torch.set_rng_state(states["torch"])
    tracker = {k.split("/", 1)[1]: v for k, v in states.items() if k.startswith("tracker/")}
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def evaluate(cfg: ExperimentConfig, engine, tokenizer, vae) -> tuple[dict[str, float], dict]:
    """Held-out losses in any layout; captioning metrics and a sample grid too where
    configured (PP=1). Returns the metrics and the images by name."""
    metrics = heldout_losses(
        engine.evaluate,
        cfg,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    images = {}
    model = getattr(engine.model_chunks[0], "module", engine.model_chunks[0])  # DDP or bare
    if cfg.eval.captions:
        metrics.update(caption_metrics(model, cfg, tokenizer)[0])
    if cfg.eval.samples:
        images["samples"] = sample_grid(model, cfg, tokenizer, vae)
    return metrics, images


def _start_over(cfg: ExperimentConfig, run_dir: Path, ckpt_dir: Path, rank0: bool) -> None:
    """resume=none: the previous run in the run directory, if any, set aside whole (by
    rank 0; every rank checks, so that a mistake ends every rank alike)."""
    if layout.kept_elsewhere(ckpt_dir, run_dir) and layout.latest_file(ckpt_dir).exists():
        raise ConfigError(
            f"config field 'checkpoint.directory': {ckpt_dir} holds another run's checkpoints; "
            "resume=none would mix them: resume that run, or give an empty directory"
        )
    init_from = cfg.checkpoint.init_from
    if init_from and Path(init_from.removeprefix("hf:")).resolve().is_relative_to(
        run_dir.resolve()
    ):
        raise ConfigError(
            f"config field 'checkpoint.init_from': {init_from} is inside {run_dir}, which "
            "resume=none starts over in: give this run another run.name"
        )
    aside = layout.set_aside_previous_run(run_dir) if rank0 else None
    if aside is not None:
        print(f"resume=none: the previous run in {run_dir} was moved to {aside}", flush=True)


def train(cfg: ExperimentConfig, resume: str | None = None, verify: bool = True) -> dict:
    """Runs to ``run.train_steps`` (or a stop request). Returns the last step's metrics.
    ``resume``: "auto", "none" or a checkpoint path; None: ``checkpoint.load`` if set, else
    "auto". ``verify``: check the files of a resumed checkpoint, or of
    ``checkpoint.init_from``, against their manifest first."""
    plat = platform.activate()
    init_distributed(cfg.parallel, plat, cfg.distributed.timeout_minutes)
    try:
        return _train(cfg, plat, resume, verify)
    finally:
        destroy_distributed()


def _train(cfg: ExperimentConfig, plat, resume: str | None, verify: bool) -> dict:
    require_wandb(cfg.wandb)  # before minutes of setup
    rank0 = dist.get_rank() == 0
    run_dir = Path(cfg.run.output_root) / cfg.run.name
    ckpt_dir = (
        Path(cfg.checkpoint.directory)
        if cfg.checkpoint.directory
        else layout.checkpoints_dir(run_dir)
    )
    if resume == "none":
        _start_over(cfg, run_dir, ckpt_dir, rank0)
    if rank0:
        # checkpoint.directory may be elsewhere: its checkpoints are then found with a copy
        config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        elsewhere = layout.kept_elsewhere(ckpt_dir, run_dir)
        for directory in (run_dir, ckpt_dir) if elsewhere else (run_dir,):
            directory.mkdir(parents=True, exist_ok=True)
            layout.run_config_file(directory).write_text(config)
        ckpt_dir.mkdir(exist_ok=True)
    dist.barrier()  # no rank writes into the run directory before it is there
    seed_everything(cfg.run.seed)
    memory_start = plat.peak_memory()  # logged: what model, engine and data add to it
    chunks = build_model(cfg, plat)
    dp_rank = parallel_state.get_data_parallel_rank()
    loader = MixedModalityLoader(cfg, dp_rank, parallel_state.get_data_parallel_world_size())
    found = layout.resolve_resume(ckpt_dir, resume or cfg.checkpoint.load or "auto")
    if found is None and cfg.checkpoint.init_from:  # before the engine copies the weights
        line = initialize_weights(
            chunks, cfg.model, cfg.checkpoint.init_from, loader.made_with, verify
        )
        if rank0:
            print(line, flush=True)
    engine = build_engine(cfg, plat, chunks)
    # Noise, timesteps and CFG drops: one stream per data-parallel replica (TP/PP ranks of a
    # replica must draw the same), on the CPU so every platform draws alike.
    noise_generator = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + dp_rank)
    schedule = CosineSchedule.from_config(cfg.diffusion)
    # tokens, elapsed_seconds: the whole run's, across resumes (steps a resume redoes count once)
    state = {"skipped_steps": 0, "consecutive_skips": 0, "tokens": 0, "elapsed_seconds": 0.0}
    step = 0
    if found is not None:
        saved, rng = train_state.load_checkpoint(found, engine, verify)
        check_made_with(str(found), saved.pop("made_with", None), loader.made_with)
        step = saved.pop("step")
        loader.load_state_dict(saved.pop("loader"))
        state.update(saved)
        if rng is not None:
            _restore_rng(rng, noise_generator)
        if rank0:
            print(f"resumed from {found} at step {step}", flush=True)

    generating = cfg.eval.interval and (cfg.eval.captions or cfg.eval.samples)
    tokenizer = load_tokenizer(cfg) if generating else None
    vae = load_image_vae(cfg) if cfg.eval.interval and cfg.eval.samples else None
    logger = MetricsLogger(run_dir, rank0, cfg)
    console = Console(rank0, cfg.run.train_steps, step)
    profiling = Profiling(cfg.profile, run_dir, plat, step, console.print)
    watchdog = HangWatchdog(cfg.distributed.hang_watchdog_minutes, run_dir, step)
    peak = cfg.run.peak_flops or plat.peak_flops()
    planned = predicted_memory(cfg, plat, dist.get_world_size())
    stop = _StopRequest()
    device = plat.device()
    last: dict = {}
    first_step, clock, elapsed_before = step, time.perf_counter(), state["elapsed_seconds"]

    pending: train_state.PendingCheckpoint | None = None  # an async save still being written

    def save(publish_now: bool) -> None:
        nonlocal pending
        if pending is not None:  # one save in flight at a time
            pending.publish()
        state["elapsed_seconds"] = elapsed_before + time.perf_counter() - clock
        trainer_state = {**state, "loader": loader.state_dict(), "made_with": loader.made_with}
        pending = train_state.begin_checkpoint(
            ckpt_dir,
            step,
            engine,
            trainer_state,
            _rng_state(noise_generator),
            cfg.checkpoint.keep_last,
            cfg.checkpoint.async_save,
        )
        if publish_now or not cfg.checkpoint.async_save:
            pending.publish()
            pending = None

    try:
        while step < cfg.run.train_steps:
            started = time.perf_counter()
            epochs = {name: e for name, (_, e) in loader.sampler.progress().items()}
            micro_batches = [
                MicroBatch.draw(batch, schedule, cfg.diffusion, noise_generator, device)
                for batch in loader.next_step()
            ]
            for name, (_, epoch) in loader.sampler.progress().items():
                if epoch > epochs[name]:
                    console.print(f"data source '{name}': epoch {epoch} done, starting over")
            lr = lr_at(step, cfg.optimizer, cfg.run.train_steps)
            result = engine.train_step(micro_batches, lr)
            step += 1
            watchdog.step_done(step)
            console.step_done()
            state["tokens"] += cfg.data.global_batch_tokens
            state["skipped_steps"] += result.skipped
            state["consecutive_skips"] = state["consecutive_skips"] + 1 if result.skipped else 0
            now = time.perf_counter()
            if step % cfg.run.log_interval == 0 or step == cfg.run.train_steps or result.skipped:
                image_tokens = sum(int((b.batch.image_ids >= 0).sum()) for b in micro_batches)
                all_tokens = sum(b.batch.tokens.numel() for b in micro_batches)
                tokens_per_second = cfg.data.global_batch_tokens / (now - started)
                flops = model_flops_per_token(
                    cfg.model, cfg.data.seq_length, image_tokens / all_tokens
                )
                last = {
                    **result.losses.as_dict(),
                    "lr": lr,
                    "grad_norm": result.grad_norm,
                    "tokens_per_second": tokens_per_second,
                    "mfu": mfu(tokens_per_second, flops, peak * dist.get_world_size()),
                    "skipped_steps": state["skipped_steps"],
                    "memory_gib": (plat.peak_memory() - memory_start) / 2**30,
                    "predicted_memory_gib": planned / 2**30,
                    "tokens_seen": state["tokens"],
                    "elapsed_seconds": elapsed_before + now - clock,
                    # at this process's pace so far, evaluations and saves included
                    "eta_seconds": (now - clock)
                    / (step - first_step)
                    * (cfg.run.train_steps - step),
                }
                for name, (tokens, epochs) in loader.sampler.progress().items():  # files only
                    last[f"data/{name}/tokens"], last[f"data/{name}/epochs"] = tokens, epochs
                line = logger.log(step, last)
                console.print(line + (" | skipped (non-finite)" if result.skipped else ""))
            if state["consecutive_skips"] >= cfg.run.max_consecutive_skips:
                raise TrainingError(
                    f"{state['consecutive_skips']} consecutive steps had a non-finite loss or "
                    f"gradient norm (last at step {step}); stopping. Lower optimizer.lr or "
                    "resume from an earlier checkpoint with checkpoint.load"
                )
            if cfg.eval.interval and step % cfg.eval.interval == 0:
                with watchdog.phase("evaluation"):
                    metrics, images = evaluate(cfg, engine, tokenizer, vae)
                console.print(logger.log_eval(step, metrics, images))
            stopping = stop.agreed()
            last_step = step == cfg.run.train_steps
            if step % cfg.checkpoint.interval == 0 or last_step or stopping:
                with watchdog.phase("checkpoint save"):
                    save(publish_now=last_step or stopping)
            elif pending is not None and pending.ready():
                pending.publish()
                pending = None
            if stopping:
                console.print(f"stop requested: saved step {step}, exiting with {EXIT_PREEMPTED}")
                raise SystemExit(EXIT_PREEMPTED)
            profiling.step_done(step)  # a profiled step: its log, evaluation and save too
    except torch.OutOfMemoryError:
        profiling.out_of_memory(step + 1)
        raise
    finally:
        watchdog.stop()
        profiling.close()
        console.close()
        logger.close()
    return last
