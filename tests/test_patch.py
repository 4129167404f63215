import pytest
import torch

from megatron_transfusion.config import ModelConfig
from megatron_transfusion.model.patch import (
    LinearPatchIn, UNetPatchIn, UNetPatchOut, build_patch_layers, patchify, unpatchify,
)  # fmt: skip


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
    cfg = ModelConfig(hidden_size=32, latent_channels=8, latent_size=16, patch_size=k,
                      patch_layer=kind, unet_channels=[8] * levels, unet_blocks_per_level=1,
                      timestep_frequency_dim=16)  # fmt: skip
    patch_in, patch_out = (layer(cfg) for layer in build_patch_layers(cfg))
    x, t = torch.randn(2, 8, 16, 16), torch.tensor([0, 999])
    hidden = patch_in(x, t)
    assert hidden.shape == (2, cfg.patches_per_image, 32)
    assert patch_out(hidden, t).shape == x.shape


def test_linear_patch_in_adds_the_timestep_embedding_before_the_linear_layer():
    cfg = ModelConfig(hidden_size=32, latent_size=4, patch_size=2, patch_layer="linear",
                      timestep_frequency_dim=16)  # fmt: skip
    layer = LinearPatchIn(cfg)
    x, t = torch.randn(2, 8, 4, 4), torch.tensor([3, 700])
    embedding = layer.timestep_embedding(t)  # [n, patch_dim]: lives in patch space
    assert embedding.shape == (2, cfg.patch_dim)
    expected = layer.proj(patchify(x, 2) + embedding[:, None])
    torch.testing.assert_close(layer(x, t), expected)


def test_unet_uses_plain_layer_norm_and_conditions_on_time():
    cfg = ModelConfig(hidden_size=32, latent_size=8, patch_size=2, unet_channels=[8, 16],
                      unet_blocks_per_level=1, timestep_frequency_dim=16)  # fmt: skip
    down, up = UNetPatchIn(cfg), UNetPatchOut(cfg)
    norms = [m for m in list(down.modules()) + list(up.modules()) if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(n.elementwise_affine for n in norms)
    x = torch.randn(1, 8, 8, 8)
    assert not torch.allclose(down(x, torch.tensor([0])), down(x, torch.tensor([900])))
