"""Typed experiment configuration: dataclasses filled from YAML, then dotted overrides.

Defaults are the paper's (Zhou et al., 2024); presets in ``configs/`` set the sizes.
Every user mistake becomes a ``ConfigError`` naming the field, which entry points print
as one line (``megatron_transfusion.console.run_cli``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


# Exit codes every entry point shares; launchers act on them (megatron_transfusion.launch).
EXIT_USER_ERROR = 2  # a UserError, printed as one ``error:`` line
EXIT_PREEMPTED = 3  # the trainer saved a checkpoint on request and stopped: requeue me


class UserError(ValueError):
    """A mistake in what the user gave a command (config, data, checkpoint, flags), not a
    bug: entry points print its message as one ``error:`` line and exit 2, no traceback."""


class ConfigError(UserError):
    """A user mistake in a config file or override; the message names the field."""


@dataclass
class ModelConfig:
    """The transformer and its patch layers (sizes, RoPE, attention kernel)."""

    num_layers: int = 16
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_query_groups: int | None = None  # None: multi-head attention (groups = heads)
    ffn_hidden_size: int | None = None  # None: Llama's rule, 8/3·hidden rounded up to 256
    vocab_size: int = 32000  # tokenizer vocabulary, special tokens included
    make_vocab_size_divisible_by: int = 128  # the padded vocabulary must split over TP ranks
    max_sequence_length: int = 4096
    rope_base: float = 10000.0
    # Llama 3.1's long-context RoPE ("llama3" scaling) with this factor; None: plain RoPE.
    rope_scaling_factor: float | None = None
    norm_epsilon: float = 1e-5
    init_std: float = 0.02
    # Images enter as VAE latents [latent_channels, latent_size, latent_size].
    latent_channels: int = 8
    latent_size: int = 32  # 256 px / 8
    patch_size: int = 2
    patch_layer: Literal["linear", "unet"] = "unet"
    unet_channels: list[int] = field(default_factory=lambda: [800, 1600])  # one per level
    unet_blocks_per_level: int = 2
    timestep_frequency_dim: int = 256
    # Where a patch sits in its image: RoPE's 1-D sequence offsets only (none, the paper's), or
    # also DiT's fixed 2-D sin-cos embedding added to every patch vector (sincos2d).
    image_position_embedding: Literal["none", "sincos2d"] = "none"
    # auto: the platform's (flex on GPU, sdpa on CPU); flash: kernels.attention's run split
    attention_backend: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    flex_block_size: int = 128
    # Training steps run the per-layer elementwise work (RMSNorm, SwiGLU, RoPE and the
    # attention layout) compiled: one pass over the activations each instead of one per op,
    # equal to eager up to fp32 rounding, for 2-15 s of compilation per process
    # (kernels/elementwise.py).
    fuse_elementwise: bool = True

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def padded_vocab_size(self) -> int:
        """Embedding/head rows; independent of the parallel layout, so checkpoints reshard."""
        multiple = self.make_vocab_size_divisible_by
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class DiffusionConfig:
    """The DDPM objective: timesteps, loss weight, noise limit, CFG dropout."""

    train_timesteps: int = 1000
    loss_weight: float = 5.0  # λ in L = L_LM + λ·L_DDPM
    image_first_max_timestep: int = 500  # noise limit when the image precedes its caption
    caption_dropout: float = 0.1  # probability an image is trained unconditionally (CFG)
    # Per-image weight of the ε-MSE by its timestep. uniform: the paper's. min_snr: Min-SNR-γ
    # (Hang et al. 2023), min(SNR_t, γ)/SNR_t: less weight on nearly clean images, whose
    # ε-loss is large but teaches little.
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0


@dataclass
class ParallelConfig:
    """The layout: tensor, pipeline and data parallelism, ZeRO, recompute, engine."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False
    # Activation recomputation: "full" re-runs every layer in backward (least memory);
    # "selective" only the core attention (the s×s scores), Megatron's cheap default.
    recompute: Literal["none", "selective", "full"] = "none"
    engine: Literal["megatron", "deepspeed"] = "megatron"  # who reduces grads and shards state
    zero_stage: int = (
        1  # megatron: 0 (plain) or 1 (distributed optimizer where DP > 1); deepspeed: 1-3
    )


