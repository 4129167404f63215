"""Training-step throughput: this project vs transfusion-pytorch vs a lean pure-torch floor.

    python -m benchmarks.vs_transfusion_pytorch [--repeats 5] [--steps 2] [--images 1]

Three workers train the same shape (width 512, 8 layers, 8 heads, 4 rows × 521 tokens,
``--images`` images of 16×16 patches per row, 32×32×8 latents in 2×2 patches, 4k text
vocabulary) on this CPU, each in its own process with the same environment:

- ``project``: this project's real training step (``MegatronEngine.train_step``: Megatron-Core
  layers with compiled elementwise work (``model.fuse_elementwise``), linear patch layers,
  the dense Transfusion mask, Megatron DDP grad buffers and optimizer, LM + λ·DDPM loss).
- ``lean``: ``LeanTransfusion`` below, a single-file pure-torch model of the same shape and
  work: RMSNorm, SwiGLU, RoPE, SDPA with the same dense Transfusion mask, linear patch
  layers, the same losses, torch AdamW with clipping. The floor this project may cost at
  most 10% over.
- ``transfusion-pytorch``: lucidrains' reference implementation (``REFERENCE_VERSION``
  from PyPI), installed by this script into ``.bench-venv/`` (git-ignored) beside torch of
  the project's version. Its API differs where it must: it trains flow matching (not DDPM);
  every image costs 8 extra tokens (meta token, the shape "16,16" spelt in 5 characters,
  start and end), and each row 2 more (its own BOS/EOS), so a 521-token row holds 8 fewer
  caption tokens and the model runs on 520 positions (it drops the last); its blocks carry
  adaLN (conditioning MLPs on every token), U-Net skips, value gates, qk-norm, logit
  softcapping and a cross-layer attention residual, per its defaults; its feed-forward is
  GEGLU with 4× expansion (1365 inner vs 1536). Its CPU attention is einsum with a dense
  mask (FlexAttention is its CUDA path). Parameters of each model are printed.

The parent warms every worker up, then interleaves timed repeats (each repeat runs every
worker once, the first one rotating) and prints medians of tokens/s (positions the
transformer ran on), wall clock and per CPU-second of the worker, and the two ratios, as
the median over repeats of the back-to-back ratio and as the ratio of medians.

    --workers project,project@model.fuse_elementwise=false   # an ablation in the same run
    --workers project~/tmp/before,project,lean        # before/after: code from another tree
    --threads 1                                       # steadier on a loaded machine
    --profile project                                 # one worker's step under torch.profiler
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_VERSION = "0.20.0"  # transfusion-pytorch, measured with this release
SHAPE = dict(dim=512, depth=8, heads=8, vocab=4096, rows=4, seq=521, channels=8, latent=32, patch=2)
BOI, EOI, PAD, FIRST_TEXT = 1, 2, 0, 3
LAMBDA = 5.0  # diffusion loss weight


# --------------------------------------------------------------------------------------
# The data: the same rows for every worker (pure torch, so every venv can build them)
# --------------------------------------------------------------------------------------


def make_rows(images: int, text_overhead_per_image: int = 0, text_overhead_per_row: int = 0):
    """Per row: [text, image, text, image, ..., text] as ('text', LongTensor) / ('image',
    FloatTensor [C, H, W]); laid out with BOI/EOI per image, a row fills ``seq`` exactly.
    The overheads shorten the last text chunk for layouts that spend extra tokens."""
    s = SHAPE
    patches = (s["latent"] // s["patch"]) ** 2
    text = (
        s["seq"] - images * (patches + 2) - images * text_overhead_per_image - text_overhead_per_row
    )
    assert text >= images + 1, "too many images for the sequence"
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(s["rows"]):
        chunks = [text // (images + 1)] * images + [text - images * (text // (images + 1))]
        row = []
        for i, n in enumerate(chunks):
            row.append(("text", torch.randint(FIRST_TEXT, s["vocab"], (n,), generator=generator)))
            if i < images:
                row.append(
                    (
                        "image",
                        torch.randn(s["channels"], s["latent"], s["latent"], generator=generator),
                    )
                )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# The lean floor: one file of plain torch
# --------------------------------------------------------------------------------------


def lean_tables(rows):
    """tokens, positions, document ids, image ids [b, s] and latents [n, C, H, W] (one
    document per row)."""
    s = SHAPE
    patches = (s["latent"] // s["patch"]) ** 2
    tokens, images, latents = [], [], []
    for row in rows:
        t, im = [], []
        for kind, value in row:
            if kind == "text":
                t += value.tolist()
                im += [-1] * len(value)
            else:
                t += [BOI] + [PAD] * patches + [EOI]
                im += [-1] + [len(latents)] * patches + [-1]
                latents.append(value)
        tokens.append(t)
        images.append(im)
    tokens, image_ids = torch.tensor(tokens), torch.tensor(images)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    return tokens, positions, torch.zeros_like(tokens), image_ids, torch.stack(latents)


def lean_mask(document: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s]: same document and (causal or same image); every position sees itself."""
    q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))
    s = document.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same_image = (image[q] >= 0) & (image[q] == image[k])
    return ((document[q] == document[k]) & (causal | same_image) | torch.eye(s, dtype=torch.bool))[
        :, None
    ]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LeanBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-5), nn.RMSNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc1 = nn.Linear(dim, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (
            rope(q, cos, sin).transpose(1, 2),
            rope(k, cos, sin).transpose(1, 2),
            v.transpose(1, 2),
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, s, d))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


