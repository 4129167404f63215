"""This rank's micro-batches, one global step at a time, as PackedBatches."""

from __future__ import annotations

import numpy as np
import torch

from megatron_transfusion.batch import (
    ImageSegment,
    PackedBatch,
    SpecialTokens,
    TextSegment,
    cut_document,
    document_segments,
    image_caption_length,
    pack_documents,
)
from megatron_transfusion.config import (
    SOURCES_EXAMPLE,
    BatchGeometry,
    ConfigError,
    ExperimentConfig,
    UserError,
)
from megatron_transfusion.data.mixture import MixtureSampler, PlannedExample
from megatron_transfusion.data.source import (
    DOCUMENT_KINDS,
    IMAGE,
    TEXT,
    PreparedDataset,
    made_with,
)


def _check_compatible(datasets: dict[str, PreparedDataset], cfg: ExperimentConfig) -> dict:
    """Every source made with one tokenizer (and image sources with one VAE), fitting the
    model and the rows; returns the special token ids."""
    tokenizers = {s: d.manifest["tokenizer"] for s, d in datasets.items()}
    first = next(iter(tokenizers.values()))
    for stream, tokenizer in tokenizers.items():
        if tokenizer["sha256"] != first["sha256"]:
            raise UserError(
                f"data source '{stream}' was tokenized with another tokenizer than the rest "
                f"({tokenizer['path']} vs {first['path']}); re-shard one of them"
            )
    vaes = {s: d.manifest["vae"] for s, d in datasets.items() if d.kind != TEXT}
    for stream, vae in vaes.items():
        other = next(iter(vaes.values()))
        if vae["sha256"] != other["sha256"]:
            raise UserError(
                f"data source '{stream}' has latents of another VAE than the rest "
                f"({vae['path']} vs {other['path']}); re-shard one of them"
            )
    if first["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(
            f"config field 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
            f"tokenizer's {first['vocab_size']} ({first['path']})"
        )
    for dataset in datasets.values():
        if dataset.kind != TEXT:
            _check_images_fit(dataset, cfg)
    return first["special"]


def _check_images_fit(dataset: PreparedDataset, cfg: ExperimentConfig) -> None:
    """The sharding job's image settings against the model's and the row length: an
    image–caption pair must fit a row whole, a document's images each (it is cut at text)."""
    m, manifest = cfg.model, dataset.manifest
    expected = [m.latent_channels, m.latent_size, m.latent_size]
    found = manifest["latent_shape"]
    if found != expected:
        raise ConfigError(
            f"image latents in '{dataset.directory}' have shape {found} (sharded "
            f"with --image-size {manifest['image_size']}), the model expects "
            f"{expected} (model.latent_channels, model.latent_size)"
        )
    if dataset.kind != IMAGE:
        needed = image_caption_length(0, m.patches_per_image)
        if needed > cfg.data.seq_length:
            raise ConfigError(
                f"config field 'data.seq_length': {cfg.data.seq_length} cannot hold an image "
                f"of '{dataset.directory}' with a token of text before it ({needed} positions: "
                f"{m.patches_per_image} patches + BOS/EOS/BOI/EOI); raise data.seq_length"
            )
        return
    caption = int(dataset.lengths.max(initial=0))  # an empty dataset: the sampler says so
    needed = image_caption_length(caption, m.patches_per_image)
    if needed > cfg.data.seq_length:
        fits = cfg.data.seq_length - image_caption_length(0, m.patches_per_image)
        raise ConfigError(
            f"config field 'data.seq_length': {cfg.data.seq_length} cannot hold an image-caption "
            f"pair of '{dataset.directory}' ({needed} positions: a {caption}-token caption, "
            f"sharded with --max-caption-tokens {manifest['max_caption_tokens']}, + "
            f"{m.patches_per_image} patches + BOS/EOS/BOI/EOI); raise data.seq_length or "
            f"re-shard with --max-caption-tokens {fits}"
        )


