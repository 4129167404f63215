"""Hugging Face Llama-family models in and out: a local directory of ``config.json`` and
``model*.safetensors`` (one file, or shards with ``model.safetensors.index.json``).

Import maps Hugging Face's tensors onto this model's whole-tensor names
(``checkpoints.whole`` loads them at any TP/PP layout). Both use non-interleaved RoPE
(rotate-half), so queries and keys need no permutation; Megatron fuses q, k and v into one
matrix, grouped by key/value head, and SwiGLU's gate and up projections into one. Rows the
Hugging Face vocabulary lacks (the image bounds and other added specials) start as the mean
embedding, and the patch layers as initialised, unless the directory is one this project
exported (``transfusion.json`` beside it), which brings them back.

Only safetensors are read: ``pytorch_model.bin`` is a pickle, and nothing loaded runs code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from checkpoints import CheckpointError
from checkpoints.whole import LAYERS, WholeTensors
from megatron_transfusion.config import ConfigError, ModelConfig

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # HF fast tokenizer, SentencePiece
SUPPORTED_TYPES = ("llama", "mistral")
# Llama 3.1 RoPE scaling, with the constants Megatron-Core's RotaryEmbedding fixes.
LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"'{path}' holds a {type(value).__name__}, not a JSON object")
    return value


class HFLlama:
    """A Hugging Face Llama-family directory, checked on open and read a tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(
                f"no Hugging Face model directory at '{self.directory}' (expected a directory "
                f"with {CONFIG} and model*.safetensors)"
            )
        if not (self.directory / CONFIG).is_file():
            raise CheckpointError(f"'{self.directory}' has no {CONFIG}: not a Hugging Face model")
        self.config = read_json(self.directory / CONFIG)
        self._check_architecture()
        self.files = self._weight_files()
        self._open: dict[Path, Any] = {}

    # ---- what the directory holds ---------------------------------------------------------

    def _where(self) -> str:
        return f"'{self.directory / CONFIG}'"

    def _get(self, key: str, default: Any = ...) -> Any:
        if key in self.config:
            return self.config[key]
        if default is ...:
            raise CheckpointError(f"{self._where()} has no '{key}'")
        return default

    def _check_architecture(self) -> None:
        c, where = self.config, self._where()
        kind = c.get("model_type")
        if kind not in SUPPORTED_TYPES:
            names = ", ".join(c.get("architectures") or []) or "unknown"
            raise CheckpointError(
                f"{where}: unsupported architecture {names} (model_type {kind!r}); "
                f"Llama-family models (model_type {' or '.join(SUPPORTED_TYPES)}) can be imported"
            )
        unsupported = {
            "hidden_act": (c.get("hidden_act", "silu") != "silu", "SwiGLU needs silu"),
            "attention_bias": (bool(c.get("attention_bias")), "the attention has no biases"),
            "mlp_bias": (bool(c.get("mlp_bias")), "the MLP has no biases"),
            "sliding_window": (c.get("sliding_window") is not None, "attention is global"),
        }
        for key, (bad, why) in unsupported.items():
            if bad:
                raise CheckpointError(f"{where}: {key}={c[key]!r} is not supported ({why})")
        heads, hidden = self._get("num_attention_heads"), self._get("hidden_size")
        head_dim = c.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise CheckpointError(
                f"{where}: head_dim={head_dim} × num_attention_heads={heads} != hidden_size="
                f"{hidden}; heads of another width than hidden_size / heads are not supported"
            )
        self.rope_scaling_factor()  # raises on an unsupported scaling

    def rope_scaling_factor(self) -> float | None:
        scaling = self.config.get("rope_scaling")
        if scaling is None:
            return None
        kind = scaling.get("rope_type", scaling.get("type"))
        fixed = {k: scaling.get(k) for k in LLAMA3_ROPE}
        if kind != "llama3" or fixed != LLAMA3_ROPE:
            raise CheckpointError(
                f"{self._where()}: rope_scaling {scaling} is not supported (only Llama 3.1's "
                f"'llama3' scaling with {LLAMA3_ROPE})"
            )
        return float(scaling["factor"])

    @property
    def vocab_size(self) -> int:
        return int(self._get("vocab_size"))

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def model_fields(self) -> dict[str, Any]:
        """The ``model.*`` config fields ``config.json`` determines."""
        heads = int(self._get("num_attention_heads"))
        return {
            "num_layers": int(self._get("num_hidden_layers")),
            "hidden_size": int(self._get("hidden_size")),
            "num_attention_heads": heads,
            "num_query_groups": int(self._get("num_key_value_heads", heads)),
            "ffn_hidden_size": int(self._get("intermediate_size")),
            "rope_base": float(self._get("rope_theta", 10000.0)),
            "norm_epsilon": float(self._get("rms_norm_eps", 1e-6)),
            "rope_scaling_factor": self.rope_scaling_factor(),
        }

    def check(self, model: ModelConfig) -> None:
        """ConfigError naming the first ``model.*`` field that disagrees with ``config.json``."""
        ours = {
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "num_attention_heads": model.num_attention_heads,
            "num_query_groups": model.query_groups,
            "ffn_hidden_size": model.ffn_size,
            "rope_base": model.rope_base,
            "norm_epsilon": model.norm_epsilon,
            "rope_scaling_factor": model.rope_scaling_factor,
        }
        for name, theirs in self.model_fields().items():
            same = (
                math.isclose(ours[name], theirs, rel_tol=1e-9)
                if isinstance(theirs, float) and ours[name] is not None
                else ours[name] == theirs
            )
            if not same:
                raise ConfigError(
                    f"config field 'model.{name}' is {ours[name]}, but {self._where()} gives "
                    f"{theirs}: set model.{name}={theirs} (mtf-checkpoint import-hf derives the "
                    "model section from config.json)"
                )
        if self.vocab_size > model.padded_vocab_size:
            raise ConfigError(
                f"config field 'model.vocab_size' is {model.vocab_size}, but {self._where()} has "
                f"vocab_size={self.vocab_size}: the model needs a row for every token"
            )

    def tokenizer_file(self) -> Path | None:
        for name in TOKENIZER_FILES:
            if (self.directory / name).is_file():
                return self.directory / name
        return None

    # ---- tensors --------------------------------------------------------------------------

    def _weight_files(self) -> dict[str, Path]:
        """Tensor name -> file, from the index or the single file."""
        from safetensors import SafetensorError, safe_open

        d = self.directory
        if (d / INDEX).is_file():
            weight_map = read_json(d / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"'{d / INDEX}' has no weight_map")
            files = {name: d / file for name, file in weight_map.items()}
        elif (d / SINGLE).is_file():
            files = None
        else:
            pickles = sorted(p.name for p in d.glob("*.bin"))
            hint = (
                f" (it has {', '.join(pickles)}: pickles, which are never loaded; save the "
                "model with safetensors, e.g. save_pretrained(..., safe_serialization=True))"
                if pickles
                else ""
            )
            raise CheckpointError(f"'{d}' has neither {INDEX} nor {SINGLE}{hint}")
        for path in sorted(set(files.values()) if files else {d / SINGLE}):
            if not path.is_file():
                raise CheckpointError(f"'{path}' is missing ({INDEX} names it)")
        if files is None:
            try:
                with safe_open(str(d / SINGLE), "pt") as f:
                    files = dict.fromkeys(f.keys(), d / SINGLE)  # noqa: SIM118 (not iterable)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"'{d / SINGLE}' is not a readable safetensors file ({e})"
                ) from None
        return files

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        if name not in self.files:
            raise CheckpointError(
                f"'{self.directory}' has no tensor '{name}' (its {CONFIG} says "
                f"{self._get('num_hidden_layers')} layers)"
            )
        path = self.files[name]
        try:
            if path not in self._open:
                self._open[path] = safe_open(str(path), "pt")
            return self._open[path].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"'{path}' cannot be read ({e}): it is truncated or damaged"
            ) from None

    def checked_tensors(self, model: ModelConfig) -> WholeTensors:
        """This model's whole tensors from the Hugging Face ones (patch layers: None), after
        checking ``model`` is this model (``check``)."""
        self.check(model)
        groups = model.query_groups
        per_group = model.num_attention_heads // groups

        def rows(t: torch.Tensor) -> torch.Tensor:
            """Vocabulary rows beyond the Hugging Face vocabulary: the mean embedding."""
            extra = model.padded_vocab_size - t.shape[0]
            return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(extra, -1)])

        def get(name: str) -> torch.Tensor | None:
            if name == "embedding.word_embeddings.weight":
                return rows(self.tensor("model.embed_tokens.weight"))
            if name == "output_layer.weight":
                head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
                return rows(self.tensor(head))
            if name == "decoder.final_layernorm.weight":
                return self.tensor("model.norm.weight")
            if not name.startswith(LAYERS):
                return None  # the patch layers: not in a language model
            index, _, rest = name.removeprefix(LAYERS).partition(".")
            hf = f"model.layers.{index}."
            if rest == "self_attention.linear_qkv.weight":
                q, k, v = (self.tensor(f"{hf}self_attn.{p}_proj.weight") for p in "qkv")
                return fuse_qkv(q, k, v, groups, per_group)
            if rest == "mlp.linear_fc1.weight":
                return torch.cat(
                    [
                        self.tensor(f"{hf}mlp.gate_proj.weight"),
                        self.tensor(f"{hf}mlp.up_proj.weight"),
                    ]
                )
            return self.tensor(hf + _LAYER_NAMES[rest])

        return get


