"""Interleaved documents and image edits: how a stored document is laid out, cut into
windows that never cut an image, and trained (given images stay clean, without a loss)."""

import numpy as np
import pytest
import torch

from megatron_transfusion.batch import (
    GENERATED_IMAGE,
    GIVEN_IMAGE,
    ImageSegment,
    SpecialTokens,
    TextSegment,
    cut_document,
    document_length,
    document_segments,
    image_spans,
    pack_documents,
)
from megatron_transfusion.config import DiffusionConfig
from megatron_transfusion.data.mixture import MixtureSampler
from megatron_transfusion.data.source import DocumentParts
from megatron_transfusion.diffusion.schedule import CosineSchedule
from megatron_transfusion.training.step import MicroBatch

SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)
PATCHES = 4
SHAPE = (2, 2, 2)


def random_parts(rng, n_parts):
    return [
        int(rng.integers(0, 30)) if rng.random() < 0.5 else int(rng.choice([-1, -2]))
        for _ in range(n_parts)
    ]


def stored(parts, rng):
    """(tokens, latents) of a document with these parts: tokens numbered 10, 11, ..."""
    tokens = list(range(10, 10 + sum(p for p in parts if p >= 0)))
    latents = torch.from_numpy(rng.standard_normal((sum(p < 0 for p in parts), *SHAPE)))
    return tokens, latents.float()


def layout(document):
    """Every position of a laid-out document: a token id, or ("image", i, patch)."""
    out, image = [], 0
    for segment in document:
        if isinstance(segment, TextSegment):
            out += segment.tokens
        else:
            out += [SPECIAL.boi, *[("image", image, p) for p in range(PATCHES)], SPECIAL.eoi]
            image += 1
    return out


def test_document_segments_lay_out_parts_in_order_with_bos_eos():
    rng = np.random.default_rng(0)
    parts = [GIVEN_IMAGE, 3, GENERATED_IMAGE, 0, GENERATED_IMAGE, 2]
    tokens, latents = stored(parts, rng)
    document = document_segments(tokens, parts, latents, SPECIAL)
    expected = [1, SPECIAL.boi, *[("image", 0, p) for p in range(PATCHES)], SPECIAL.eoi]
    expected += [10, 11, 12, SPECIAL.boi, *[("image", 1, p) for p in range(PATCHES)]]
    expected += [SPECIAL.eoi, SPECIAL.boi, *[("image", 2, p) for p in range(PATCHES)]]
    expected += [SPECIAL.eoi, 13, 14, 2]
    assert layout(document) == expected
    assert len(expected) == document_length(len(tokens), 3, PATCHES)
    images = [s for s in document if isinstance(s, ImageSegment)]
    # The first image precedes all text: image-first; it is the given one.
    assert [(i.caption_first, i.given) for i in images] == [
        (False, True),
        (True, False),
        (True, False),
    ]
    assert all(torch.equal(i.latent, latents[k]) for k, i in enumerate(images))
    assert image_spans(parts, PATCHES) == [
        (i, i + PATCHES + 1) for i, p in enumerate(expected) if p == SPECIAL.boi
    ]


@pytest.mark.parametrize("seed", range(8))
def test_windows_never_cut_an_image_and_train_every_prediction_once(seed):
    """Brute force over random documents longer than a row: the sampler's windows, cut
    from the loader's layout, hold each image whole exactly once, and every pair of
    neighbouring positions (a next-token prediction, or an image's context) lies in
    exactly one window."""
    rng = np.random.default_rng(seed)
    seq_length = int(rng.integers(PATCHES + 4, 40))
    docs = [random_parts(rng, int(rng.integers(1, 12))) for _ in range(6)]
    flat = np.array([p for d in docs for p in d], dtype=np.int32)
    offsets = np.cumsum([0, *(len(d) for d in docs)])
    lengths = np.array([sum(p for p in d if p >= 0) for d in docs])
    sampler = MixtureSampler(
        {"docs": lengths},
        {"docs": "interleaved"},
        {"docs": 1.0},
        seq_length,
        PATCHES,
        0.8,
        seed=seed,
        documents={"docs": DocumentParts(flat, offsets)},
    )
    windows = {i: [] for i in range(len(docs))}
    while sampler.cursors["docs"].epoch < 2:  # the first epoch's rows all planned
        for example in sampler.next_row():
            assert example.length <= seq_length
            windows[example.index].append((example.start, example.start + example.length))
    for index, parts in enumerate(docs):
        tokens, latents = stored(parts, rng)
        whole = layout(document_segments(tokens, parts, latents, SPECIAL))
        ends = [stop for _, stop in windows[index]]
        cuts = windows[index][: ends.index(len(whole)) + 1]  # the first epoch's
        assert cuts[0][0] == 0
        pairs = [0] * (len(whole) - 1)
        seen_images = []
        for start, stop in cuts:
            window = layout(
                cut_document(
                    document_segments(tokens, parts, latents, SPECIAL),
                    start,
                    stop,
                    PATCHES,
                    SPECIAL,
                )
            )
            # The window is the layout's slice, images renumbered from 0 within it.
            first = next((p[1] for p in whole[start:stop] if isinstance(p, tuple)), 0)
            renumbered = [
                ("image", p[1] - first, p[2]) if isinstance(p, tuple) else p
                for p in whole[start:stop]
            ]
            assert window == renumbered
            seen_images += sorted({p[1] for p in whole[start:stop] if isinstance(p, tuple)})
            for p in range(start, stop - 1):
                pairs[p] += 1
        assert pairs == [1] * (len(whole) - 1)
        assert seen_images == list(range(sum(p < 0 for p in parts)))


def test_cut_document_refuses_to_cut_an_image():
    rng = np.random.default_rng(0)
    tokens, latents = stored([2, GENERATED_IMAGE, 2], rng)
    document = document_segments(tokens, [2, GENERATED_IMAGE, 2], latents, SPECIAL)
    with pytest.raises(ValueError, match="cuts the image"):
        cut_document(document, 0, 5, PATCHES, SPECIAL)


def test_given_images_stay_clean_and_weigh_nothing_in_the_loss():
    rng = np.random.default_rng(0)
    parts = [GIVEN_IMAGE, 3, GENERATED_IMAGE]
    tokens, latents = stored(parts, rng)
    batch = pack_documents(
        [[document_segments(tokens, parts, latents, SPECIAL)]] * 2, 40, PATCHES, SHAPE, SPECIAL
    )
    assert batch.given.tolist() == [True, False, True, False] and batch.num_generated == 2
    schedule = CosineSchedule.create(1000)
    cfg = DiffusionConfig(caption_dropout=1.0)  # every generated image drops its context
    micro = MicroBatch.draw(batch, schedule, cfg, torch.Generator().manual_seed(0), "cpu")
    given = batch.given
    assert torch.equal(micro.batch.latents[given], batch.latents[given])
    assert (micro.batch.timesteps[given] == 0).all()
    assert not micro.batch.unconditional[given].any() and micro.batch.unconditional[~given].all()
    assert not torch.equal(micro.batch.latents[~given], batch.latents[~given])
    assert micro.image_weights.tolist() == [0.0, 1.0, 0.0, 1.0]
    # The draws do not depend on which images are given: the generated ones are noised
    # exactly as they would be with every image generated.
    all_generated = batch.replace(given=torch.zeros_like(given))
    reference = MicroBatch.draw(
        all_generated, schedule, cfg, torch.Generator().manual_seed(0), "cpu"
    )
    assert torch.equal(reference.batch.latents[~given], micro.batch.latents[~given])
    assert torch.equal(reference.noise, micro.noise)
