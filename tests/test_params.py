"""Parameter counts: the formula agrees with the instantiated Megatron model, and the
presets have the paper's sizes."""

import pytest

from megatron_transfusion.config import load_config
from megatron_transfusion.model.params import count_parameters

PAPER = {
    "transfusion-0.16b": 0.16e9,
    "transfusion-0.37b": 0.37e9,
    "transfusion-0.76b": 0.76e9,
    "transfusion-1.4b": 1.4e9,
    "transfusion-7b": 7.0e9,
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_presets_have_paper_sizes(preset):
    count = count_parameters(load_config(preset).model)
    assert count.language_model == pytest.approx(PAPER[preset], rel=0.05)
    # The U-Net patch layers add about 0.27B at every size.
    assert count.patch_layers == pytest.approx(0.27e9, rel=0.05)


def instantiated_parameters(cfg, world):
    from megatron_transfusion.model import build_model

    (model,) = build_model(cfg, world)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["tiny", "transfusion-0.16b", "transfusion-0.37b"])
def test_formula_matches_instantiated_model(preset, megatron_world):
    # Two layers keep it cheap; the formula is linear in depth and uses the preset's widths.
    cfg = load_config(preset, ["model.num_layers=2", "model.patch_layer=linear"])
    assert count_parameters(cfg.model).total == instantiated_parameters(cfg, megatron_world)


def test_formula_matches_with_grouped_query_attention_and_unet(megatron_world):
    cfg = load_config(
        "tiny",
        [
            "model.num_query_groups=2",
            "model.patch_layer=unet",
            "model.patch_size=2",
            "model.unet_channels=[16, 32]",
        ],
    )
    assert count_parameters(cfg.model).total == instantiated_parameters(cfg, megatron_world)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["transfusion-0.76b", "transfusion-1.4b", "transfusion-7b"])
def test_formula_matches_large_presets(preset, megatron_world):
    cfg = load_config(preset, ["model.num_layers=1"])
    assert count_parameters(cfg.model).total == instantiated_parameters(cfg, megatron_world)
