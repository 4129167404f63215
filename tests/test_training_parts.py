"""Training-loop parts: the LR schedule at its key steps, AdamW's decay groups on a real
model, model FLOPs against hand counts, the metrics files and the console, snapshots at an
out-of-memory error."""

import io
import json
import math
import sys

import pytest
import torch

from megatron_transfusion.config import OptimizerConfig, ProfileConfig, load_config
from megatron_transfusion.model.params import count_parameters
from megatron_transfusion.parallel import seed_everything
from megatron_transfusion.platform import measure_matmul_peak
from megatron_transfusion.training.diagnostics import Profiling
from megatron_transfusion.training.metrics import (
    Console,
    MetricsLogger,
    format_line,
    mfu,
    model_flops_per_token,
    patch_flops_per_image_token,
)
from megatron_transfusion.training.optimizer import build_adamw, param_groups, set_lr
from megatron_transfusion.training.schedule import lr_at

# --------------------------------------------------------------------------------------
# LR schedule
# --------------------------------------------------------------------------------------

PAPER = OptimizerConfig(lr=3e-4, min_lr=1.5e-5, warmup_steps=4000)
TINY = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20)


@pytest.mark.parametrize(
    "cfg, train_steps, expected",
    [
        (
            PAPER,
            250_000,
            {
                0: 7.5e-8,
                1: 1.5e-7,
                3999: 3e-4,
                4000: 3e-4,
                127_000: 1.575e-4,
                250_000: 1.5e-5,
                300_000: 1.5e-5,
            },
        ),
        (TINY, 300, {0: 5e-5, 19: 1e-3, 20: 1e-3, 160: 5.5e-4, 300: 1e-4, 10_000: 1e-4}),
    ],
)
def test_lr_schedule_key_steps(cfg, train_steps, expected):
    for step, lr in expected.items():
        assert lr_at(step, cfg, train_steps) == pytest.approx(lr, rel=1e-12), step


def test_lr_schedule_quarter_point_and_shape():
    quarter = 4000 + (250_000 - 4000) // 4
    cosine = 1.5e-5 + (3e-4 - 1.5e-5) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(quarter, PAPER, 250_000) == pytest.approx(cosine, rel=1e-12)
    lrs = [lr_at(s, TINY, 300) for s in range(320)]
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:20]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))  # then never rises


def test_lr_schedule_decay_steps_and_no_warmup():
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20, decay_steps=100)
    assert lr_at(60, cfg, 300) == pytest.approx(5.5e-4)  # decay ends at step 100, not 300
    assert lr_at(100, cfg, 300) == pytest.approx(1e-4)
    no_warmup = OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, no_warmup, 100) == pytest.approx(1e-3)
    assert lr_at(50, no_warmup, 100) == pytest.approx(5e-4)
    with pytest.raises(ValueError):
        lr_at(-1, cfg, 300)


# --------------------------------------------------------------------------------------
# AdamW parameter groups
# --------------------------------------------------------------------------------------

MODEL_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=100",
    "model.make_vocab_size_divisible_by=4",
    "model.patch_layer=unet",
    "model.patch_size=2",
    "model.unet_channels=[16, 32]",
    "model.unet_blocks_per_level=2",
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_tokens=64",
]


@pytest.fixture(scope="module")
def unet_model_and_cfg(megatron_world):
    from megatron_transfusion.model import build_model

    cfg = load_config("tiny", MODEL_OVERRIDES)
    seed_everything(0)
    (model,) = build_model(cfg, megatron_world)
    return model, cfg.model


@pytest.fixture(scope="module")
def unet_model(unet_model_and_cfg):
    return unet_model_and_cfg[0]