class MixedModalityLoader:
    """Plans every global batch, materialises only this data-parallel rank's rows.

    Ranks that share a DP rank (the TP/PP ranks of one replica) get identical batches.
    ``state_dict()`` taken between steps resumes exactly, on any DP size.
    """

    def __init__(self, cfg: ExperimentConfig, dp_rank: int = 0, dp_size: int = 1):
        d = cfg.data
        if not d.sources:
            raise ConfigError(
                "config field 'data.sources' is empty: list the prepared datasets to train on, "
                f"e.g. {SOURCES_EXAMPLE}"
            )
        self.datasets = {
            source.label: PreparedDataset(source.path, d.cache_dir, d.verify_shards)
            for source in d.sources
        }
        for i, source in enumerate(d.sources):
            dataset = self.datasets[source.label]
            if dataset.kind != source.kind:
                raise UserError(
                    f"'{dataset.directory}' holds {dataset.kind} data, not {source.kind} "
                    f"(config field 'data.sources[{i}].kind')"
                )
        special = _check_compatible(self.datasets, cfg)
        # The tokenizer and VAE fingerprints checkpoints record (checkpoints.sources).
        self.made_with = made_with([ds.manifest for ds in self.datasets.values()])
        self.special = SpecialTokens(**special)
        self.global_rows = BatchGeometry.of(d, dp_size).sequences
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._last: tuple = (None, None, None)  # (stream, index, sample) last read
        self.cfg = cfg
        self.sampler = MixtureSampler(
            {s.label: self.datasets[s.label].lengths for s in d.sources},
            {s.label: s.kind for s in d.sources},
            {s.label: s.weight for s in d.sources},
            d.seq_length,
            cfg.model.patches_per_image,
            d.caption_first_probability,
            cfg.run.seed,
            {s.label: self.datasets[s.label].documents for s in d.sources if s.kind in DOCUMENT_KINDS},
        )

    def _sample(self, stream: str, index: int) -> dict:
        """The pieces of a long document are planned one after another: read it once."""
        if self._last[:2] != (stream, index):
            self._last = (stream, index, self.datasets[stream][index])
        return self._last[2]

    def _document(self, example: PlannedExample) -> list:
        sample = self._sample(example.stream, example.index)
        kind = self.datasets[example.stream].kind
        if kind != IMAGE:  # positions [start, stop) of the document laid out whole
            if kind == TEXT:
                whole = [TextSegment([self.special.bos, *sample["tokens"].tolist(), self.special.eos])]
            else:
                latents = torch.from_numpy(sample["latents"].astype(np.float32))
                whole = document_segments(
                    sample["tokens"].tolist(), sample["parts"].tolist(), latents, self.special
                )
            stop = example.start + example.length
            patches = self.cfg.model.patches_per_image
            return cut_document(whole, example.start, stop, patches, self.special)
        image = ImageSegment(
            torch.from_numpy(sample["latent"].astype(np.float32)), example.caption_first
        )
        caption = sample["caption"].tolist()
        if example.caption_first:
            return [
                TextSegment([self.special.bos, *caption]),
                image,
                TextSegment([self.special.eos]),
            ]
        return [TextSegment([self.special.bos]), image, TextSegment([*caption, self.special.eos])]

    def next_step(self) -> list[PackedBatch]:
        """This rank's micro-batches of the next global batch (rows strided over DP ranks)."""
        plan = [self.sampler.next_row() for _ in range(self.global_rows)]
        mine = plan[self.dp_rank :: self.dp_size]
        m = self.cfg.model
        shape = (m.latent_channels, m.latent_size, m.latent_size)
        size = self.cfg.data.micro_batch_size
        return [
            pack_documents(
                [[self._document(e) for e in row] for row in mine[i : i + size]],
                self.cfg.data.seq_length,
                m.patches_per_image,
                shape,
                self.special,
            )
            for i in range(0, len(mine), size)
        ]

    def state_dict(self) -> dict:
        # "planner": the sampler's key in every checkpoint written so far; kept so they resume.
        return {"planner": self.sampler.state_dict(), "global_rows": self.global_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["global_rows"] != self.global_rows:
            raise UserError(
                f"the saved data state is for {state['global_rows']} sequences per step, "
                f"this run has {self.global_rows}: keep data.global_batch_tokens"
            )
        self.sampler.load_state_dict(state["planner"])
