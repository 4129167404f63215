import subprocess
import sys

import pytest

from megatron_transfusion.config import (
    PRESET_DIR,
    BatchGeometry,
    ConfigError,
    ExperimentConfig,
    config_from_tree,
    load_config,
    sources_override,
)


def test_presets_load_and_keep_paper_defaults():
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert names == [
        "tiny",
        "transfusion-0.16b",
        "transfusion-0.37b",
        "transfusion-0.76b",
        "transfusion-1.4b",
        "transfusion-7b",
    ]
    cfg = load_config("transfusion-7b")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (
        32,
        4096,
        32,
    )
    assert cfg.data.global_batch_tokens == 4 * 2**20 and cfg.data.seq_length == 4096
    o = cfg.optimizer
    assert (
        o.lr,
        o.min_lr,
        o.warmup_steps,
        o.beta1,
        o.beta2,
        o.eps,
        o.weight_decay,
        o.grad_clip,
    ) == (3e-4, 1.5e-5, 4000, 0.9, 0.95, 1e-8, 0.1, 1.0)
    d = cfg.diffusion
    assert (d.train_timesteps, d.loss_weight, d.image_first_max_timestep) == (1000, 5.0, 500)
    assert cfg.data.caption_first_probability == 0.8


def test_overrides_are_typed():
    cfg = load_config(
        "tiny",
        [
            "model.num_layers=8",
            "optimizer.lr=1e-3",
            "model.unet_channels=[32]",
            "parallel.virtual_pipeline=null",
            "optimizer.beta2=0",
        ],
    )
    assert cfg.model.num_layers == 8 and cfg.optimizer.lr == 1e-3
    assert cfg.model.unet_channels == [32] and cfg.parallel.virtual_pipeline is None
    assert isinstance(cfg.optimizer.beta2, float) and cfg.optimizer.beta2 == 0.0


def test_yaml_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  num_layers: 2\n")
    assert load_config(str(path)).model.num_layers == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.hiden_size=64"],
            "unknown config field 'model.hiden_size' (did you mean 'model.hidden_size'?)",
        ),
        (["modle.hidden_size=64"], "unknown config field 'modle'"),
        (["model.num_layers=two"], "config field 'model.num_layers': expected int, got 'two'"),
        (["model.num_layers=2.5"], "config field 'model.num_layers': expected int"),
        (["optimizer.lr=fast"], "config field 'optimizer.lr': expected float, got 'fast'"),
        (["model.latent_size=true"], "config field 'model.latent_size': expected int, got True"),
        (
            ["model.patch_layer=conv"],
            "config field 'model.patch_layer': 'conv' is not one of 'linear', 'unet'",
        ),
        (
            ["model.hidden_size=130"],
            "config field 'model.hidden_size': 130 is not divisible by model.num_attention_heads=4",
        ),
        (["parallel.tensor_parallel=3"], "config field 'parallel.tensor_parallel'"),
        (
            ["model.num_layers=3", "parallel.pipeline_parallel=2"],
            "config field 'model.num_layers': 3 layers cannot be split",
        ),
        (
            ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=4"],
            "config field 'model.num_layers'",
        ),
        (["model.patch_size=3"], "config field 'model.patch_size': 3 is not one of 1, 2, 4, 8"),
        (
            ["model.patch_layer=unet", "model.patch_size=2", "model.latent_size=8"],
            "config field 'model.unet_channels'",
        ),
        (["data.seq_length=10"], "config field 'data.seq_length'"),
        (["data.global_batch_tokens=1000"], "config field 'data.global_batch_tokens'"),
        (
            ["diffusion.image_first_max_timestep=1000"],
            "config field 'diffusion.image_first_max_timestep'",
        ),
        (["model.num_layers"], "expected the form section.field=value"),
        (
            ["parallel.sequence_parallel=true"],
            "config field 'parallel.sequence_parallel': needs parallel.tensor_parallel > 1",
        ),
        (["checkpoint.interval=0"], "config field 'checkpoint.interval': must be ≥ 1"),
        (["checkpoint.interval=-100"], "config field 'checkpoint.interval': must be ≥ 1"),
        (["run.log_interval=-10"], "config field 'run.log_interval': must be ≥ 1"),
        (["optimizer.lr=0"], "config field 'optimizer.lr': must be positive"),
        (["optimizer.lr=-3e-4"], "config field 'optimizer.lr': must be positive"),
        (["run.train_steps=0"], "config field 'run.train_steps': must be ≥ 1"),
        # What the DeepSpeed engine cannot run is refused here, and only here.
        (
            ["parallel.engine=deepspeed", "parallel.pipeline_parallel=2"],
            "config field 'parallel.engine': "
            "deepspeed is only supported without pipeline parallelism",
        ),
        (
            ["parallel.engine=deepspeed", "parallel.zero_stage=0"],
            "config field 'parallel.zero_stage': must be 1, 2 or 3",
        ),
        (
            ["parallel.engine=deepspeed", "parallel.zero_stage=4"],
            "config field 'parallel.zero_stage': must be 1, 2 or 3",
        ),
        (
            [
                "parallel.engine=deepspeed",
                "parallel.tensor_parallel=2",
                "parallel.sequence_parallel=true",
            ],
            "config field 'parallel.sequence_parallel': needs parallel.engine=megatron",
        ),
        (
            ["parallel.engine=deepspeed", "checkpoint.async_save=true"],
            "config field 'checkpoint.async_save'",
        ),
        # data.sources: the replaced keys say what replaced them; each item is checked.
        (["data.text_data=shards/text"], "config field 'data.text_data' was replaced: list"),
        (["data.text_token_fraction=0.3"], "the weights of data.sources are the token shares"),
        (["data.sources=[{kind: text}]"], "config field 'data.sources[0].path' is required"),
        (["data.sources=[{kind: audio, path: x}]"], "'data.sources[0].kind': 'audio' is not"),
        (["data.sources.1.weight=-1"], "config field 'data.sources[1].weight': must be ≥ 0"),
        (["data.sources.2.weight=1"], "'2' is not an index of the list there (2 items)"),
        (["data.sources=[{kind: text, path: a}, {kind: text, path: a}]"], "'a' names two"),
        (["data.sources.0.weight=0", "data.sources.1.weight=0"], "every weight is 0"),
        (["data.sources={kind: text}"], "config field 'data.sources': expected a list"),
        # eval.sources: named, each its own metrics; the held-out images come from one.
        (["eval.text_data=shards/text"], "'eval.text_data' was replaced: list the held-out"),
        (["eval.sources=[{kind: text, path: a}]"], "'eval.sources[0].name': give each held-out"),
        (
            ["eval.sources=[{name: a, kind: text, path: x}, {name: a, kind: text, path: y}]"],
            "config field 'eval.sources[1].name': give each held-out source its own name",
        ),
        (["eval.sources=[]"], "config field 'eval.interval': needs held-out data: list it in"),
        (
            ["eval.sources.1.kind=interleaved", "eval.samples=4"],
            "'eval.samples': needs held-out images and captions: an image_caption source",
        ),
        # Diagnostics: a profiled range inside the run; stacks dumped before the timeout.
        (["profile.steps=[3, 2]"], "config field 'profile.steps': [3, 2] is not [first, last]"),
        (["profile.steps=[5]"], "config field 'profile.steps': [5] is not [first, last]"),
        (["run.train_steps=4", "profile.steps=[2, 5]"], "last ≤ run.train_steps=4"),
        (["wandb.mode=online2"], "config field 'wandb.mode': 'online2' is not one of"),
        (["distributed.timeout_minutes=0"], "'distributed.timeout_minutes': must be positive"),
        (
            ["distributed.timeout_minutes=5", "distributed.hang_watchdog_minutes=5"],
            "config field 'distributed.hang_watchdog_minutes': must lie in [0, "
            "distributed.timeout_minutes=5.0)",
        ),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert message in str(info.value)