def test_param_groups_split(unet_model):
    decay, no_decay = param_groups([unet_model], weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    grouped = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in unet_model.parameters())  # each once
    names = {id(p): name for name, p in unet_model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    one_dim = {n for n, p in unet_model.named_parameters() if p.ndim == 1}
    assert not_decayed == one_dim | {"embedding.word_embeddings.weight"}
    assert "decoder.final_layernorm.weight" in not_decayed
    assert "decoder.layers.0.input_layernorm.weight" in not_decayed
    assert "patch_in.levels.0.0.norm1.bias" in not_decayed
    assert "patch_out.conv_out.bias" in not_decayed
    for name in (
        "output_layer.weight",
        "decoder.layers.1.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        "patch_in.conv_in.weight",
        "patch_out.proj.weight",
        "patch_in.timestep_embedding.mlp.0.weight",
    ):
        assert name in decayed


def test_adamw_decays_only_the_decay_group(unet_model):
    cfg = OptimizerConfig(weight_decay=0.1, beta1=0.8, beta2=0.9, eps=1e-6)
    optimizer = build_adamw([unet_model], cfg)
    assert all(
        g["lr"] == 0.0 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6
        for g in optimizer.param_groups
    )
    set_lr(optimizer, 0.5)
    before = {name: p.detach().clone() for name, p in unet_model.named_parameters()}
    for p in unet_model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decay moves a parameter
    optimizer.step()
    params = dict(unet_model.named_parameters())
    torch.testing.assert_close(params["output_layer.weight"], before["output_layer.weight"] * 0.95)
    for name in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight"):
        assert torch.equal(params[name], before[name])
    with torch.no_grad():  # leave the shared model as it was
        for name, p in params.items():
            p.copy_(before[name])
            p.grad = None


# --------------------------------------------------------------------------------------
# Model FLOPs
# --------------------------------------------------------------------------------------


def conv(cin, cout, k, pixels):
    return 2 * cin * cout * k * k * pixels


def linear(fan_in, fan_out, rows=1):
    return 2 * fan_in * fan_out * rows


def resblock(cin, cout, time_dim, pixels):
    skip = conv(cin, cout, 1, pixels) if cin != cout else 0
    return conv(cin, cout, 3, pixels) + linear(time_dim, cout) + conv(cout, cout, 3, pixels) + skip


def two_level_unet_forward(m):
    """Forward FLOPs of one image through patch-in and patch-out, from ``patch.py``'s shapes."""
    (w0, w1), blocks = m.unet_channels, m.unet_blocks_per_level
    h, c = m.hidden_size, m.latent_channels
    big, small = m.latent_size**2, (m.latent_size // 2) ** 2
    time_mlp = linear(m.timestep_frequency_dim, w0) + linear(w0, w0)
    patch_in = (
        time_mlp
        + conv(c, w0, 3, big)
        + blocks * resblock(w0, w0, w0, big)
        + conv(w0, w0, 3, small)  # stride-2 downsample
        + resblock(w0, w1, w0, small)
        + (blocks - 1) * resblock(w1, w1, w0, small)
        + conv(w1, h, 1, small)
    )
    patch_out = (
        time_mlp
        + conv(h, w1, 1, small)
        + blocks * resblock(w1, w1, w0, small)
        + conv(w1, w1, 3, big)  # upsample
        + resblock(w1, w0, w0, big)
        + (blocks - 1) * resblock(w0, w0, w0, big)
        + conv(w0, c, 3, big)
    )
    return patch_in + patch_out


def test_flops_match_hand_count_for_tiny(unet_model_and_cfg):
    model, m = unet_model_and_cfg
    s, fraction = 256, 0.25
    # Transformer: every matrix of the instantiated decoder and LM head multiplies each
    # token once (2 FLOPs per weight forward); QKᵀ and AV take 2·s·heads·head_dim each.
    matrices = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.ndim == 2 and (name.startswith("decoder.") or name == "output_layer.weight")
    )
    attention = m.num_layers * 2 * (2 * s * m.num_attention_heads * m.head_dim)
    image_token = 3 * two_level_unet_forward(m) / m.patches_per_image
    expected = 3 * (2 * matrices + attention) + fraction * image_token
    assert patch_flops_per_image_token(m) == pytest.approx(image_token, rel=1e-12)
    assert model_flops_per_token(m, s, fraction) == pytest.approx(expected, rel=1e-12)


def test_linear_patch_flops_are_six_per_weight_per_patch():
    m = load_config("tiny").model  # linear patch layer, patch size 1: 16 patches per image
    time_mlp = linear(m.timestep_frequency_dim, m.patch_dim) + linear(m.patch_dim, m.patch_dim)
    projections = 2 * linear(m.patch_dim, m.hidden_size)  # in and out, per patch
    expected = 3 * (projections + time_mlp / m.patches_per_image)
    assert patch_flops_per_image_token(m) == pytest.approx(expected, rel=1e-12)


def test_7b_flops_agree_with_classic_rule():
    m = load_config("transfusion-7b").model
    s = 4096
    count = count_parameters(m)
    classic = 6 * (count.transformer + count.lm_head) + 12 * m.num_layers * m.hidden_size * s
    assert model_flops_per_token(m, s, image_token_fraction=0.0) == pytest.approx(classic, rel=1e-3)
    assert model_flops_per_token(m, s, image_token_fraction=0.5) == pytest.approx(classic, rel=0.05)


def test_mfu_and_matmul_peak():
    assert mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    peak = measure_matmul_peak(seconds=0.05, size=128)
    assert math.isfinite(peak) and 1e6 < peak < 1e15


# --------------------------------------------------------------------------------------
# Metrics logger
# --------------------------------------------------------------------------------------

STEP_VALUES = {
    "loss": 3.4123,
    "lm_loss": 2.9011,
    "diffusion_loss": 0.1022,
    "lr": 2.9e-4,
    "grad_norm": 0.83,
    "tokens_per_second": 12_345.0,
    "mfu": 0.412,
}


def test_console_line():
    assert format_line(120, STEP_VALUES) == (
        "step 120 | loss 3.412 (lm 2.901, diff 0.102) | lr 2.9e-04 | grad 0.83 "
        "| 12.3k tok/s | mfu 41.2%"
    )
    assert format_line(5, {"loss": 1.0, "tokens_per_second": 2.5e6}) == (
        "step 5 | loss 1.000 | 2.5M tok/s"
    )
    memory = {"mfu": 0.31, "memory_gib": 1.5, "predicted_memory_gib": 1.234}
    assert format_line(7, memory) == "step 7 | mfu 31.0% | mem 1.50 (plan 1.23) GiB"
    progress = {"tokens_seen": 3_145_728, "elapsed_seconds": 3725.4, "eta_seconds": 59.6}
    assert format_line(8, progress) == "step 8 | 3.1M tokens | elapsed 1:02:05 | eta 0:01:00"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_draws_a_bar_on_a_terminal_and_plain_lines_in_a_batch_log(monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    console = Console(rank0=True, total_steps=4, done_steps=1)  # resumed at step 1
    console.step_done()
    console.print("step 2 | loss 1.000")
    console.close()
    drawn = sys.stdout.getvalue()
    assert "\rstep 2 | loss 1.000" in drawn or "\nstep 2 | loss 1.000" in drawn
    assert " 2/4 " in drawn and "\r" in drawn  # the bar, redrawn in place

    for rank0, expected in ((True, "step 2 | loss 1.000\n"), (False, "")):
        monkeypatch.setattr(sys, "stdout", io.StringIO())  # a file: Slurm's log
        console = Console(rank0=rank0, total_steps=4, done_steps=1)
        console.step_done()
        console.print("step 2 | loss 1.000")
        console.close()
        assert sys.stdout.getvalue() == expected


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, rank0=True)
    line = logger.log(10, STEP_VALUES)
    logger.log(20, {"loss": 3.0, "lr": 3e-4})
    logger.log(30, {"loss": float("nan")})
    logger.close()
    assert line.startswith("step 10 | loss 3.412")
    rows = (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(row) for row in rows]
    assert records == [
        {"step": 10, **STEP_VALUES},
        {"step": 20, "loss": 3.0, "lr": 3e-4},
        {"step": 30, "loss": None},
    ]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [10, 20, 30]
    assert [e.value for e in losses[:2]] == pytest.approx([3.4123, 3.0])
    assert math.isnan(losses[2].value)
    assert [e.value for e in events.Scalars("mfu")] == pytest.approx([0.412])


def test_metrics_logger_off_rank0_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", rank0=False)
    assert logger.log(10, STEP_VALUES).startswith("step 10")
    logger.close()
    assert not (tmp_path / "run").exists()


def test_an_out_of_memory_error_leaves_a_snapshot_where_the_platform_records_one(
    megatron_world, tmp_path
):
    class Recording:
        """A platform that records allocator history (as CUDA does)."""

        def record_memory_history(self):
            return True

        def dump_memory_snapshot(self, path):
            path.write_bytes(b"snapshot")

    said = []
    profiling = Profiling(
        ProfileConfig(memory_snapshot=True), tmp_path, Recording(), 5, said.append
    )
    profiling.out_of_memory(6)
    profiling.close()
    assert (
        tmp_path / "profiles" / "memory_oom_step_6" / "rank_0.pickle"
    ).read_bytes() == b"snapshot"
    assert said == [f"profile: memory snapshot written into {tmp_path}/profiles/memory_oom_step_6"]


# --------------------------------------------------------------------------------------
# Hang watchdog phases
# --------------------------------------------------------------------------------------


def test_the_hang_watchdog_names_an_evaluation_or_save_that_runs_long(tmp_path, monkeypatch):
    """A stall between steps is dumped as such; inside ``phase`` the dump names the phase
    (a long evaluation is told from a hung step) and the phase's end restarts the clock;
    one dump per stall. (The multi-process hang itself: tests/test_observability.py.)"""
    import time

    from megatron_transfusion.training import diagnostics

    monkeypatch.setattr(diagnostics.dist, "get_rank", lambda: 0)
    watchdog = diagnostics.HangWatchdog(0.005, tmp_path, done=0)  # 0.3 s, checked every 0.03
    try:
        watchdog.step_done(1)
        time.sleep(0.8)
        with watchdog.phase("evaluation"):
            time.sleep(0.8)
        watchdog.step_done(2)
        time.sleep(0.15)  # under the threshold: nothing more
    finally:
        watchdog.stop()
    dump = (tmp_path / "hangs" / "rank_0.txt").read_text()
    headers = [line for line in dump.splitlines() if line.startswith("hang watchdog:")]
    assert len(headers) == 2, dump
    assert headers[0].startswith("hang watchdog: rank 0 has finished no training step for ")
    assert headers[0].endswith("(the last was step 1); its threads' stacks:")
    assert headers[1].startswith("hang watchdog: rank 0 has been in the evaluation after step 1")
    assert "in test_the_hang_watchdog_names" in dump  # the main thread's frame, each time