class LeanTransfusion(nn.Module):
    def __init__(self, dim, depth, heads, vocab, channels, latent, patch, max_seq, **unused):
        super().__init__()
        self.patch, self.channels, self.latent = patch, channels, latent
        patch_dim = channels * patch * patch
        ffn = 256 * math.ceil(int(8 * dim / 3) / 256)
        self.embed = nn.Embedding(vocab, dim)
        self.time = nn.Sequential(
            nn.Linear(256, patch_dim), nn.SiLU(), nn.Linear(patch_dim, patch_dim)
        )
        self.patch_in, self.patch_out = nn.Linear(patch_dim, dim), nn.Linear(dim, patch_dim)
        self.blocks = nn.ModuleList(LeanBlock(dim, heads, ffn) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.head = nn.Linear(dim, vocab, bias=False)
        half = dim // heads // 2
        angles = torch.arange(max_seq)[:, None] / 10000.0 ** (torch.arange(half) / half)
        self.register_buffer("angles", torch.cat((angles, angles), dim=-1), persistent=False)

    def forward(self, tokens, positions, documents, images, latents, timesteps, noise):
        n, c, size, k = latents.shape[0], self.channels, self.latent, self.patch
        g = size // k
        patches = latents.reshape(n, c, g, k, g, k).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
        t = timesteps.float()[:, None] * freqs
        patches = patches + self.time(torch.cat((t.cos(), t.sin()), dim=-1))[:, None]
        x = self.embed(tokens)
        where = images >= 0
        x = x.masked_scatter(where[..., None], self.patch_in(patches))
        angles = self.angles[positions][:, :, None]  # [b, s, 1, head_dim]
        cos, sin, mask = angles.cos(), angles.sin(), lean_mask(documents, images)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        x = self.norm(x)
        is_text = ~where
        trained = is_text[:, :-1] & is_text[:, 1:]
        logits = self.head(x)[:, :-1][trained]
        lm = F.cross_entropy(logits, tokens[:, 1:][trained])
        predicted = self.patch_out(x[where]).reshape(n, g, g, c, k, k).permute(0, 3, 1, 4, 2, 5)
        diffusion = (predicted.reshape(noise.shape) - noise).pow(2).flatten(1).mean(1).mean()
        return lm + LAMBDA * diffusion


class LeanWorker:
    def __init__(self, images: int):
        torch.manual_seed(0)
        self.model = LeanTransfusion(**SHAPE, max_seq=SHAPE["seq"])
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1
        )
        tokens, positions, documents, image_ids, latents = lean_tables(make_rows(images))
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        abar = torch.cos(timesteps / 1000 * math.pi / 2)[:, None, None, None] ** 2
        noised = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        self.inputs = (tokens, positions, documents, image_ids, noised, timesteps, noise)
        self.positions = tokens.numel()
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(*self.inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss)


