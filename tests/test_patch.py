import math

import pytest
import torch

from megatron_transfusion.config import ModelConfig
from megatron_transfusion.model.patch import (
    LinearPatchIn,
    UNetPatchIn,
    UNetPatchOut,
    build_patch_layers,
    patchify,
    sincos_2d,
    unpatchify,
)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patchify_round_trip_and_order(k):
    x = torch.randn(3, 8, 16, 16)
    patches = patchify(x, k)
    assert patches.shape == (3, (16 // k) ** 2, 8 * k * k)
    torch.testing.assert_close(unpatchify(patches, k, 8, 16), x, rtol=0, atol=0)
    # Patch 1 is the k×k block right of patch 0 (row-major grid).
    torch.testing.assert_close(patches[:, 1].view(3, 8, k, k), x[:, :, :k, k : 2 * k])


@pytest.mark.parametrize("kind", ["linear", "unet"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_patch_layers_map_latents_to_patch_vectors_and_back(kind, k):
    levels = {1: 1, 2: 2, 4: 3, 8: 4}[k]
    cfg = ModelConfig(
        hidden_size=32,
        latent_channels=8,
        latent_size=16,
        patch_size=k,
        patch_layer=kind,
        unet_channels=[8] * levels,
        unet_blocks_per_level=1,
        timestep_frequency_dim=16,
    )
    patch_in, patch_out = (layer(cfg) for layer in build_patch_layers(cfg))
    x, t = torch.randn(2, 8, 16, 16), torch.tensor([0, 999])
    hidden = patch_in(x, t)
    assert hidden.shape == (2, cfg.patches_per_image, 32)
    assert patch_out(hidden, t).shape == x.shape


def test_linear_patch_in_adds_the_timestep_embedding_before_the_linear_layer():
    cfg = ModelConfig(
        hidden_size=32, latent_size=4, patch_size=2, patch_layer="linear", timestep_frequency_dim=16
    )
    layer = LinearPatchIn(cfg)
    x, t = torch.randn(2, 8, 4, 4), torch.tensor([3, 700])
    embedding = layer.timestep_embedding(t)  # [n, patch_dim]: lives in patch space
    assert embedding.shape == (2, cfg.patch_dim)
    expected = layer.proj(patchify(x, 2) + embedding[:, None])
    torch.testing.assert_close(layer(x, t), expected)


def test_unet_uses_plain_layer_norm_and_conditions_on_time():
    cfg = ModelConfig(
        hidden_size=32,
        latent_size=8,
        patch_size=2,
        unet_channels=[8, 16],
        unet_blocks_per_level=1,
        timestep_frequency_dim=16,
    )
    down, up = UNetPatchIn(cfg), UNetPatchOut(cfg)
    norms = [
        m for m in list(down.modules()) + list(up.modules()) if isinstance(m, torch.nn.LayerNorm)
    ]
    assert norms and all(n.elementwise_affine for n in norms)
    x = torch.randn(1, 8, 8, 8)
    assert not torch.allclose(down(x, torch.tensor([0])), down(x, torch.tensor([900])))


def test_sincos_2d_encodes_row_then_column():
    """By hand for a 3×3 grid of 8 channels: per axis sin(p·ω), cos(p·ω) with ω = 1, 1e-2."""
    table = sincos_2d(3, 8)
    assert table.shape == (9, 8)
    for index in range(9):
        row, col = divmod(index, 3)
        expected = [
            math.sin(row),
            math.sin(row / 100),
            math.cos(row),
            math.cos(row / 100),
            math.sin(col),
            math.sin(col / 100),
            math.cos(col),
            math.cos(col / 100),
        ]
        torch.testing.assert_close(table[index], torch.tensor(expected))


def test_image_position_embedding_adds_the_table_to_each_image_patch(megatron_world):
    """Same weights with and without sincos2d: the embedded sequences differ by exactly the
    table at every image's patches and nowhere else; the table is not saved."""
    from megatron_transfusion.config import load_config
    from megatron_transfusion.model import build_model
    from megatron_transfusion.parallel import seed_everything
    from megatron_transfusion.synthetic import random_batch

    embedded = {}
    for option in ("none", "sincos2d"):
        cfg = load_config("tiny", [f"model.image_position_embedding={option}"])
        seed_everything(0)
        (model,) = build_model(cfg, megatron_world)
        batch = random_batch(torch.Generator().manual_seed(1), cfg.model, 2, 64)
        embedded[option] = model._embed(batch).detach()  # [s, b, h]
    assert "patch_positions" not in model.state_dict()
    assert batch.num_images > 0
    difference = (embedded["sincos2d"] - embedded["none"]).transpose(0, 1)  # [b, s, h]
    rows, cols = batch.image_positions()
    table = sincos_2d(cfg.model.latent_size // cfg.model.patch_size, cfg.model.hidden_size)
    torch.testing.assert_close(difference[rows, cols], table.repeat(batch.num_images, 1))
    difference[rows, cols] = 0
    assert difference.abs().max() == 0