def test_data_sources_from_yaml_and_dotted_overrides():
    cfg = load_config("tiny", ["data.sources.1.path=shards/img", "data.sources.0.weight=0.25"])
    text, images = cfg.data.sources
    assert (text.kind, text.label, text.weight) == ("text", "text", 0.25)
    assert (images.kind, images.path, images.label) == ("image_caption", "shards/img", "images")
    assert cfg.data.text_share == pytest.approx(0.25 / 0.75)
    three = sources_override("t", "i").replace("]", ', {"kind": "image_caption", "path": "j"}]')
    cfg = load_config("tiny", [three])
    assert [s.label for s in cfg.data.sources] == ["text", "image_caption", "j"]  # j: its path
    assert cfg.data.text_share == pytest.approx(1 / 3)
    assert load_config("transfusion-7b").data.text_share == 0.5  # no data: the paper's mix


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config("huge")
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_cli_reports_one_line_without_traceback():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from megatron_transfusion.cli import config_main; config_main()",
            "--config",
            "tiny",
            "model.hiden_size=64",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config field 'model.hiden_size' (did you mean 'model.hidden_size'?)"
    ]


def test_batch_geometry_splits_the_global_batch_or_names_the_field():
    data = load_config(
        "tiny", ["data.seq_length=256", "data.global_batch_tokens=6144", "data.micro_batch_size=2"]
    ).data
    geometry = BatchGeometry.of(data, dp_size=3)
    assert (geometry.sequences, geometry.micro_batches) == (24, 4)
    with pytest.raises(
        ConfigError,
        match="'data.global_batch_tokens': 24 sequences per step do not "
        "split into 5 data-parallel ranks × micro-batches of 2",
    ):
        BatchGeometry.of(data, dp_size=5)


def test_train_help_lists_the_config_sections_and_points_at_mtf_config(capsys):
    from megatron_transfusion.cli import train_main

    with pytest.raises(SystemExit) as exit:
        train_main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    sections = out.split("config sections", 1)[1]
    for name in ExperimentConfig().to_dict():
        assert f"\n  {name} " in sections, name
    assert "mtf-config --config PRESET" in sections


def test_a_config_saved_before_eval_sources_still_loads():
    """Every run's config.yaml (so every checkpoint) written before eval.sources: its
    held-out paths become named sources; the nulls it wrote go."""
    saved = load_config("tiny").to_dict()
    del saved["eval"]["sources"]
    old = {**saved, "eval": {**saved["eval"], "text_data": "t", "image_caption_data": "i"}}
    sources = config_from_tree(old).eval.sources
    assert [(s.name, s.kind, s.path) for s in sources] == [
        ("text", "text", "t"),
        ("image_caption", "image_caption", "i"),
    ]
    assert config_from_tree(old).eval.image_caption_data == "i"
    nulls = {**saved, "eval": {**saved["eval"], "interval": 0, "text_data": None}}
    assert config_from_tree(nulls).eval.sources == []
