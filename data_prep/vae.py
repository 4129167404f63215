"""The image VAE: images <-> continuous latents (Transfusion: 8 channels, 8x downsampling).

No pretrained VAE can be downloaded here, so ``ConvVAE`` is a small KL autoencoder that trains on
CPU in minutes. ``load_vae`` also accepts a diffusers ``AutoencoderKL`` directory, so a user can
bring e.g. a Stable-Diffusion-style VAE. Weights are read from safetensors only: no pickle.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from data_prep.images import from_model_range, to_model_range
from data_prep.readers import (
    IMAGE_SUFFIXES,
    Columns,
    Rejected,
    decode_images,
    expand_inputs,
    read_unit,
)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
DIFFUSERS_WEIGHTS_GLOB = "diffusion_pytorch_model*.safetensors"  # one file, or shards


@dataclass
class VAEConfig:
    latent_channels: int = 8
    base_channels: int = 16  # width at full resolution; doubles at each stride-2 stage
    downsample: int = 8  # a power of two: log2(downsample) stride-2 stages
    blocks_per_stage: int = 1  # residual blocks after each downsampling (before each upsampling)

    def __post_init__(self):
        if self.downsample < 2 or self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if self.base_channels % 8:
            raise ValueError(f"base_channels must be a multiple of 8, got {self.base_channels}")

    @property
    def widths(self) -> list[int]:
        """Channel width at each resolution, full resolution first."""
        stages = self.downsample.bit_length() - 1
        return [self.base_channels * 2**i for i in range(stages + 1)]


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, channels), nn.GroupNorm(8, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class ConvVAE(nn.Module):
    """Stride-2 convs down, nearest-upsample + conv up; residual blocks only at the reduced
    resolutions, where they are cheap. Fully convolutional: any size divisible by ``downsample``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        w, n, c = config.widths, config.blocks_per_stage, config.latent_channels
        down: list[nn.Module] = [nn.Conv2d(3, w[0], 3, padding=1)]
        for c_in, c_out in itertools.pairwise(w):
            down.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))
            down += [ResBlock(c_out) for _ in range(n)]
        down += [nn.GroupNorm(8, w[-1]), nn.SiLU(), nn.Conv2d(w[-1], 2 * c, 3, padding=1)]
        self.encoder = nn.Sequential(*down)
        # Start near-deterministic (posterior std ~0.02): with std 1 the decoder would first see
        # mostly noise. The small KL term is free to widen it later.
        nn.init.constant_(self.encoder[-1].bias[c:], -8.0)

        up: list[nn.Module] = [nn.Conv2d(c, w[-1], 3, padding=1)]
        for c_in, c_out in itertools.pairwise(w[::-1]):
            up += [
                *(ResBlock(c_in) for _ in range(n)),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
            ]
        up += [nn.GroupNorm(8, w[0]), nn.SiLU(), nn.Conv2d(w[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*up)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, 3, H, W] in [-1, 1] -> posterior (mean, logvar), each [n, C, H/d, W/d]."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruct through a posterior sample: returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(images)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + torch.exp(0.5 * logvar) * noise), mean, logvar


# ---------------------------------------------------------------------------------------------
# Training


def train_vae(
    images: np.ndarray,
    config: VAEConfig,
    *,
    steps: int | None = None,
    max_seconds: float | None = None,
    batch_size: int = 16,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log: Callable[[dict], None] | None = None,
    log_every: int = 100,
    device: str | torch.device = "cpu",
) -> tuple[ConvVAE, list[dict]]:
    """Train on uint8 [N, H, W, 3] images with MSE + ``kl_weight`` * KL (both per-element means).

    Stops after ``steps`` or ``max_seconds``, whichever comes first. The learning rate follows a
    warmup and a cosine decay over training progress (by steps, or by wall time when only a time
    budget is given), so a time-limited run still ends at a low learning rate. With ``steps`` alone
    the run is deterministic given ``seed``. Returns the model (eval mode) and one record per step.
    """
    if steps is None and max_seconds is None:
        raise ValueError("give steps and/or max_seconds")
    if (steps is not None and steps <= 0) or (max_seconds is not None and max_seconds <= 0):
        raise ValueError(f"steps and max_seconds must be positive, got {steps} and {max_seconds}")
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    model = ConvVAE(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    pixels = torch.from_numpy(np.ascontiguousarray(images))  # stays uint8: converted per batch
    history: list[dict] = []
    start, step = time.perf_counter(), 0
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / (steps or math.inf), elapsed / (max_seconds or math.inf))
        if progress >= 1:
            break
        step_lr = lr * min(1, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = step_lr

        index = torch.randint(len(pixels), (batch_size,), generator=generator, device=device).cpu()
        batch = to_model_range(pixels[index].numpy()).to(device)
        flip = torch.rand(batch_size, generator=generator, device=device) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)

        reconstruction, mean, logvar = model(batch, generator)
        recon = F.mse_loss(reconstruction, batch)
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = recon + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        record = {
            "step": step,
            "loss": loss.item(),
            "recon": recon.item(),
            "kl": kl.item(),
            "lr": step_lr,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if log is not None and step % log_every == 0:
            log(record)
        step += 1
    return model.eval(), history


def _model_range_batches(model: ConvVAE, images: np.ndarray, batch_size: int):
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        yield to_model_range(images[i : i + batch_size]).to(device)


@torch.no_grad()
def scaling_factor(model: ConvVAE, images: np.ndarray, batch_size: int = 256) -> float:
    """1 / std of the latent means over ``images``, so scaled latents have unit variance (as in
    Stable Diffusion): the diffusion noise schedule assumes unit-scale data."""
    total = square = count = 0
    for x in _model_range_batches(model, images, batch_size):
        mean = model.encode(x)[0].double()
        total, square = total + mean.sum().item(), square + mean.square().sum().item()
        count += mean.numel()
    return 1.0 / math.sqrt(square / count - (total / count) ** 2)


@torch.no_grad()
def reconstruct(model: ConvVAE, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 images -> uint8 reconstructions through the posterior mean."""
    return np.concatenate(
        [
            from_model_range(model.decode(model.encode(x)[0]))
            for x in _model_range_batches(model, images, batch_size)
        ]
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays, from one MSE over all their pixels."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def bilinear_baseline(images: np.ndarray, factor: int = 8) -> np.ndarray:
    """Downsample by ``factor`` (bilinear, antialiased) and upsample back: the reconstruction a
    3-channel latent of the VAE's spatial size gets for free. The VAE has to beat it."""
    x = to_model_range(images)
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(h // factor, w // factor), mode="bilinear", antialias=True)
    return from_model_range(F.interpolate(small, size=(h, w), mode="bilinear"))


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_vae(
    model: ConvVAE, config: VAEConfig, scaling_factor: float, directory: str | Path
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "conv_vae", "config": asdict(config), "scaling_factor": float(scaling_factor)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    return directory


class LatentEncoder:
    """A loaded VAE as the sharding job sees it: images in [-1, 1] <-> scaled latents.

    Scaled latents are ``(mean - shift_factor) * scaling_factor``; ``shift_factor`` is 0 except for
    diffusers VAEs that define one (SD3/Flux style).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        path: Path,
        sha256: str,
        latent_channels: int,
        downsample: int,
        scaling_factor: float,
        shift_factor: float = 0.0,
    ):
        self.model = model.eval().requires_grad_(False)
        self.kind, self.path, self.sha256 = kind, path, sha256
        self.latent_channels, self.downsample = latent_channels, downsample
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] in [-1, 1] -> scaled posterior mean [n, C, H/d, W/d]: deterministic."""
        d = self.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % d or images.shape[3] % d:
            raise ValueError(
                f"expected images [n, 3, H, W] with H, W divisible by {d}, got {list(images.shape)}"
            )
        mean = self._mean(images.to(self.device, torch.float32))
        return (mean - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        latents = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self._decode(latents).clamp(-1, 1)

    def fingerprint(self) -> dict:
        """What produced a set of latents: stored with the shards so mixing VAEs is detectable."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    def _mean(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)[0]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents)


class _DiffusersEncoder(LatentEncoder):
    def _mean(self, images):
        return self.model.encode(images).latent_dist.mean

    def _decode(self, latents):
        return self.model.decode(latents).sample


def load_vae(
    path: str | Path,
    expected_latent_channels: int | None = None,
    device: str | torch.device = "cpu",
) -> LatentEncoder:
    """Load a VAE saved by ``save_vae`` or a diffusers ``AutoencoderKL`` directory."""
    path = Path(path).expanduser().resolve()
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"VAE path {path} is not a directory with a {CONFIG_FILE}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"VAE config {path / CONFIG_FILE} is not valid JSON: {e}") from None
    device = torch.device(device)

    def check_channels(channels: int) -> None:
        expected = expected_latent_channels
        if expected is not None and channels != expected:
            raise ValueError(f"VAE {path} has {channels} latent channels, expected {expected}")

    if meta.get("_class_name") == "AutoencoderKL":
        check_channels(meta.get("latent_channels", 4))  # 4: AutoencoderKL's default
        return _load_diffusers(path, device)
    if meta.get("kind") == "conv_vae":
        try:
            config, factor = VAEConfig(**meta["config"]), float(meta["scaling_factor"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"VAE config {path / CONFIG_FILE} is malformed: {e!r}") from None
        check_channels(config.latent_channels)
        weights = _weight_files(path, WEIGHTS_FILE)
        model = ConvVAE(config)
        model.load_state_dict(load_file(weights[0]))
        return LatentEncoder(
            model.to(device),
            "conv_vae",
            path,
            _sha256(weights),
            config.latent_channels,
            config.downsample,
            factor,
        )
    raise ValueError(
        f"{path} is neither a save_vae directory ({CONFIG_FILE} kind 'conv_vae') "
        f"nor a diffusers one (_class_name 'AutoencoderKL')"
    )


def _load_diffusers(path: Path, device: torch.device) -> LatentEncoder:
    weights = _weight_files(path, DIFFUSERS_WEIGHTS_GLOB)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError(f"{path} is a diffusers AutoencoderKL: `pip install diffusers`") from None
    model = AutoencoderKL.from_pretrained(
        path,
        use_safetensors=True,
        local_files_only=True,
        torch_dtype=torch.float32,
        low_cpu_mem_usage=False,
    )
    c = model.config
    downsample = 2 ** (len(c.block_out_channels) - 1)  # every block but the last halves H and W
    return _DiffusersEncoder(
        model.to(device),
        "diffusers_autoencoder_kl",
        path,
        _sha256(weights),
        c.latent_channels,
        downsample,
        float(c.scaling_factor),
        float(c.get("shift_factor") or 0.0),
    )


def _weight_files(path: Path, pattern: str) -> list[Path]:
    files = sorted(path.glob(pattern))
    if not files:
        raise FileNotFoundError(f"VAE directory {path} has no {pattern} (only safetensors load)")
    return files


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Console entry point (mtf-train-vae)


def load_image_set(npz: str | Path, holdout: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Read the ``images`` uint8 [N, H, W, 3] array; the last ``holdout`` fraction is held out."""
    with np.load(npz) as data:
        if "images" not in data:
            raise ValueError(f"{npz} has no 'images' array")
        images = data["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise ValueError(
            f"{npz}: 'images' must be uint8 [N >= 2, H, W, 3], "
            f"got {images.dtype} {list(images.shape)}"
        )
    n_eval = max(1, round(len(images) * holdout))
    return images[:-n_eval], images[-n_eval:]


def is_held_out(keys: list[str], fraction: float) -> np.ndarray:
    """Hold out the samples whose key hashes below ``fraction`` (at least the lowest one): the
    split follows the keys alone, not file order, so a re-run or re-ordered inputs agree."""
    hashes = np.array(
        [int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 for key in keys]
    )
    held = hashes < fraction
    held[np.argmin(hashes)] = True
    return held


_DEFAULT_COLUMNS = Columns()  # frozen: one shared default, as a default argument would be


def read_image_set(
    inputs: list[str], size: int, columns: Columns = _DEFAULT_COLUMNS, holdout: float = 0.05
) -> tuple[np.ndarray, np.ndarray, list[Rejected]]:
    """Decode every image of the inputs the sharding job reads (tars, Parquet, image folders;
    the same decoding, centre crop and resize) into memory as uint8 [N, size, size, 3]:
    returns (train, held_out, rejected samples). Captions are not read."""
    keys, images, rejected = [], [], []
    units = expand_inputs(inputs, IMAGE_SUFFIXES, image_folders=True)
    with tqdm(desc="decoding images", unit="img") as bar:
        for unit in units:
            for item in decode_images(read_unit(unit, "image", columns), size):
                bar.update()
                if isinstance(item, Rejected):
                    rejected.append(item)
                else:
                    keys.append(item[0].key)
                    images.append(item[1])
    if len(images) < 2:
        raise ValueError(
            f"{len(images)} usable images in {', '.join(inputs)} (need 2 or more); "
            f"{rejections(rejected)}"
        )
    held = is_held_out(keys, holdout)
    if held.all():
        raise ValueError(
            f"all {len(images)} images fall in the held-out fraction {holdout}; "
            "lower --holdout or add images"
        )
    train = np.stack([image for image, h in zip(images, held) if not h])
    return train, np.stack([image for image, h in zip(images, held) if h]), rejected


def rejections(rejected: list[Rejected]) -> str:
    """One line: how many samples were rejected, per reason with its first key."""
    counts, first = Counter(r.reason for r in rejected), {}
    for r in rejected:
        first.setdefault(r.reason, r.key)
    reasons = ", ".join(f"{why} {n} (first: {first[why]})" for why, n in sorted(counts.items()))
    return f"{len(rejected)} rejected" + (f": {reasons}" if rejected else "")


def train_vae_main(argv=None) -> None:
    """Train the VAE on the user's images, report held-out PSNR against bilinear, save it."""
    parser = argparse.ArgumentParser(
        prog="mtf-train-vae",
        description="Train this project's image VAE (ConvVAE) and save it "
        "for mtf-prepare-data. All images are decoded once into memory as uint8 (size x size x 3 "
        "bytes each: 10,000 images at 256 px take 2 GB), which suits up to ~100,000 images.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--inputs",
        nargs="+",
        metavar="PATH",
        help="tars, Parquet files, folders of images, or directories holding them "
        "(what mtf-prepare-data shard reads)",
    )
    source.add_argument(
        "--images",
        metavar="NPZ",
        help="or: an npz with 'images' uint8 "
        "[N, H, W, 3] (the last 5%% held out, as for the built-in VAE)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="--inputs: centre-crop and resize to this, as the shard job does (default 256)",
    )
    parser.add_argument("--image-column", default="image", help="Parquet image-bytes column")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.05,
        help="--inputs: fraction held out for PSNR, chosen by a hash of each "
        "sample's key (default 0.05)",
    )
    parser.add_argument("--out", required=True, help="output directory for save_vae")
    parser.add_argument("--minutes", type=float, help="wall-time budget")
    parser.add_argument("--steps", type=int, help="step budget (deterministic given --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--base-channels", type=int, default=VAEConfig.base_channels)
    parser.add_argument("--latent-channels", type=int, default=VAEConfig.latent_channels)
    parser.add_argument(
        "--downsample",
        type=int,
        default=VAEConfig.downsample,
        help="spatial reduction, a power of two",
    )
    args = parser.parse_args(argv)
    if args.minutes is None and args.steps is None:
        parser.error("give --minutes and/or --steps")
    if any(v is not None and v <= 0 for v in (args.minutes, args.steps)):
        parser.error("--minutes and --steps must be positive")
    if not 0 < args.holdout < 1:
        parser.error(f"--holdout must be in (0, 1), got {args.holdout}")
    try:
        config = VAEConfig(
            latent_channels=args.latent_channels,
            base_channels=args.base_channels,
            downsample=args.downsample,
        )
        if args.images:
            (train, held_out), rejected = load_image_set(args.images), []
        else:
            train, held_out, rejected = read_image_set(
                args.inputs, args.image_size, Columns(image=args.image_column), args.holdout
            )
        if train.shape[1] % config.downsample or train.shape[2] % config.downsample:
            raise ValueError(
                f"image size {train.shape[1]}x{train.shape[2]} is not a multiple "
                f"of --downsample {config.downsample}"
            )
    except (OSError, ValueError) as e:
        parser.error(str(e))
    size = "x".join(map(str, train.shape[1:3]))
    print(f"{len(train)} training and {len(held_out)} held-out images of {size}")
    if rejected:
        print(rejections(rejected))

    max_seconds = None if args.minutes is None else args.minutes * 60
    bar = tqdm(
        total=1.0,
        desc="training",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
    )

    def log(r):
        done = max(
            (r["step"] + 1) / (args.steps or math.inf), r["seconds"] / (max_seconds or math.inf)
        )  # as train_vae measures progress
        bar.set_postfix_str(f"step {r['step']}, loss {r['loss']:.5f}", refresh=False)
        bar.update(min(done, 1.0) - bar.n)
        if r["step"] % 100 == 0:
            bar.write(
                f"step {r['step']:6d}  {r['seconds']:6.0f}s  loss {r['loss']:.5f}  "
                f"kl {r['kl']:.3f}  lr {r['lr']:.2e}"
            )

    with bar:
        model, history = train_vae(
            train,
            config,
            steps=args.steps,
            max_seconds=max_seconds,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            log=log,
            log_every=1,
        )
    steps, seconds = len(history), history[-1]["seconds"]
    print(f"{steps} steps in {seconds:.0f}s, {steps * args.batch_size / seconds:.0f} img/s")
    vae_db = psnr(reconstruct(model, held_out), held_out)
    base_db = psnr(bilinear_baseline(held_out, config.downsample), held_out)
    print(f"held-out PSNR: VAE {vae_db:.2f} dB, bilinear baseline {base_db:.2f} dB")
    factor = scaling_factor(model, train)
    print(f"scaling factor {factor:.4f}; saved to {save_vae(model, config, factor, args.out)}")
