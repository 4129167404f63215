import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_prep.images import center_crop_resize, decode_image, from_model_range, to_model_range
from data_prep.vae import (
    ConvVAE,
    VAEConfig,
    bilinear_baseline,
    is_held_out,
    load_vae,
    psnr,
    read_image_set,
    reconstruct,
    save_vae,
    scaling_factor,
    train_vae,
    train_vae_main,
)
from tests.data_fixtures import add_member

TINY = VAEConfig(base_channels=8)


def shapes(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with one flat disc each: structured, so a VAE can learn them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0.2, 0.8, (n, 1, 1, 3))
    image = base + 0.4 * (
        rng.uniform(-1, 1, (n, 1, 1, 3)) * xx[..., None]
        + rng.uniform(-1, 1, (n, 1, 1, 3)) * yy[..., None]
    )
    cx, cy, r = (rng.uniform(lo, hi, (n, 1, 1)) for lo, hi in ((0.3, 0.7), (0.3, 0.7), (0.15, 0.3)))
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    image = np.where(disc[..., None], rng.uniform(0, 1, (n, 1, 1, 3)), image)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def saved_tiny_vae(directory, seed=0, factor=0.7):
    torch.manual_seed(seed)
    save_vae(ConvVAE(TINY), TINY, factor, directory)
    return directory


# ------------------------------------------------------------------------------------------
# Model and encoder interface


@pytest.mark.parametrize("size", [32, 64, 256])
def test_round_trip_shapes(tmp_path, size):
    encoder = load_vae(saved_tiny_vae(tmp_path))
    images = torch.rand(2, 3, size, size) * 2 - 1
    latents = encoder.encode(images)
    assert latents.shape == (2, 8, size // 8, size // 8)
    decoded = encoder.decode(latents)
    assert decoded.shape == images.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_encode_is_the_scaled_posterior_mean_and_deterministic(tmp_path):
    encoder = load_vae(saved_tiny_vae(tmp_path, factor=0.7))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    first = encoder.encode(images)
    torch.testing.assert_close(encoder.encode(images), first, rtol=0, atol=0)
    mean = encoder.model.encode(images)[0]
    torch.testing.assert_close(first, mean * 0.7)
    assert not first.requires_grad
    # decode undoes the scaling: decoding scaled latents equals decoding the raw mean.
    torch.testing.assert_close(encoder.decode(first), encoder.model.decode(mean).clamp(-1, 1))


def test_encode_rejects_sizes_not_divisible_by_downsample(tmp_path):
    encoder = load_vae(saved_tiny_vae(tmp_path))
    with pytest.raises(ValueError, match="divisible by 8"):
        encoder.encode(torch.zeros(1, 3, 36, 32))


def test_save_load_round_trip_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    model = ConvVAE(TINY).eval()
    save_vae(model, TINY, 0.5, tmp_path / "a")
    save_vae(model, TINY, 0.5, tmp_path / "same")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a = load_vae(tmp_path / "a", expected_latent_channels=8)
    with torch.no_grad():
        torch.testing.assert_close(a.encode(images), model.encode(images)[0] * 0.5, rtol=0, atol=0)
    print_a = a.fingerprint()
    assert print_a == {
        "kind": "conv_vae",
        "path": str((tmp_path / "a").resolve()),
        "sha256": print_a["sha256"],
        "latent_channels": 8,
        "downsample": 8,
        "scaling_factor": 0.5,
        "shift_factor": 0.0,
    }
    assert load_vae(tmp_path / "same").fingerprint()["sha256"] == print_a["sha256"]

    with torch.no_grad():
        model.decoder[0].bias[0] += 1e-3
    save_vae(model, TINY, 0.5, tmp_path / "b")
    assert load_vae(tmp_path / "b").fingerprint()["sha256"] != print_a["sha256"]


def test_load_vae_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_vae(missing)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "other")) + ".*neither"):
        load_vae(tmp_path / "other")
    vae = saved_tiny_vae(tmp_path / "vae")
    with pytest.raises(ValueError, match=re.escape(f"{vae} has 8 latent channels, expected 4")):
        load_vae(vae, expected_latent_channels=4)
    meta = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "bogus": 1}}))
    with pytest.raises(ValueError, match="malformed"):
        load_vae(vae)
    (vae / "config.json").write_text(json.dumps(meta))
    (vae / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_vae(vae)


def test_diffusers_directory_with_only_pickle_weights_is_refused(tmp_path):
    config = {"_class_name": "AutoencoderKL", "latent_channels": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_vae(tmp_path)


def test_diffusers_autoencoder_kl(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=2,
        sample_size=32,
        scaling_factor=0.25,
        shift_factor=0.1,
    ).eval()
    reference.save_pretrained(tmp_path)
    encoder = load_vae(tmp_path, expected_latent_channels=8)
    assert (encoder.latent_channels, encoder.downsample, encoder.scaling_factor) == (8, 8, 0.25)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = encoder.encode(images)
    assert latents.shape == (2, 8, 4, 4)
    with torch.no_grad():
        mean = reference.encode(images).latent_dist.mean
        torch.testing.assert_close(latents, (mean - 0.1) * 0.25)
        torch.testing.assert_close(
            encoder.decode(latents), reference.decode(mean).sample.clamp(-1, 1)
        )
    fingerprint = encoder.fingerprint()
    assert fingerprint["kind"] == "diffusers_autoencoder_kl" and fingerprint["shift_factor"] == 0.1
    assert len(fingerprint["sha256"]) == 64
    with pytest.raises(ValueError, match="expected 16"):
        load_vae(tmp_path, expected_latent_channels=16)


# ------------------------------------------------------------------------------------------
# Image helpers


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_center_crop_resize_keeps_the_centre_without_squashing():
    # 60x20: blue 20 px margins either side of a centre square whose left half is red, right green.
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 20:30] = (255, 0, 0)
    pixels[:, 30:40] = (0, 255, 0)
    out = center_crop_resize(Image.fromarray(pixels), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:, :4] == (255, 0, 0)).all() and (out[:, 6:] == (0, 255, 0)).all()
    assert out[..., 2].max() == 0  # nothing of the margins