# Per-layer tensors that are the same matrix in both: ours -> Hugging Face's.
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, per_group: int
) -> torch.Tensor:
    """Megatron's fused QKV matrix: per key/value group, its query heads, key, value."""
    hidden = q.shape[-1]
    q = q.reshape(groups, per_group, -1, hidden)
    k, v = k.reshape(groups, 1, -1, hidden), v.reshape(groups, 1, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, groups: int, per_group: int) -> tuple[torch.Tensor, ...]:
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(groups, per_group + 2, -1, hidden)
    q = grouped[:, :per_group].reshape(-1, hidden)
    return (
        q,
        grouped[:, per_group].reshape(-1, hidden),
        grouped[:, per_group + 1].reshape(-1, hidden),
    )


# ---- export ----------------------------------------------------------------------------------


def hf_tensors(state: dict[str, torch.Tensor], model: ModelConfig) -> tuple[dict, dict]:
    """(Hugging Face Llama tensors, patch-layer tensors) from a TP=1/PP=1 state dict."""
    groups = model.query_groups
    per_group = model.num_attention_heads // groups
    text = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "lm_head.weight": state["output_layer.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    for i in range(model.num_layers):
        ours, hf = f"{LAYERS}{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[f"{ours}self_attention.linear_qkv.weight"], groups, per_group)
        gate, up = state[f"{ours}mlp.linear_fc1.weight"].chunk(2)
        text |= {
            f"{hf}self_attn.q_proj.weight": q,
            f"{hf}self_attn.k_proj.weight": k,
            f"{hf}self_attn.v_proj.weight": v,
            f"{hf}mlp.gate_proj.weight": gate,
            f"{hf}mlp.up_proj.weight": up,
        }
        text |= {hf + theirs: state[ours + name] for name, theirs in _LAYER_NAMES.items()}
    patches = {k: v for k, v in state.items() if k.startswith(("patch_in.", "patch_out."))}
    return {k: v.contiguous() for k, v in text.items()}, {
        k: v.contiguous() for k, v in patches.items()
    }


def hf_config(model: ModelConfig, dtype: torch.dtype, special: dict[str, int] | None) -> dict:
    """A ``LlamaForCausalLM`` config.json; every vocabulary row (padding included) is a token."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rope_base,
        "rope_scaling": None
        if model.rope_scaling_factor is None
        else {"rope_type": "llama3", "factor": model.rope_scaling_factor, **LLAMA3_ROPE},
        "max_position_embeddings": model.max_sequence_length,
        "vocab_size": model.padded_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if special:
        config |= {f"{role}_token_id": special[role] for role in ("bos", "eos", "pad")}
    return config


def write_safetensors_shards(
    tensors: dict[str, torch.Tensor], directory: Path, max_bytes: int
) -> None:
    """``model.safetensors``, or numbered shards of at most ``max_bytes`` plus their index,
    as ``save_pretrained`` lays them out."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=1))


def replace_directory(staging: Path, out: Path) -> None:
    """Move a completely written ``staging`` into place as ``out``."""
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
