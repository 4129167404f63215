"""The layout planner: its memory model against the measured peak of real training steps
on this CPU, the 7B preset's layout, refused layouts, and its formulas against a hand
calculation."""

import pytest

from benchmarks import peak_memory
from megatron_transfusion.config import ConfigError, load_config, sources_override
from megatron_transfusion.planning.cli import main
from megatron_transfusion.planning.cluster import CLUSTERS
from megatron_transfusion.planning.layouts import Layout, check_layout, enumerate_layouts
from megatron_transfusion.planning.memory import stage_memory
from megatron_transfusion.planning.ranking import plan, predict
from megatron_transfusion.planning.report import check
from megatron_transfusion.planning.timing import step_time
from megatron_transfusion.training.metrics import model_flops_per_token

CPU = CLUSTERS["cpu"]
H100 = CLUSTERS["h100-80gb"]
BASE = peak_memory.BASE
TOLERANCE = 0.20  # the bar for predicted vs measured


@pytest.fixture(scope="module")
def measured() -> dict[str, dict]:
    """Peak and state memory of every case, from one run of 2 processes (~1 min)."""
    return peak_memory.run(peak_memory.CASES)


@pytest.mark.parametrize("case", peak_memory.CASES)
def test_memory_prediction_matches_measured_peak(measured, case):
    result = measured[case]
    for rank, memory in enumerate(peak_memory.predicted(result)):
        for name, ours in (("peak", memory.total), ("state", memory.state)):
            seen = result[name][rank]
            assert ours == pytest.approx(seen, rel=TOLERANCE), (
                f"{case}, rank {rank}: {name} {ours / 2**20:.1f} MiB predicted, "
                f"{seen / 2**20:.1f} MiB measured"
            )


@pytest.mark.parametrize("text_share", [0.0, 0.5, 1.0])
def test_memory_is_that_of_the_most_demanding_row(text_share):
    """Not the data mix's average row: the rehearsal's 4,096-token rows were 0% and 94% image,
    and the one of 94% peaked 16% above the average's prediction (benchmarks/README.md)."""
    mix = sources_override("unread-text", "unread-img", text_share, 1 - text_share)  # never read
    cfg = load_config("transfusion-0.16b", [mix])
    layout = Layout.of_config(cfg, 1)
    all_text = stage_memory(cfg, CPU, layout, 0.0, True, True).total
    images = stage_memory(
        cfg, CPU, layout, 15 * 256 / 4096, True, True
    ).total  # 15 pairs fill a row
    expected = {0.0: images, 0.5: max(all_text, images), 1.0: all_text}[text_share]
    assert predict(cfg, CPU, layout).memory.total == expected
    if text_share == 0.5:
        average = stage_memory(cfg, CPU, layout, 0.5 * 256 / 258, True, True).total
        assert expected > average


def test_7b_preset_layout_is_the_planners_choice_and_fits_80gb():
    cfg = load_config("transfusion-7b")
    best = plan(cfg, H100, gpus=32 * 8)[0]
    assert Layout.of_config(cfg, 256) == best.layout
    assert best.memory.total <= 0.9 * H100.memory  # ≥ 10% of the 80 GB left free