@dataclass
class SourceConfig:
    """One prepared dataset (``mtf-prepare-data``) in the training mix."""

    # checked against the dataset's manifest; "interleaved": text and images in any order,
    # "image_edit": (input image, instruction, edited image) examples
    kind: Literal["text", "image_caption", "interleaved", "image_edit"]
    path: str  # a local directory or a remote URL (mirrored into data.cache_dir)
    weight: float = 1.0  # its share of the training tokens, relative to the other sources'
    name: str | None = None  # in logs and checkpoints; default: the path

    @property
    def label(self) -> str:
        return self.name or self.path

    @property
    def has_images(self) -> bool:
        return self.kind != "text"


@dataclass
class DataConfig:
    """The training mix (data.sources), sequence length and batch size."""

    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_tokens: int = 2_097_152  # 2M tokens: 512 sequences of 4096
    # The prepared datasets, mixed by token share; a source drawn to its end starts a new
    # epoch in a fresh order. Order matters: it seeds each source's shuffle.
    sources: list[SourceConfig] = field(default_factory=list)
    caption_first_probability: float = 0.8
    cache_dir: str | None = None  # where remote datasets are mirrored
    verify_shards: bool = True  # check every shard's SHA-256 against the manifest at start

    @property
    def sequences_per_step(self) -> int:
        return self.global_batch_tokens // self.seq_length

    @property
    def text_share(self) -> float:
        """The text sources' share of the tokens; with no sources (sizing a preset), the
        paper's even mix."""
        total = sum(s.weight for s in self.sources)
        if not total:
            return 0.5
        return sum(s.weight for s in self.sources if s.kind == "text") / total


@dataclass(frozen=True)
class BatchGeometry:
    """How one global batch splits: its sequences strided over the data-parallel ranks,
    each rank's share cut into micro-batches. The loader, the engines and the layout
    planner all take it from here."""

    sequences: int  # per global step
    dp_size: int
    micro_batch_size: int

    @classmethod
    def of(cls, data: DataConfig, dp_size: int) -> BatchGeometry:
        """Raises ConfigError if the sequences do not split evenly."""
        sequences = data.sequences_per_step
        if sequences % (dp_size * data.micro_batch_size):
            raise ConfigError(
                "config field 'data.global_batch_tokens': "
                f"{sequences} sequences per step do not split "
                f"into {dp_size} data-parallel ranks × micro-batches of {data.micro_batch_size}"
            )
        return cls(sequences, dp_size, data.micro_batch_size)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per rank and step."""
        return self.sequences // (self.dp_size * self.micro_batch_size)


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (warmup, cosine decay), clipping."""

    lr: float = 3e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 4000
    decay_steps: int | None = None  # None: until run.train_steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class CheckpointConfig:
    """Where and how often to save, what to resume or start from."""

    directory: str | None = None  # None: <run dir>/checkpoints
    interval: int = 1000
    keep_last: int = 3
    # What to resume where mtf-train is given no --resume: a path, "auto" (the latest in
    # directory, if any) or "none"; None: "auto".
    load: str | None = None
    # Start from these weights only (fresh optimizer, step 0, fresh data order), in any
    # layout and engine: a run, a step directory, an export, or hf:DIR (a Hugging Face
    # Llama). Ignored once the run has a checkpoint of its own, which it resumes instead.
    init_from: str | None = None
    # Copy the state to host memory at the save step, write files from a thread while
    # training continues, publish at a later step boundary (megatron engine).
    async_save: bool = False


@dataclass
class RunConfig:
    """The run's name and directory, seed, length and logging interval."""

    name: str = "transfusion"
    output_root: str = "runs"
    seed: int = 1234
    train_steps: int = 250_000
    log_interval: int = 10
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    # Dense FLOP/s per device, for MFU; None: the platform's (GPU: datasheet; CPU: measured).
    peak_flops: float | None = None