def test_decode_image_composites_alpha_onto_white_and_rejects_garbage():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decode_image(png_bytes(rgba))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((3, 3)) == (255, 255, 255)
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(b"definitely not an image")
    with pytest.raises(ValueError, match="undecodable"):
        decode_image(png_bytes(Image.new("RGB", (64, 64), "red"))[:60])  # truncated


def test_model_range_round_trip_is_exact():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    x = to_model_range(images)
    assert x.shape == (2, 3, 8, 6) and x.min() >= -1 and x.max() <= 1
    assert x[0, :, 1, 2].tolist() == pytest.approx((images[0, 1, 2] / 127.5 - 1).tolist())
    np.testing.assert_array_equal(from_model_range(x), images)
    with pytest.raises(ValueError):
        to_model_range(images.astype(np.float32))


def test_psnr_and_bilinear_baseline():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(10 * np.log10(255**2))
    flat = np.full((2, 32, 32, 3), 77, np.uint8)
    np.testing.assert_array_equal(bilinear_baseline(flat), flat)
    detailed = shapes(4)
    assert 15 < psnr(bilinear_baseline(detailed), detailed) < 40  # loses detail, keeps the gist


# ------------------------------------------------------------------------------------------
# Training


def test_training_is_deterministic_given_the_seed():
    images = shapes(32)
    runs = [train_vae(images, TINY, steps=3, batch_size=8, seed=s)[0] for s in (1, 1, 2)]
    same, other = (list(zip(runs[0].parameters(), m.parameters())) for m in runs[1:])
    assert all(torch.equal(p, q) for p, q in same)
    assert not all(torch.equal(p, q) for p, q in other)


def test_short_training_learns_and_scaling_gives_unit_latents(tmp_path):
    images, held_out = shapes(400), shapes(64, seed=1)
    model, history = train_vae(images, VAEConfig(), steps=200, batch_size=8, lr=3e-3)
    first = np.mean([r["recon"] for r in history[:10]])
    last = np.mean([r["recon"] for r in history[-10:]])
    assert last < 0.4 * first, (first, last)
    untrained = ConvVAE(VAEConfig()).eval()
    trained_db, untrained_db = (
        psnr(reconstruct(m, held_out), held_out) for m in (model, untrained)
    )
    assert trained_db > untrained_db + 5, (trained_db, untrained_db)

    factor = scaling_factor(model, images)
    encoder = load_vae(save_vae(model, model.config, factor, tmp_path))
    assert encoder.encode(to_model_range(images)).std().item() == pytest.approx(1.0, rel=1e-3)


