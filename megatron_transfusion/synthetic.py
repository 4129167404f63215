"""Deterministic random mixed-modality batches: for tests, smoke runs and benchmarks.

Each row packs several documents: plain text, caption→image, image→caption, and
interleaved text/image/text, so every mask and loss case appears in one batch.
"""

from __future__ import annotations

import torch

from megatron_transfusion.batch import (
    ImageSegment,
    PackedBatch,
    SpecialTokens,
    TextSegment,
    pack_documents,
)
from megatron_transfusion.config import ModelConfig

# Random documents are not wrapped in BOS/EOS and nothing reads those ids from a
# PackedBatch, so they are drawn as text too.
SPECIAL = SpecialTokens(pad=0, bos=3, eos=4, boi=1, eoi=2)
FIRST_TEXT_ID = 3


def _text(generator, vocab_size: int, length: int) -> TextSegment:
    ids = torch.randint(FIRST_TEXT_ID, vocab_size, (length,), generator=generator)
    return TextSegment(ids.tolist())


def _image(generator, cfg: ModelConfig, caption_first: bool) -> ImageSegment:
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return ImageSegment(torch.randn(shape, generator=generator), caption_first)


def random_documents(generator: torch.Generator, cfg: ModelConfig, budget: int) -> list[list]:
    """Documents of random kinds whose laid-out length fits in ``budget`` tokens."""
    image_len = cfg.patches_per_image + 2
    documents, used = [], 0
    while True:
        kind = int(torch.randint(0, 4, (1,), generator=generator))
        n = int(torch.randint(2, 12, (1,), generator=generator))
        if kind == 0:
            doc, length = [_text(generator, cfg.vocab_size, 3 * n)], 3 * n
        elif kind == 1:
            doc, length = (
                [_text(generator, cfg.vocab_size, n), _image(generator, cfg, True)],
                n + image_len,
            )
        elif kind == 2:
            doc = [_image(generator, cfg, False), _text(generator, cfg.vocab_size, n)]
            length = n + image_len
        else:
            doc = [
                _text(generator, cfg.vocab_size, n),
                _image(generator, cfg, True),
                _text(generator, cfg.vocab_size, n),
                _image(generator, cfg, True),
                _text(generator, cfg.vocab_size, 2),
            ]
            length = 2 * n + 2 + 2 * image_len
        if used + length > budget:
            return documents
        documents.append(doc)
        used += length


def random_batch(
    generator: torch.Generator, cfg: ModelConfig, batch_size: int, seq_length: int
) -> PackedBatch:
    rows = [random_documents(generator, cfg, seq_length) for _ in range(batch_size)]
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return pack_documents(rows, seq_length, cfg.patches_per_image, shape, SPECIAL)