@dataclass
class EvalConfig:
    """Held-out evaluation, during training every ``interval`` steps and by ``mtf-evaluate``."""

    interval: int = 0  # training steps between evaluations; 0: never during training
    # Held-out prepared datasets (mtf-prepare-data), any kind, each scored on its own as
    # heldout/<name>/loss, lm_loss, perplexity (and diffusion_loss where it has images);
    # their weights are not used. Captions, samples and images come from the first
    # image_caption one.
    sources: list[SourceConfig] = field(default_factory=list)
    batches: int = 4  # global batches of each held-out source for its losses
    captions: int = 0  # held-out images to caption for CIDEr-D / BLEU-4 (needs PP=1)
    # Held-out captions drawn (guided) at each training evaluation, the same ones each time:
    # a grid to <run dir>/eval_samples/step_N.png, tensorboard and W&B (needs PP=1).
    samples: int = 0
    images: int = 0  # held-out captions to draw for FID / IS / CLIP score (mtf-evaluate only)
    diffusion_steps: int = 50
    guidance_scale: float = 5.0
    inception_weights: str | None = None  # TF-Inception FID weights (a local .pth), for FID
    clip_model: str | None = None  # a local Hugging Face CLIP directory, for CLIP score

    @property
    def image_caption_data(self) -> str | None:
        """The held-out images and captions that captions, samples and images draw on."""
        paths = [s.path for s in self.sources if s.kind == "image_caption"]
        return paths[0] if paths else None


@dataclass
class WandbConfig:
    """Weights & Biases: rank 0 sends every metric the trainer logs to one W&B run.

    A resumed run continues the same W&B run; ``pip install 'megatron_transfusion[wandb]'``."""

    mode: Literal["disabled", "online", "offline"] = "disabled"  # offline: `wandb sync` later
    project: str = "megatron_transfusion"
    entity: str | None = None  # a W&B team or user; None: the logged-in user's default
    name: str | None = None  # the W&B run's display name; None: run.name
    tags: list[str] = field(default_factory=list)


@dataclass
class ProfileConfig:
    """Traces and memory snapshots of a few steps, written to ``<run dir>/profiles/``."""

    # [first, last]: torch.profiler traces every rank through these steps (as logged,
    # from 1), one Chrome trace JSON per rank; []: none.
    steps: list[int] = field(default_factory=list)
    # The CUDA allocator's history (every allocation with its stack) from the first step:
    # a snapshot per rank after the last profiled step and at an out-of-memory error.
    memory_snapshot: bool = False


@dataclass
class DistributedConfig:
    """Hangs: how long a collective may wait, and when every rank dumps its stacks."""

    timeout_minutes: float = 10.0  # a collective waiting longer fails (init_process_group)
    # When no training step has finished for this long, every rank prints all its threads'
    # Python stacks to stderr and <run dir>/hangs/rank_N.txt; 0: off. Below timeout_minutes,
    # so that the stacks are dumped before the collective timeout ends the run.
    hang_watchdog_minutes: float = 5.0


