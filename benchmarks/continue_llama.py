"""Continue a locally trained tiny Llama into a Transfusion model (issue 16's acceptance):
does the text loss start where the Llama's was, not at ln(vocab)?

    python -m benchmarks.continue_llama --out runs/continue_llama

1. trains a tiny ``LlamaForCausalLM`` with plain ``transformers``/torch (no project code) on
   the built-in text documents (``data/builtin/inputs/text``), tokenized by ``transformers``
   from the Llama's own directory, whose tokenizer is the built-in one: ``tokenizer.json``
   copied byte for byte, plus a ``tokenizer_config.json`` naming ``<bos>``, ``<eos>``,
   ``<pad>``. Documents are laid out as BOS text EOS and cut into windows of 256 positions,
   as the Transfusion loader lays them out (a continuation window starts with the previous
   window's last token, so every token is a target once). Saved with ``save_pretrained``
   (safetensors);
2. shards the built-in text with ``mtf-prepare-data shard --tokenizer <the Llama directory>``;
   the built-in image-caption shards are reused: their tokenizer's SHA-256 is the Llama's
   ``tokenizer.json``'s (checked), which is all a run compares;
3. scores the imported Llama on held-out text without training: ``mtf-checkpoint import-hf``
   + ``mtf-evaluate`` (step 0), and ``transformers`` on exactly the rows that evaluation reads;
4. ``mtf-train`` (``python -m megatron_transfusion.train``) on the tiny preset with the model
   section from the Llama's ``config.json`` (``checkpoints.import_hf.hf_overrides``), text and
   image-caption data, once with ``checkpoint.init_from=hf:<dir>`` and once from scratch;
   the LM loss of every step, the held-out text loss after the last.

Prints the figures and writes them to ``<out>/results.json``; every command's output is in
``<out>/logs``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ROOT / "data" / "builtin"
PRESET = "tiny"
SEQ = 256  # the tiny preset's data.seq_length
HELDOUT_LM_LOSS = "heldout/text/lm_loss"  # the held-out text source's, as mtf-evaluate names it
# The tiny preset's transformer (width 128, 4 layers, 4 heads, FFN 512 by Llama's rule), with
# grouped-query attention (2 key/value heads) and untied embeddings.
LLAMA = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(command: list[str], log: Path) -> float:
    """A documented command (the repository on PYTHONPATH), its output to ``log``; returns
    its wall time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    started = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if result.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(
            f"{' '.join(command[:4])} ... failed ({result.returncode}); {log}:\n{tail}"
        )
    return time.perf_counter() - started


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# ---- 1. the Llama, with transformers alone ----------------------------------------------------


def documents(split: str) -> list[str]:
    texts = []
    for path in sorted((BUILTIN / "inputs" / "text" / split).glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return texts


def windows(tokenizer, texts: list[str], length: int = SEQ) -> list[list[int]]:
    """BOS text EOS of every document, cut into windows of ``length`` positions; a window
    after the first starts with its predecessor's last token (its context, not a target)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        out += [ids[start : start + length] for start in range(0, len(ids) - 1, length - 1)]
    return out


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels with -100 at padding), right-padded."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def window_loss(model, rows: list[list[int]], pad: int, batch: int = 16) -> tuple[float, int]:
    """Mean next-token cross entropy over every target of ``rows``, and the target count."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids, mask, labels = padded(rows[i : i + batch], pad)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
            ).item()
            count += int((labels[:, 1:] != -100).sum())
    model.train()
    return total / count, count


