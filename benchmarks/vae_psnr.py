"""Does the VAE beat the free baseline? Train it for a few minutes on 32x32 images and compare
held-out PSNR with bilinear down/up-sampling to the same latent grid (8x down).

    python -m benchmarks.vae_psnr --minutes 3
"""

from __future__ import annotations

import argparse

import torch

from data_prep.vae import VAEConfig, bilinear_baseline, load_image_set, psnr, reconstruct, train_vae


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="data_prep/builtin/emoji32.npz")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--base-channels", type=int, default=VAEConfig.base_channels)
    parser.add_argument("--blocks-per-stage", type=int, default=VAEConfig.blocks_per_stage)
    args = parser.parse_args(argv)

    train, held_out = load_image_set(args.images)
    config = VAEConfig(base_channels=args.base_channels, blocks_per_stage=args.blocks_per_stage)
    model, history = train_vae(
        train,
        config,
        max_seconds=args.minutes * 60,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    steps, seconds = len(history), history[-1]["seconds"]
    params = sum(p.numel() for p in model.parameters())
    vae_db = psnr(reconstruct(model, held_out), held_out)
    base_db = psnr(bilinear_baseline(held_out, config.downsample), held_out)
    print(
        f"{len(train)} train / {len(held_out)} held-out images; {config}; "
        f"{params / 1e6:.2f}M parameters; {torch.get_num_threads()} threads"
    )
    print(
        f"{steps} steps of {args.batch_size} in {seconds:.0f}s = "
        f"{steps * args.batch_size / seconds:.0f} img/s; final loss {history[-1]['recon']:.5f}"
    )
    print(
        f"held-out PSNR: VAE {vae_db:.2f} dB, bilinear {base_db:.2f} dB, "
        f"difference {vae_db - base_db:+.2f} dB, ratio {vae_db / base_db:.3f}"
    )


if __name__ == "__main__":
    main()