@dataclass
class ExperimentConfig:
    """Every section of a run's config (``mtf-config`` prints them resolved)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


SOURCES_EXAMPLE = (
    "data.sources=[{kind: text, path: shards/text, weight: 0.5}, "
    "{kind: image_caption, path: shards/img, weight: 0.5}]"
)
EVAL_SOURCES_EXAMPLE = (
    "eval.sources=[{name: text, kind: text, path: shards/text-heldout}, "
    "{name: images, kind: image_caption, path: shards/img-heldout}]"
)
# Fields that were replaced: their old keys get this instead of "unknown field".
REPLACED_FIELDS = {
    "data.text_data": f"list the datasets in data.sources, e.g. {SOURCES_EXAMPLE}",
    "data.image_caption_data": f"list the datasets in data.sources, e.g. {SOURCES_EXAMPLE}",
    "data.text_token_fraction": "the weights of data.sources are the token shares now, "
    f"e.g. {SOURCES_EXAMPLE}",
    "eval.text_data": f"list the held-out datasets in eval.sources, e.g. {EVAL_SOURCES_EXAMPLE}",
    "eval.image_caption_data": "list the held-out datasets in eval.sources, "
    f"e.g. {EVAL_SOURCES_EXAMPLE}",
}


def sources_override(
    text=None, image_caption=None, text_weight: float = 1.0, image_weight: float = 1.0
) -> str:
    """``data.sources=[...]`` for one text and/or one image–caption dataset (equal token
    shares by default), each named by its kind: the common case as one override, for
    scripts and tests (and the names data states were saved under before data.sources)."""
    sources = [
        {"name": kind, "kind": kind, "path": str(path), "weight": weight}
        for kind, path, weight in (
            ("text", text, text_weight),
            ("image_caption", image_caption, image_weight),
        )
        if path is not None
    ]
    return f"data.sources={json.dumps(sources)}"


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if path in REPLACED_FIELDS:
            raise ConfigError(f"config field '{path}' was replaced: {REPLACED_FIELDS[path]}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{where + '.' if where else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config field '{path}'{hint}")
        tp = hints[key]
        (item,) = typing.get_args(tp) if typing.get_origin(tp) is list else (None,)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        elif dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"config field '{path}': expected a list, got {value!r}")
            kwargs[key] = [_build(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, tp, f"config field '{path}'")
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in kwargs:
            raise ConfigError(f"config field '{where}.{f.name}' is required")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``a.b=v``; a number indexes a list (``data.sources.1.weight=0.3``)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = (
            node[_index(node, part, dotted)]
            if isinstance(node, list)
            else node.setdefault(part, {})
        )
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[_index(node, leaf, dotted) if isinstance(node, list) else leaf] = value


def _index(items: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override '{dotted}': '{part}' is not an index of the list there ({len(items)} items)"
        )
    return int(part)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value read as YAML (so 3, 3e-4, true, [1, 2] keep types)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}': expected the form section.field=value")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({_one_line(e)})") from None


def _one_line(error: Exception) -> str:
    """PyYAML's messages span lines (problem, context, marks): errors here are one line."""
    return " ".join(str(error).split())


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset '{name_or_path}' (presets: {known})")
    return preset