def make_llama_directory(directory: Path) -> None:
    """The built-in tokenizer as a Hugging Face model's: the same bytes, and its specials."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUILTIN / "tokenizer.json", directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def train_llama(directory: Path, steps: int, batch: int, lr: float, seed: int) -> dict:
    """A tiny Llama trained on the built-in text (AdamW, warm-up then cosine to lr/10), saved
    into ``directory``; returns its held-out loss and the training figures."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(directory)
    train, heldout = (windows(tokenizer, documents(split)) for split in ("train", "heldout"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.Generator().manual_seed(seed)
    warmup, started, curve = min(20, steps), time.perf_counter(), []
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        picked = torch.randint(len(train), (batch,), generator=order).tolist()
        ids, mask, labels = padded([train[i] for i in picked], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train_loss": loss.item()})
            print(f"  llama step {step + 1}/{steps}: train loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - started
    loss, targets = window_loss(model, heldout, tokenizer.pad_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_windows": batch,
        "train_windows": len(train),
        "train_tokens": sum(len(w) for w in train),
        "seconds": seconds,
        "curve": curve,
        "heldout_loss": loss,
        "heldout_targets": targets,
    }


# ---- 2. the data, sharded with the Llama's tokenizer ------------------------------------------


def shard_text(llama: Path, out: Path, logs: Path) -> tuple[dict, float]:
    """The built-in text documents sharded with ``--tokenizer <llama>``: {split: directory}."""
    directories, seconds = {}, 0.0
    for split in ("train", "heldout"):
        target = out / f"text_{split}"
        shutil.rmtree(target, ignore_errors=True)
        inputs = str(BUILTIN / "inputs" / "text" / split)
        seconds += run(
            python(
                "data_prep.shard", "shard", "--kind", "text", "--inputs", inputs,
                "--out", str(target), "--tokenizer", str(llama),
            ),
            logs / f"shard_text_{split}.log",
        )  # fmt: skip
        seconds += run(python("data_prep.shard", "merge", "--out", str(target)), logs / "merge.log")
        directories[split] = target
    return directories, seconds


def image_data(llama: Path) -> dict:
    """The built-in image-caption shards, if their tokenizer is the Llama's (by SHA-256, the
    check a run makes); re-encoding 28k images through the VAE is not needed then."""
    theirs = sha256(llama / "tokenizer.json")
    directories = {}
    for split in ("train", "heldout"):
        directory = BUILTIN / "images" / split
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest["tokenizer"]["sha256"] != theirs:
            raise SystemExit(
                f"{directory} was sharded with another tokenizer than {llama / 'tokenizer.json'}"
                f": shard the image inputs with mtf-prepare-data shard --tokenizer {llama}"
            )
        directories[split] = directory
    return directories


# ---- 3. the Llama and Transfusion on the same rows --------------------------------------------


def llama_on_rows(model, batches) -> dict:
    """``transformers``' loss on the LM targets of packed rows (``PackedBatch.lm_targets``),
    one document at a time at its RoPE positions: exact for text documents; image-caption
    documents are scored with the image's positions left out (the Llama cannot see images),
    so their figure is what the Llama knows of captions alone."""
    sums = {"text": [0.0, 0], "caption": [0.0, 0]}
    model.eval()
    with torch.no_grad():
        for batch in batches:
            labels, trained = batch.lm_targets()
            for r in range(batch.tokens.shape[0]):
                for d in batch.document_ids[r].unique().tolist():
                    if d < 0:
                        continue
                    columns = (batch.document_ids[r] == d).nonzero().flatten()
                    kind = "caption" if bool((batch.image_ids[r, columns] >= 0).any()) else "text"
                    columns = columns[batch.image_ids[r, columns] < 0]
                    logits = (
                        model(
                            input_ids=batch.tokens[r, columns][None],
                            position_ids=batch.positions[r, columns][None],
                        )
                        .logits[0]
                        .float()
                    )
                    scored = trained[r, columns]
                    losses = torch.nn.functional.cross_entropy(
                        logits[scored], labels[r, columns][scored], reduction="sum"
                    )
                    sums[kind][0] += losses.item()
                    sums[kind][1] += int(scored.sum())
    total = sum(s for s, _ in sums.values()), sum(n for _, n in sums.values())
    result = {f"{k}_loss": s / n if n else None for k, (s, n) in sums.items()}
    result |= {f"{k}_targets": n for k, (_, n) in sums.items()}
    return result | {"loss": total[0] / total[1], "targets": total[1]}


def first_rows(overrides: list[str], heldout: bool, batches: int) -> list:
    """The packed rows a run's first step trains on, or those its evaluation reads
    (``evaluation.evaluate.heldout_losses``), from the project's own loader."""
    from megatron_transfusion.config import load_config
    from megatron_transfusion.data.loader import MixedModalityLoader
    from megatron_transfusion.evaluation.evaluate import heldout_config

    cfg = load_config(PRESET, overrides)
    if heldout:
        cfg = heldout_config(cfg, cfg.eval.sources[0])
    loader = MixedModalityLoader(cfg)
    return [micro for _ in range(batches) for micro in loader.next_step()]


# ---- 4. the Transfusion runs ------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def train_run(name: str, overrides: list[str], runs: Path, logs: Path) -> dict:
    shutil.rmtree(runs / name, ignore_errors=True)
    command = python(
        "megatron_transfusion.train", "--config", PRESET, "--resume", "none",
        *overrides, f"run.name={name}", f"run.output_root={runs}",
    )  # fmt: skip
    seconds = run(command, logs / f"train_{name}.log")
    steps = read_jsonl(runs / name / "logs" / "metrics.jsonl")
    evals = read_jsonl(runs / name / "logs" / "eval.jsonl")
    return {
        "seconds": seconds,
        "lm_loss": [s["lm_loss"] for s in steps],
        "diffusion_loss": [s["diffusion_loss"] for s in steps],
        "heldout_lm_loss": {str(e["step"]): e[HELDOUT_LM_LOSS] for e in evals},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/continue_llama")
    parser.add_argument("--llama-steps", type=int, default=300)
    parser.add_argument("--llama-batch", type=int, default=16, help="windows of 256 a step")
    parser.add_argument("--llama-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=40, help="Transfusion training steps")
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=4,
        help="held-out global batches (4: every held-out text once, 5,450 targets)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the Llama's initialisation and data")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    logs, llama = out / "logs", out / "llama"
    shutil.rmtree(llama, ignore_errors=True)
    logs.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    started = time.perf_counter()
    results: dict = {"ln_vocab": None}

    print(f"1. training a tiny Llama with transformers ({args.llama_steps} steps)", flush=True)
    make_llama_directory(llama)
    results["llama"] = train_llama(
        llama, args.llama_steps, args.llama_batch, args.llama_lr, args.seed
    )

    from checkpoints.huggingface import HFLlama
    from checkpoints.import_hf import hf_overrides
    from megatron_transfusion.config import sources_override

    hf = HFLlama(llama)
    results["ln_vocab"] = math.log(hf.vocab_size)
    print("2. sharding the built-in text with the Llama's tokenizer", flush=True)
    text, seconds = shard_text(llama, out / "data", logs)
    images = image_data(llama)
    results["shard_seconds"] = seconds
    overrides = [
        *hf_overrides(hf),
        sources_override(text["train"], images["train"]),
        # held-out text alone: the Llama's own loss compares
        f"eval.sources=[{{name: text, kind: text, path: {text['heldout']}}}]",
        f"eval.batches={args.eval_batches}",
        f"eval.interval={args.steps}",
        f"run.train_steps={args.steps}",
        "run.log_interval=1",
        f"checkpoint.interval={args.steps}",
    ]
    results["overrides"] = overrides

    print("3. the imported Llama on held-out text: mtf-evaluate and transformers", flush=True)
    runs = out / "runs"
    shutil.rmtree(runs / "imported", ignore_errors=True)
    results["import_evaluate_seconds"] = run(
        python("checkpoints.cli", "import-hf", str(llama), "--out", str(runs / "imported"),
               "--config", PRESET, *overrides),
        logs / "import_hf.log",
    )  # fmt: skip
    results["import_evaluate_seconds"] += run(
        python("megatron_transfusion.evaluation.cli", str(runs / "imported"),
               "--out", str(out / "step0_eval.json")),
        logs / "evaluate.log",
    )  # fmt: skip
    step0 = json.loads((out / "step0_eval.json").read_text())["metrics"]
    results["step0_heldout_lm_loss"] = step0[HELDOUT_LM_LOSS]
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32)
    results["llama_on_heldout_rows"] = llama_on_rows(
        model, first_rows(overrides, heldout=True, batches=args.eval_batches)
    )
    results["llama_on_first_step_rows"] = llama_on_rows(
        model, first_rows(overrides, heldout=False, batches=1)
    )

    print(f"4. mtf-train, {args.steps} steps: from the Llama, and from scratch", flush=True)
    results["init_from"] = train_run(
        "init_from", [*overrides, f"checkpoint.init_from=hf:{llama}"], runs, logs
    )
    results["scratch"] = train_run("scratch", overrides, runs, logs)
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    return results


def report(r: dict) -> str:
    llama, rows, first = r["llama"], r["llama_on_heldout_rows"], r["llama_on_first_step_rows"]
    init, scratch = r["init_from"], r["scratch"]
    n = len(init["lm_loss"])
    lines = [
        "",
        f"ln(vocab) = ln {round(math.exp(r['ln_vocab']))} = {r['ln_vocab']:.3f}",
        f"Llama ({llama['params'] / 1e6:.2f}M params, {llama['steps']} steps of "
        f"{llama['batch_windows']} windows, {llama['seconds']:.0f} s), transformers:",
        f"  held-out text, its own windows ({llama['heldout_targets']} targets): "
        f"{llama['heldout_loss']:.3f} ({llama['heldout_loss'] / r['ln_vocab']:.0%} of ln(vocab))",
        f"  held-out text, the rows mtf-evaluate reads ({rows['targets']} targets): "
        f"{rows['loss']:.4f}",
        f"  step 1's training rows: {first['loss']:.4f} = text documents {first['text_loss']:.3f} "
        f"({first['text_targets']} targets) + captions without their images "
        f"{first['caption_loss']:.3f} ({first['caption_targets']} targets)",
        f"Transfusion from hf:DIR, before training (import-hf + mtf-evaluate), held-out text: "
        f"{r['step0_heldout_lm_loss']:.4f}",
    ]
    steps = sorted({1, 2, min(5, n), n})
    lines.append(
        f"{'mtf-train lm loss (text and captions)':39s}"
        + "".join(f"{'step ' + str(i):>9s}" for i in steps)
        + f"   held-out text after {n}"
    )
    for name, figures in (("init_from=hf:DIR", init), ("from scratch", scratch)):
        lm = figures["lm_loss"]
        picks = "".join(f"{lm[i - 1]:9.3f}" for i in steps)
        lines.append(f"  {name:37s}{picks}   {figures['heldout_lm_loss'][str(n)]:.3f}")
    lines.append(f"total {r['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
