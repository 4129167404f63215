"""The built-in data goes from committed files to loadable shards with no user input."""

import json

import torch

from data_prep.builtin import SHAPES_SAMPLES, load_builtin_images
from data_prep.prepare_builtin import prepare_builtin
from data_prep.vae import ConvVAE, VAEConfig, load_vae, save_vae
from megatron_transfusion.config import load_config, sources_override
from megatron_transfusion.data import MixedModalityLoader


def test_builtin_data_prepares_and_loads(tmp_path):
    torch.manual_seed(0)
    vae = save_vae(ConvVAE(VAEConfig()), VAEConfig(), 1.0, tmp_path / "vae")  # any VAE will do
    paths = prepare_builtin(tmp_path / "builtin", vae=vae)
    manifests = {k: json.loads((p / "manifest.json").read_text()) for k, p in paths.items()}
    images, _ = load_builtin_images()
    train, heldout = (manifests[f"images_{split}"]["num_samples"] for split in ("train", "heldout"))
    assert train + heldout == len(images) + sum(SHAPES_SAMPLES.values())  # emoji + shapes
    assert heldout == len(images) // 20 + SHAPES_SAMPLES["heldout"]
    assert manifests["text_train"]["num_tokens"] > 50_000
    assert all(not any(k.startswith("rejected") for k in m["counts"]) for m in manifests.values())
    # A re-run finds everything done.
    assert prepare_builtin(tmp_path / "builtin", vae=vae) == paths
    # With another VAE (a newly committed one, say) the image shards are made again, the text kept.
    torch.manual_seed(1)
    other = load_vae(save_vae(ConvVAE(VAEConfig()), VAEConfig(), 1.0, tmp_path / "other"))
    text_written = (paths["text_train"] / "manifest.json").stat().st_mtime_ns
    assert prepare_builtin(tmp_path / "builtin", vae=other.path) == paths
    for split in ("train", "heldout"):
        remade = json.loads((paths[f"images_{split}"] / "manifest.json").read_text())
        assert (
            remade["vae"]["sha256"] == other.sha256 != manifests[f"images_{split}"]["vae"]["sha256"]
        )
    assert (paths["text_train"] / "manifest.json").stat().st_mtime_ns == text_written
    cfg = load_config(
        "tiny",
        [sources_override(paths["text_train"], paths["images_train"])],
    )
    step = MixedModalityLoader(cfg).next_step()
    assert len(step) == 2 and all(b.num_images > 0 for b in step)