def test_check_prints_the_layout_and_fails_when_it_does_not_fit(capsys):
    main(["--config", "transfusion-7b", "--nodes", "32", "--check"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "plan: transfusion-7B on 256 × h100-80gb: TP=1 PP=1 VP=- DP=256 mb=2"
    )
    assert lines[1].startswith("memory/GPU: ") and "MFU" in lines[2] and lines[3].startswith("ok: ")
    # The same without ZeRO-3: whole bf16 weights and fp32 gradients on every GPU do not fit.
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--config",
                "transfusion-7b",
                "--nodes",
                "32",
                "--check",
                "parallel.engine=megatron",
                "parallel.zero_stage=1",
            ]
        )
    assert exit_.value.code == 1
    assert "GiB usable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "layout, field",
    [
        (Layout(1, 2, 128, None, 1, "none", "deepspeed", 3), "parallel.engine"),  # ZeRO-3 with PP
        (
            Layout(1, 1, 256, None, 1, "none", "megatron", 2),
            "parallel.zero_stage",
        ),  # megatron shards state only
        (Layout(3, 1, 85, None, 1, "none", "megatron", 1), "parallel.tensor_parallel"),  # 32 heads
        (
            Layout(16, 1, 16, None, 1, "none", "megatron", 1),
            "parallel.tensor_parallel",
        ),  # > 8 GPUs/node
        (Layout(1, 3, 85, None, 1, "none", "megatron", 1), "model.num_layers"),  # 32 layers
        (
            Layout(1, 1, 256, None, 8, "none", "megatron", 1),
            "data.global_batch_tokens",
        ),  # 1024 rows
        (Layout(2, 1, 128, None, 1, "none", "deepspeed", 1, sp=True), "parallel.sequence_parallel"),
    ],
)
def test_invalid_layouts_are_refused_with_the_field(layout, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        check_layout(load_config("transfusion-7b"), H100, layout)


def test_enumeration_matches_a_hand_count():
    """4 layers, 4 heads on one 8-GPU node: TP ∈ {1,2,4} (divides 4 heads and 8 GPUs),
    PP ∈ {1,2,4} (divides 4 layers), TP·PP | 8."""
    cfg = load_config(None, BASE + ["data.global_batch_tokens=8192"])  # 16 rows
    valid = {
        (lay.tp, lay.pp, lay.dp)
        for lay, reason in enumerate_layouts(cfg, H100, 8)
        if reason is None
    }
    assert valid == {
        (1, 1, 8),
        (1, 2, 4),
        (1, 4, 2),
        (2, 1, 4),
        (2, 2, 2),
        (2, 4, 1),
        (4, 1, 2),
        (4, 2, 1),
    }
    refused = [
        reason
        for lay, reason in enumerate_layouts(cfg, H100, 8)
        if lay.engine == "deepspeed" and lay.pp > 1
    ]
    assert refused and all("parallel.engine" in reason for reason in refused)


@pytest.mark.parametrize("fused", [False, True])
def test_memory_of_one_stage_by_hand(fused):
    """First stage of TP=2, PP=2 (1F1B, 2 micro-batches in flight), fp32, ZeRO-1 at DP=1.
    Compiled elementwise work keeps each norm's input only and SwiGLU's input and output."""
    cfg = load_config(
        None,
        BASE
        + [
            "data.seq_length=512",
            "data.global_batch_tokens=4096",
            f"model.fuse_elementwise={str(fused).lower()}",
        ],
    )  # 4 micro-batches
    layout = Layout(2, 2, 1, None, 2, "none", "megatron", 1)
    h, f, V, s, b, d_head, layers = 256, 768, 8192, 512, 2, 64, 2
    layer_params = (4 * h * h + 3 * h * f) / 2 + 2 * h  # QKV+out and SwiGLU split, norms whole
    patch_in = (64 * 8 + 8) + (8 * 8 + 8) + (8 * h + h)  # timestep MLP 64->8->8, projection 8->256
    patch_out = h * 8 + 8
    params = layers * layer_params + V * h / 2 + (patch_in + patch_out) / 2
    norms, swiglu = (4 * h, 3 * f) if fused else (6 * h, 5 * f)
    per_layer = s * b * norms + s * b * (3 * h + 2 * h + swiglu) / 2
    rope = 2 * s * b * d_head  # cos, sin: once per micro-batch
    images = 0.25 * s * b / 16  # a quarter of the tokens are image patches
    activations = 4 * 2 * (layers * per_layer + rope + s * b * h)  # 2 in flight, + stage outputs
    mask = 2 * (b * s * s + layers * b * s * s * 4)  # boolean + each layer's fp32 copy
    memory = stage_memory(cfg, CPU, layout, 0.25, first=True, last=False)
    assert memory.parameters == pytest.approx(4 * params)
    assert memory.gradients == pytest.approx(4 * params)
    assert memory.optimizer == pytest.approx(8 * params)
    # Patch-in keeps per image: the timestep MLP's inputs (64, 8, 8) and the projection's
    # input (16 patches × 8).
    assert memory.activations - activations == pytest.approx(4 * 2 * images * (64 + 8 + 8 + 16 * 8))
    assert memory.mask == pytest.approx(mask)


def test_bubble_tensor_parallel_and_mfu_by_hand():
    cfg = load_config("transfusion-7b")
    layout = Layout(2, 4, 32, 2, 1, "none", "megatron", 1)  # 1024 rows / DP 32 = 32 micro-batches
    t = step_time(cfg, H100, layout, 0.0)
    assert t.bubble / (t.compute + t.tensor_parallel + t.pipeline_p2p) == pytest.approx(
        3 / (32 * 2)
    )
    all_reduce = 2 * (1 / 2) * 4096 * 4096 * 2 / (450e9 * 0.8)  # ring, 2 ranks, s·b·h bf16
    assert t.tensor_parallel == pytest.approx(
        32 * (8 * 4 + 1) * all_reduce
    )  # 8 layers + embedding/head
    p = predict(cfg, H100, layout, 0.0)
    tokens_per_s = 4 * 2**20 / t.total / 256
    assert p.mfu == pytest.approx(
        tokens_per_s * model_flops_per_token(cfg.model, 4096, 0.0) / 989e12
    )


def test_bytes_per_parameter_match_the_distributed_optimizer_rule():
    """Megatron with bf16 parameters and fp32 gradients: 6 + 12/d bytes per parameter
    under the distributed optimizer, 18 without (shared notes, distributed-facts.md)."""
    cfg = load_config("transfusion-7b")
    for zero, expected in ((1, 6 + 12 / 64), (0, 18)):
        memory = predict(cfg, H100, Layout(4, 1, 64, None, 1, "full", "megatron", zero)).memory
        n = memory.parameters / 2
        assert memory.state / n == pytest.approx(expected)


def test_check_refuses_a_world_the_layout_does_not_divide():
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        check(
            load_config("transfusion-7b", ["parallel.tensor_parallel=8"]), H100, gpus=12, margin=0.1
        )