# --------------------------------------------------------------------------------------
# This project
# --------------------------------------------------------------------------------------


class ProjectWorker:
    def __init__(self, images: int, *extra_overrides: str):
        from megatron_transfusion import platform
        from megatron_transfusion.batch import (
            ImageSegment,
            SpecialTokens,
            TextSegment,
            pack_documents,
        )
        from megatron_transfusion.config import ModelConfig, load_config
        from megatron_transfusion.diffusion import CosineSchedule, noise_images
        from megatron_transfusion.model import build_model
        from megatron_transfusion.parallel import init_distributed, seed_everything
        from megatron_transfusion.training.megatron_engine import MegatronEngine
        from megatron_transfusion.training.step import MicroBatch

        s = SHAPE
        overrides = [
            "data.sources=[]",
            f"model.hidden_size={s['dim']}",
            f"model.num_layers={s['depth']}",
            f"model.num_attention_heads={s['heads']}",
            f"model.vocab_size={s['vocab']}",
            f"model.max_sequence_length={s['seq']}",
            f"model.latent_channels={s['channels']}",
            f"model.latent_size={s['latent']}",
            f"model.patch_size={s['patch']}",
            "model.patch_layer=linear",
            "model.timestep_frequency_dim=256",
            "model.attention_backend=sdpa",
            f"data.seq_length={s['seq']}",
            f"data.micro_batch_size={s['rows']}",
            f"data.global_batch_tokens={s['rows'] * s['seq']}",
        ]
        # Compiled elementwise work: the default of every preset but tiny, whose sizes these
        # replace (a tree from before the switch, in a before/after run, has no such field).
        if "fuse_elementwise" in {f.name for f in dataclasses.fields(ModelConfig)}:
            overrides.append("model.fuse_elementwise=true")
        cfg = load_config("tiny", [*overrides, *extra_overrides])
        plat = platform.activate()
        init_distributed(cfg.parallel, plat)
        seed_everything(0)
        model = build_model(cfg, plat)
        self.engine = MegatronEngine(cfg, plat, model)
        # No BOS/EOS written; a tree from before SpecialTokens carried them takes pad/BOI/EOI.
        ids = dict(pad=PAD, bos=FIRST_TEXT, eos=FIRST_TEXT + 1, boi=BOI, eoi=EOI)
        special = SpecialTokens(**{f.name: ids[f.name] for f in dataclasses.fields(SpecialTokens)})
        documents = [
            [[TextSegment(v.tolist()) if kind == "text" else ImageSegment(v) for kind, v in row]]
            for row in make_rows(images)
        ]
        batch = pack_documents(
            documents,
            s["seq"],
            cfg.model.patches_per_image,
            (s["channels"], s["latent"], s["latent"]),
            special,
        )
        generator = torch.Generator().manual_seed(1)
        schedule = CosineSchedule.from_config(cfg.diffusion)
        self.micro = [MicroBatch(*noise_images(batch, schedule, cfg.diffusion, generator))]
        self.positions = batch.tokens.numel()
        self.params = sum(p.numel() for chunk in model for p in chunk.parameters())

    def step(self) -> float:
        losses = self.engine.train_step(self.micro, 1e-4).losses
        return (
            losses["loss"] if isinstance(losses, dict) else losses.total
        )  # dict: before LossTerms


# --------------------------------------------------------------------------------------
# transfusion-pytorch (runs in .bench-venv)
# --------------------------------------------------------------------------------------


