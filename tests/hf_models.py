"""Tiny random Llama-family models built locally with ``transformers`` (nothing is
downloaded), saved as Hugging Face directories for the import/export tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Two shapes the acceptance asks for: grouped-query attention with tied embeddings, and
# multi-head attention with untied ones (and another rope_theta and norm epsilon).
LLAMAS = {
    "gqa": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "mha": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    ),
}
VOCAB = 300


def save_tiny_llama(directory: Path, kind: str = "gqa", seed: int = 0, **changes) -> Path:
    """A random ``LlamaForCausalLM`` in fp32, saved as sharded safetensors with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{"vocab_size": VOCAB, "max_position_embeddings": 256, **LLAMAS[kind], **changes}
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # norms away from 1, so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB")
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """``transformers``' own forward: [b, s, vocab] fp32 logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


TEXTS = [
    f"a {c} {s} is left of a {s2}"
    for c in ("red", "blue", "green")
    for s in ("cat", "dog", "box")
    for s2 in ("ball", "cup")
] * 20


def save_tokenizer(directory: Path, llama3_roles: bool = False) -> Path:
    """A byte-level BPE of ``VOCAB`` tokens in ``directory`` (the project's specials at 0-4).
    ``llama3_roles``: also Llama 3's own document tokens, which a ``tokenizer_config.json``
    declares as BOS/EOS, as a Llama 3 directory does."""
    from tokenizers import Tokenizer as HFTokenizer

    from data_prep.tokenizer import train_bpe

    path = directory / "tokenizer.json"
    train_bpe(TEXTS, VOCAB - 2 * llama3_roles, path)
    if llama3_roles:
        tok = HFTokenizer.from_file(str(path))
        tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
        tok.save(str(path))
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return path