def load_config(preset_or_path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    tree: dict = {}
    if preset_or_path is not None:
        path = resolve_preset(preset_or_path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{path}' is not UTF-8 text ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_one_line(e)}") from None
    return config_from_tree(tree, overrides)


def _upgrade(tree: dict) -> None:
    """A config written before eval.sources (every run's config.yaml, so every checkpoint of
    those runs) still loads: its held-out paths become named eval sources. Overrides of the
    old fields are refused (REPLACED_FIELDS)."""
    heldout = tree.get("eval")
    if not isinstance(heldout, dict):
        return
    for kind in ("text", "image_caption"):
        path = heldout.pop(f"{kind}_data", None)
        if path:
            heldout.setdefault("sources", []).append({"name": kind, "kind": kind, "path": path})


def config_from_tree(tree: dict, overrides: list[str] = ()) -> ExperimentConfig:
    """A config from an already parsed YAML tree (e.g. one stored inside a checkpoint)."""
    tree = copy.deepcopy(tree)
    _upgrade(tree)
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    config = _build(ExperimentConfig, tree, "")
    validate(config)
    return config


# --------------------------------------------------------------------------------------
# Validation: cross-field rules a model or launch would otherwise fail on much later.
# --------------------------------------------------------------------------------------


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}': {message}")


def validate(config: ExperimentConfig) -> None:
    m, p, d, dif = config.model, config.parallel, config.data, config.diffusion
    for name in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "latent_channels",
        "latent_size",
        "patch_size",
        "max_sequence_length",
    ):
        _require(getattr(m, name) > 0, f"model.{name}", "must be positive")
    for name in ("tensor_parallel", "pipeline_parallel"):
        _require(getattr(p, name) > 0, f"parallel.{name}", "must be positive")
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        "model.hidden_size",
        f"{m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}",
    )
    _require(
        m.image_position_embedding == "none" or m.hidden_size % 4 == 0,
        "model.image_position_embedding",
        f"sincos2d needs model.hidden_size divisible by 4, got {m.hidden_size}",
    )
    _require(
        m.num_attention_heads % m.query_groups == 0,
        "model.num_query_groups",
        f"{m.query_groups} does not divide model.num_attention_heads={m.num_attention_heads}",
    )
    _require(
        m.num_attention_heads % p.tensor_parallel == 0 and m.query_groups % p.tensor_parallel == 0,
        "parallel.tensor_parallel",
        f"{p.tensor_parallel} must divide the attention heads ({m.num_attention_heads}) "
        f"and query groups ({m.query_groups})",
    )
    _require(
        m.padded_vocab_size % p.tensor_parallel == 0,
        "model.make_vocab_size_divisible_by",
        f"the padded vocabulary ({m.padded_vocab_size}) must split evenly over "
        f"parallel.tensor_parallel={p.tensor_parallel}; use a multiple of it",
    )
    _require(
        m.ffn_size % p.tensor_parallel == 0,
        "parallel.tensor_parallel",
        f"{p.tensor_parallel} must divide the FFN size {m.ffn_size}",
    )
    stages = p.pipeline_parallel * (p.virtual_pipeline or 1)
    _require(
        m.num_layers % stages == 0,
        "model.num_layers",
        f"{m.num_layers} layers cannot be split evenly into {stages} pipeline stages "
        f"(parallel.pipeline_parallel × parallel.virtual_pipeline)",
    )
    if p.sequence_parallel:
        _require(
            p.tensor_parallel > 1,
            "parallel.sequence_parallel",
            "needs parallel.tensor_parallel > 1",
        )
        _require(
            d.seq_length % p.tensor_parallel == 0,
            "parallel.sequence_parallel",
            f"data.seq_length={d.seq_length} must be divisible by parallel.tensor_parallel="
            f"{p.tensor_parallel} (each TP rank holds an equal slice of the sequence)",
        )
    if p.engine == "megatron":
        _require(
            p.zero_stage in (0, 1),
            "parallel.zero_stage",
            f"{p.zero_stage} needs parallel.engine=deepspeed (megatron shards only optimizer "
            "state: stage 1)",
        )
    else:
        _require(
            p.zero_stage in (1, 2, 3), "parallel.zero_stage", "must be 1, 2 or 3 with deepspeed"
        )
        _require(
            not config.checkpoint.async_save,
            "checkpoint.async_save",
            "the deepspeed engine saves synchronously; set it to false",
        )
        _require(
            not p.sequence_parallel,
            "parallel.sequence_parallel",
            "needs parallel.engine=megatron (DeepSpeed does not sum the sequence-split norm "
            "gradients over TP ranks)",
        )
        _require(
            p.pipeline_parallel == 1,
            "parallel.engine",
            "deepspeed is only supported without pipeline parallelism (ZeRO-2/3 cannot be "
            "combined with it); use parallel.engine=megatron for PP > 1",
        )
    if p.virtual_pipeline is not None:
        _require(p.virtual_pipeline >= 1, "parallel.virtual_pipeline", "must be ≥ 1 or null")
        _require(
            p.pipeline_parallel > 1, "parallel.virtual_pipeline", "needs pipeline_parallel > 1"
        )
    e = config.eval
    for name in ("interval", "captions", "samples", "images"):
        _require(getattr(e, name) >= 0, f"eval.{name}", "must be ≥ 0")
    for i, source in enumerate(e.sources):
        _require(
            bool(source.name) and source.name not in [t.name for t in e.sources[:i]],
            f"eval.sources[{i}].name",
            "give each held-out source its own name: its metrics are heldout/<name>/...",
        )
    if e.interval:
        _require(
            bool(e.sources),
            "eval.interval",
            f"needs held-out data: list it in eval.sources, e.g. {EVAL_SOURCES_EXAMPLE}",
        )
        for name in ("captions", "samples"):
            _require(
                getattr(e, name) == 0 or p.pipeline_parallel == 1,
                f"eval.{name}",
                "generating during training needs parallel.pipeline_parallel=1 (generation is "
                "not pipelined); use mtf-evaluate or mtf-generate on a checkpoint instead",
            )
            _require(
                getattr(e, name) == 0 or bool(e.image_caption_data),
                f"eval.{name}",
                "needs held-out images and captions: an image_caption source in eval.sources",
            )
    _require(
        m.patch_size in (1, 2, 4, 8), "model.patch_size", f"{m.patch_size} is not one of 1, 2, 4, 8"
    )
    _require(
        m.latent_size % m.patch_size == 0,
        "model.patch_size",
        f"{m.patch_size} does not divide model.latent_size={m.latent_size}",
    )
    if m.patch_layer == "unet":
        levels = int(math.log2(m.patch_size)) + 1
        _require(
            len(m.unet_channels) == levels,
            "model.unet_channels",
            f"patch size {m.patch_size} needs {levels} levels (one per 2× downsample, plus one), "
            f"got {len(m.unet_channels)}",
        )
        _require(all(c > 0 for c in m.unet_channels), "model.unet_channels", "must be positive")
        _require(m.unet_blocks_per_level >= 1, "model.unet_blocks_per_level", "must be ≥ 1")
    _require(
        m.rope_scaling_factor is None or m.rope_scaling_factor >= 1,
        "model.rope_scaling_factor",
        "must be ≥ 1 or null",
    )
    _require(m.timestep_frequency_dim % 2 == 0, "model.timestep_frequency_dim", "must be even")
    _require(
        d.seq_length <= m.max_sequence_length,
        "data.seq_length",
        f"{d.seq_length} exceeds model.max_sequence_length={m.max_sequence_length}",
    )
    _require(
        m.patches_per_image + 2 <= d.seq_length,
        "data.seq_length",
        f"{d.seq_length} cannot hold one image ({m.patches_per_image} patches + BOI/EOI)",
    )
    _require(d.micro_batch_size > 0, "data.micro_batch_size", "must be positive")
    _require(
        d.global_batch_tokens % (d.seq_length * d.micro_batch_size) == 0,
        "data.global_batch_tokens",
        f"{d.global_batch_tokens} is not a multiple of data.seq_length × data.micro_batch_size "
        f"= {d.seq_length * d.micro_batch_size}",
    )
    _require(
        0.0 <= d.caption_first_probability <= 1.0,
        "data.caption_first_probability",
        "must lie in [0, 1]",
    )
    labels = [source.label for source in d.sources]
    for i, source in enumerate(d.sources):
        _require(source.weight >= 0, f"data.sources[{i}].weight", "must be ≥ 0")
        _require(
            labels.count(source.label) == 1,
            f"data.sources[{i}].name",
            f"{source.label!r} names two sources; give each a distinct name",
        )
    _require(
        not d.sources or sum(s.weight for s in d.sources) > 0,
        "data.sources",
        "every weight is 0: nothing to draw from",
    )
    _require(dif.train_timesteps > 1, "diffusion.train_timesteps", "must be > 1")
    _require(
        0 <= dif.image_first_max_timestep < dif.train_timesteps,
        "diffusion.image_first_max_timestep",
        f"must lie in [0, {dif.train_timesteps - 1}]",
    )
    _require(0.0 <= dif.caption_dropout < 1.0, "diffusion.caption_dropout", "must lie in [0, 1)")
    _require(dif.min_snr_gamma > 0, "diffusion.min_snr_gamma", "must be positive")
    _require(dif.loss_weight >= 0, "diffusion.loss_weight", "must be ≥ 0")
    o = config.optimizer
    _require(o.lr > 0, "optimizer.lr", "must be positive")
    _require(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must lie in [0, optimizer.lr={o.lr}]")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be ≥ 0")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1", "betas must lie in [0, 1)")
    _require(o.grad_clip > 0, "optimizer.grad_clip", "must be positive")
    _require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be ≥ 1")
    _require(
        config.checkpoint.interval >= 1, "checkpoint.interval", "must be ≥ 1 (steps between saves)"
    )
    r = config.run
    _require(r.train_steps >= 1, "run.train_steps", "must be ≥ 1")
    _require(r.log_interval >= 1, "run.log_interval", "must be ≥ 1 (steps between log lines)")
    _require(r.max_consecutive_skips >= 1, "run.max_consecutive_skips", "must be ≥ 1")
    steps = config.profile.steps
    _require(
        not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1] <= r.train_steps),
        "profile.steps",
        f"{steps} is not [first, last] with 1 ≤ first ≤ last ≤ run.train_steps={r.train_steps}",
    )
    dd = config.distributed
    _require(dd.timeout_minutes > 0, "distributed.timeout_minutes", "must be positive")
    _require(
        0 <= dd.hang_watchdog_minutes < dd.timeout_minutes,
        "distributed.hang_watchdog_minutes",
        f"must lie in [0, distributed.timeout_minutes={dd.timeout_minutes}): a hung collective "
        "fails at the timeout, so the stacks must be dumped before it",
    )