class ReferenceWorker:
    # Per image: meta token, "16,16" in 5 characters, start and end of modality.
    IMAGE_OVERHEAD, ROW_OVERHEAD = 8, 2

    def __init__(self, images: int):
        from transfusion_pytorch import Transfusion

        s = SHAPE
        torch.manual_seed(0)
        grid, patch_dim = s["latent"] // s["patch"], s["channels"] * s["patch"] ** 2
        self.model = Transfusion(
            num_text_tokens=s["vocab"],
            dim_latent=patch_dim,
            modality_default_shape=(grid, grid),
            transformer=dict(
                dim=s["dim"], depth=s["depth"], dim_head=s["dim"] // s["heads"], heads=s["heads"]
            ),
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1
        )
        rows = make_rows(images, self.IMAGE_OVERHEAD - 2, self.ROW_OVERHEAD)
        k = s["patch"]

        def patches(latent):  # [C, H, W] -> [H/k, W/k, C·k·k], this project's patch order
            c = latent.shape[0]
            return (
                latent.reshape(c, grid, k, grid, k)
                .permute(1, 3, 0, 2, 4)
                .reshape(grid, grid, c * k * k)
            )

        self.samples = [[v if kind == "text" else patches(v) for kind, v in row] for row in rows]
        self.positions = s["rows"] * (s["seq"] - 1)  # it trains on all but the last position
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(self.samples)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss)


WORKERS = {"project": ProjectWorker, "lean": LeanWorker, "transfusion-pytorch": ReferenceWorker}


def make_worker(kind: str, images: int):
    """``kind``, or ``project@override@override`` for this project with config overrides
    (an ablation in the same run, e.g. ``project@parallel.zero_stage=0``)."""
    name, *overrides = kind.split("@")
    return WORKERS[name](images, *overrides)


def profile(kind: str, images: int, warmup: int, steps: int = 2, rows: int = 30) -> None:
    """One worker's steps under torch.profiler: ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    worker = make_worker(kind, images)
    for _ in range(warmup):
        worker.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            worker.step()
    print(f"{kind}: {(time.perf_counter() - start) / steps:.2f} s/step under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def serve(kind: str, images: int, warmup: int, threads: int | None) -> None:
    """Worker loop: build, warm up, then answer 'N' on stdin with the time of N steps
    (wall clock, and CPU time of the process: every thread's, waiting excluded)."""
    if threads:
        torch.set_num_threads(threads)
    worker = make_worker(kind, images)
    for _ in range(warmup):
        loss = worker.step()
    source = sys.modules.get("megatron_transfusion")  # which tree a project worker runs
    out = sys.__stdout__
    out.write(
        json.dumps(
            {
                "params": worker.params,
                "positions": worker.positions,
                "loss": loss,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "source": str(Path(source.__file__).parent.parent) if source else "",
            }
        )
        + "\n"
    )
    out.flush()
    for line in sys.stdin:
        steps = int(line)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loss = worker.step()
        out.write(
            json.dumps(
                {
                    "seconds": time.perf_counter() - start,
                    "cpu_seconds": time.process_time() - cpu,
                    "loss": loss,
                }
            )
            + "\n"
        )
        out.flush()


# --------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------


def reference_python(venv: Path) -> Path:
    """.bench-venv with transfusion-pytorch and torch of this project's version."""
    python = venv / "bin" / "python"
    marker = venv / f".installed-{REFERENCE_VERSION}-{torch.__version__.split('+')[0]}"
    if not marker.exists():
        print(f"installing transfusion-pytorch=={REFERENCE_VERSION} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"transfusion-pytorch=={REFERENCE_VERSION}",
                f"torch=={torch.__version__.split('+')[0]}",
            ],
            check=True,
        )
        marker.touch()
    return python