def test_train_vae_main_trains_reports_and_saves(tmp_path, capsys):
    np.savez(tmp_path / "set.npz", images=shapes(40))
    train_vae_main(
        [
            "--images",
            str(tmp_path / "set.npz"),
            "--out",
            str(tmp_path / "vae"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--base-channels",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert "38 training and 2 held-out images" in out
    assert re.search(r"held-out PSNR: VAE [\d.]+ dB, bilinear baseline [\d.]+ dB", out)
    assert load_vae(tmp_path / "vae", expected_latent_channels=8).kind == "conv_vae"
    good = ["--images", str(tmp_path / "set.npz"), "--out", str(tmp_path / "x")]
    for bad in (["--steps", "0"], ["--images", str(tmp_path / "missing.npz"), "--steps", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            train_vae_main(good + bad)
        assert exit_info.value.code == 2


# Measured for the committed VAE: emoji 22.40 vs 13.52 dB, shapes 33.63 vs 17.04 dB.
MARGIN_DB = {"emoji": 7.0, "shapes": 14.0}


@pytest.mark.parametrize("part", ["emoji", "shapes"])
def test_builtin_vae_beats_bilinear_on_heldout_images(part):
    """The committed VAE (trained on the built-in train split: emoji and shapes scenes) against
    down/up-sampling to the same 4×4 grid, on the held-out split it never saw (for shapes:
    attribute combinations it never saw)."""
    from data_prep.builtin import builtin_image_captions
    from data_prep.prepare_builtin import BUILTIN_VAE
    from data_prep.vae import bilinear_baseline, psnr

    heldout, _ = builtin_image_captions("heldout")[part]
    vae = load_vae(BUILTIN_VAE, expected_latent_channels=8)
    with torch.no_grad():
        reconstructed = from_model_range(vae.decode(vae.encode(to_model_range(heldout))))
    ours, baseline = psnr(heldout, reconstructed), psnr(heldout, bilinear_baseline(heldout))
    assert ours > baseline + MARGIN_DB[part], (ours, baseline)


# ------------------------------------------------------------------------------------------
# mtf-train-vae from the sharding job's inputs


def write_image_inputs(root: Path, images: np.ndarray, reverse_tar=False) -> dict[str, Path]:
    """The same images as a tar (KEY.png + KEY.txt), a Parquet file ('picture' column) and a
    folder of PNGs with caption sidecars."""
    root.mkdir(parents=True, exist_ok=True)
    pngs = [png_bytes(Image.fromarray(image)) for image in images]
    with tarfile.open(root / "images.tar", "w") as tar:
        for i in range(len(pngs))[::-1] if reverse_tar else range(len(pngs)):
            add_member(tar, f"{i:03d}.png", pngs[i])
            add_member(tar, f"{i:03d}.txt", f"picture {i}".encode())
    pq.write_table(pa.table({"picture": pngs}), root / "images.parquet")
    (root / "images").mkdir()
    for i, png in enumerate(pngs):
        (root / "images" / f"{i:03d}.png").write_bytes(png)
        (root / "images" / f"{i:03d}.txt").write_text(f"picture {i}")
    return {
        "tar": root / "images.tar",
        "parquet": root / "images.parquet",
        "folder": root / "images",
    }


def keys_of(form: str, n: int) -> list[str]:
    name = {"tar": "images.tar/{:03d}", "parquet": "images.parquet/{}", "folder": "images/{:03d}"}
    return [name[form].format(i) for i in range(n)]


def run_train_vae(capsys, *args: str) -> str:
    train_vae_main([*args, "--steps", "2", "--batch-size", "4", "--base-channels", "8"])
    return capsys.readouterr().out


def assert_error(capsys, message: str) -> None:
    """argparse's usage, then the whole error on one line."""
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(f"mtf-train-vae: error: .*{message}.*", last), last


@pytest.mark.parametrize("form", ["tar", "parquet", "folder"])
def test_train_vae_main_from_the_sharding_inputs(tmp_path, capsys, form):
    inputs = write_image_inputs(tmp_path / "in", shapes(30, size=24))
    extra = ["--latent-channels", "4", "--downsample", "4"] if form == "folder" else []
    out = run_train_vae(
        capsys,
        "--inputs",
        str(inputs[form]),
        "--image-size",
        "16",
        "--image-column",
        "picture",
        "--holdout",
        "0.2",
        "--out",
        str(tmp_path / "vae"),
        *extra,
    )
    held = int(is_held_out(keys_of(form, 30), 0.2).sum())
    assert 1 <= held < 30
    assert f"{30 - held} training and {held} held-out images of 16x16\n" in out
    assert "rejected" not in out
    psnr_line = r"held-out PSNR: VAE ([\d.]+) dB, bilinear baseline ([\d.]+) dB"
    vae_db, base_db = map(float, re.search(psnr_line, out).groups())
    assert 0 < vae_db < 60 and 10 < base_db < 40
    encoder = load_vae(tmp_path / "vae")
    c, d = (4, 4) if form == "folder" else (8, 8)
    assert (encoder.latent_channels, encoder.downsample) == (c, d)
    assert encoder.encode(torch.zeros(1, 3, 16, 16)).shape == (1, c, 16 // d, 16 // d)


def test_train_vae_main_reads_mixed_inputs_and_counts_rejected(tmp_path, capsys):
    inputs = write_image_inputs(tmp_path / "in", shapes(12, size=16))
    with tarfile.open(inputs["tar"], "a") as tar:
        add_member(tar, "orphan.txt", b"a caption without an image")
    (inputs["folder"] / "broken.jpg").write_bytes(b"not an image")
    truncated = png_bytes(Image.new("RGB", (64, 64), "red"))[:60]
    (inputs["folder"] / "truncated.png").write_bytes(truncated)
    out = run_train_vae(
        capsys,
        "--inputs",
        str(tmp_path / "in"),
        "--image-size",
        "16",
        "--image-column",
        "picture",
        "--out",
        str(tmp_path / "vae"),
    )
    keys = keys_of("tar", 12) + keys_of("parquet", 12) + keys_of("folder", 12)
    held = int(is_held_out(keys, 0.05).sum())
    assert f"{36 - held} training and {held} held-out images of 16x16\n" in out
    assert (
        "3 rejected: missing_image 1 (first: images.tar/orphan), "
        "undecodable_image 2 (first: images/broken)\n"
    ) in out
    assert load_vae(tmp_path / "vae").kind == "conv_vae"


def test_held_out_split_is_deterministic_disjoint_and_order_free(tmp_path):
    images = shapes(60, size=16)
    forward = write_image_inputs(tmp_path / "a", images)["tar"]
    backward = write_image_inputs(tmp_path / "b", images, reverse_tar=True)["tar"]

    def split(tar):
        train, held, _ = read_image_set([str(tar)], 16, holdout=0.2)
        return {image.tobytes() for image in train}, {image.tobytes() for image in held}

    (train, held), *others = [split(tar) for tar in (forward, backward, forward)]
    assert others == [(train, held)] * 2  # the same split again and in reversed member order
    assert not train & held and train | held == {image.tobytes() for image in images}
    assert len(held) == is_held_out(keys_of("tar", 60), 0.2).sum() and 1 <= len(held) <= 30

    keys = [f"shard-{i // 100}.tar/{i:05d}" for i in range(4000)]
    held = is_held_out(keys, 0.1)
    assert 320 < held.sum() < 480  # ~10%
    np.testing.assert_array_equal(is_held_out(keys[::-1], 0.1), held[::-1])  # order-free
    np.testing.assert_array_equal(is_held_out(keys[:1000], 0.1), held[:1000])  # per key
    assert is_held_out(keys[:3], 1e-6).sum() == 1  # at least one image is held out


def test_train_vae_main_input_errors_are_one_line(tmp_path, capsys):
    inputs = write_image_inputs(tmp_path / "in", shapes(4, size=16))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    (tmp_path / "empty").mkdir()
    folder, out = str(inputs["folder"]), str(tmp_path / "vae")
    cases = [
        (
            [str(tmp_path / "bad")],
            r"0 usable images in .*bad \(need 2 or more\); "
            r"1 rejected: undecodable_image 1 \(first: bad/x\)",
        ),
        ([str(tmp_path / "empty")], "no .tar/.parquet files or image files in"),
        ([f"{folder}/000.png"], "expected one of .tar, .parquet or a folder of images"),
        ([str(tmp_path / "missing")], "input '.*missing' does not exist"),
        ([str(inputs["parquet"]), "--image-column", "img"], r"has no column\(s\) \['img'\]"),
        ([folder, "--image-size", "12"], "image size 12x12 is not a multiple of --downsample 8"),
        ([folder, "--holdout", "1"], r"--holdout must be in \(0, 1\)"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_train_vae(capsys, "--out", out, "--image-size", "16", "--inputs", *args)
        assert exit_info.value.code == 2
        assert_error(capsys, message)
    assert not (tmp_path / "vae").exists()