class Worker:
    def __init__(
        self, kind: str, python: Path, images: int, warmup: int, threads: int | None, env: dict
    ):
        self.kind = kind
        # project~DIR: this project's code from the source tree DIR (the same script and venv)
        kind, _, tree = kind.partition("~")
        if tree:
            env = {**env, "PYTHONPATH": str(Path(tree).resolve())}
        command = [
            str(python),
            str(Path(__file__).resolve()),
            "--worker",
            kind,
            "--images",
            str(images),
            "--warmup",
            str(warmup),
            *(["--threads", str(threads)] if threads else []),
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"worker {self.kind} died (run it alone with --worker {self.kind} to see why)"
            )
        return json.loads(line)

    def time(self, steps: int) -> dict:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=1, help="images per row")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    parser.add_argument(
        "--workers",
        default="project,lean,transfusion-pytorch",
        help="comma-separated; project@a.b=c: a project worker with config overrides; "
        "project~DIR: the project's code from source tree DIR (before/after)",
    )
    parser.add_argument("--venv", type=Path, default=ROOT / ".bench-venv")
    parser.add_argument("--profile", metavar="WORKER", help="profile one worker's step instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(args.worker, args.images, args.warmup, args.threads)
    if args.profile:
        if args.threads:
            torch.set_num_threads(args.threads)
        return profile(args.profile, args.images, args.warmup)

    kinds = args.workers.split(",")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pythons = {kind: Path(sys.executable) for kind in kinds}
    if "transfusion-pytorch" in kinds:
        pythons["transfusion-pytorch"] = reference_python(args.venv)
    s = SHAPE
    print(
        f"shape: width {s['dim']}, {s['depth']} layers, {s['heads']} heads, "
        f"{s['rows']} rows × {s['seq']} tokens, "
        f"{args.images} image(s)/row of {(s['latent'] // s['patch']) ** 2} patches, "
        f"vocab {s['vocab']}"
    )
    workers = {}
    for kind in kinds:  # started one at a time: each warms up alone
        workers[kind] = Worker(kind, pythons[kind], args.images, args.warmup, args.threads, env)
        i = workers[kind].info
        print(
            f"{kind:20s} {i['params'] / 1e6:6.1f}M params, {i['positions']} positions/step, "
            f"torch {i['torch']}, {i['threads']} threads, loss after warm-up {i['loss']:.3f}"
            + (f", code from {i['source']}" if i["source"] else ""),
            flush=True,
        )
    rates = {kind: [] for kind in kinds}  # tokens per wall-clock second
    cpu_rates = {kind: [] for kind in kinds}  # tokens per CPU second of the worker
    for repeat in range(args.repeats):
        for i in range(len(kinds)):  # rotate who goes first: no worker always follows the same one
            kind = kinds[(i + repeat) % len(kinds)]
            worker = workers[kind]
            result = worker.time(args.steps)
            rates[kind].append(args.steps * worker.info["positions"] / result["seconds"])
            cpu_rates[kind].append(args.steps * worker.info["positions"] / result["cpu_seconds"])
        print(
            f"repeat {repeat + 1}: "
            + " | ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items())
            + " tokens/s",
            flush=True,
        )
    for worker in workers.values():
        worker.close()
    print("medians (tokens/s wall clock; tokens per CPU-second of the worker):")
    for kind in kinds:
        rate = statistics.median(rates[kind])
        print(
            f"  {kind:20s} {rate:8,.0f} tokens/s "
            f"({workers[kind].info['positions'] / rate:.2f} s/step) | "
            f"{statistics.median(cpu_rates[kind]):8,.0f} tokens/CPU-s"
        )

    def ratio(a: str, b: str, goal: float) -> None:
        # Per repeat the two ran back to back: the median of those paired ratios is less
        # exposed to load changing between repeats than the ratio of medians.
        for label, r in (("wall", rates), ("CPU", cpu_rates)):
            paired = statistics.median(x / y for x, y in zip(r[a], r[b]))
            of_medians = statistics.median(r[a]) / statistics.median(r[b])
            print(
                f"{a} / {b} ({label}): {of_medians:.3f}x of medians, "
                f"{paired:.3f}x median of paired "
                f"repeats  (goal >= {goal})"
            )

    for kind in kinds:
        if kind.startswith("project") and "transfusion-pytorch" in kinds:
            ratio(kind, "transfusion-pytorch", 3)
        if kind.startswith("project") and "lean" in kinds:
            ratio(kind, "lean", 0.9)


if __name__ == "__main__":
    main()
