"""The global data plan: which samples fill which sequence, decided from lengths alone.

Any number of sources (``data.sources``: prepared datasets of text or image–caption
pairs, each with a weight) are mixed to their token shares by always drawing from the
source furthest below its share; each source is read in a fresh seeded permutation every
epoch (a small source repeats, counting its epochs); each image–caption pair is laid out
caption-first with the configured probability (else image-first, which limits its noise). Examples are packed
greedily into rows of ``seq_length``; one that does not fit starts the next row.

A document longer than a row continues over several examples: windows of at most
``seq_length`` positions of its layout ``BOS text EOS`` (so BOS only in the first, EOS
only in the last), each starting at the last position of the one before, so that every
next-token prediction is trained exactly once. An interleaved document is cut only at
text: a window that would cut an image ends before its BOI (``batch.window_end``). Each
window is a document of its own in its row: positions restart at 0 and it attends to
nothing of the earlier windows. The loader checks that every image–caption pair, and
every image of a document, fits a row before planning.

Every rank runs the same sampler over all rows (cheap: no sample is read) and keeps the
rows of its data-parallel rank. Its state is a handful of integers, so a checkpoint
resumes exactly, also onto another data-parallel size with the same global batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megatron_transfusion.batch import (
    document_length,
    image_caption_length,
    image_spans,
    text_document_length,
    window_end,
)
from megatron_transfusion.config import UserError
from megatron_transfusion.data.source import DOCUMENT_KINDS, IMAGE, DocumentParts



@dataclass(frozen=True)
class PlannedExample:
    stream: str  # the source's name (data.sources[i].label)
    index: int  # sample index in the source's dataset
    caption_first: bool
    length: int  # tokens once laid out in the sequence
    start: int = 0  # where in the document's layout this example starts (a continued text)


@dataclass
class _Cursor:
    epoch: int = 0
    position: int = 0
    tokens: int = 0  # laid-out tokens drawn so far
    offset: int = 0  # where the document at ``position`` continues (a long text)


class MixtureSampler:
    def __init__(
        self,
        lengths: dict[str, np.ndarray],  # per source: text tokens per sample
        kinds: dict[str, str],  # per source: its kind (data.source)
        weights: dict[str, float],  # per source: token share, relative
        seq_length: int,
        patches_per_image: int,
        caption_first_probability: float,
        seed: int,
        documents: dict[str, DocumentParts] | None = None,  # per source of DOCUMENT_KINDS
    ):
        total = sum(weights.values())
        # Sources in config order: the order seeds each one's shuffle and breaks ties.
        self.streams = [s for s in lengths if weights[s] > 0]
        if not self.streams:
            raise UserError("no data source to draw from: every weight in data.sources is 0")
        self.targets = {s: weights[s] / total for s in self.streams}
        self.ids = {s: i for i, s in enumerate(lengths)}
        for stream in self.streams:
            if len(lengths[stream]) == 0:
                raise UserError(f"data source '{stream}' has no samples")
        self.kinds = kinds
        self.seq_length = seq_length
        self.caption_first_probability = caption_first_probability
        self.seed = seed
        self.patches_per_image = patches_per_image
        self.documents = documents or {}
        self.layout_lengths = {}
        for s in self.streams:
            tokens = lengths[s].astype(np.int64)
            if kinds[s] == IMAGE:
                self.layout_lengths[s] = image_caption_length(tokens, patches_per_image)
            elif kinds[s] in DOCUMENT_KINDS:
                images = self.documents[s].images()
                self.layout_lengths[s] = document_length(tokens, images, patches_per_image)
            else:
                self.layout_lengths[s] = text_document_length(tokens)
        self.cursors = {s: _Cursor() for s in self.streams}
        self.pending: PlannedExample | None = None
        self.rows_planned = 0
        self._epoch_cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}

    def _epoch_order(self, stream: str, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._epoch_cache.get(stream)
        if cached is None or cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.ids[stream], epoch]))
            n = len(self.layout_lengths[stream])
            order = rng.permutation(n)
            caption_first = rng.random(n) < self.caption_first_probability
            self._epoch_cache[stream] = cached = (epoch, order, caption_first)
        return cached[1], cached[2]

    def _choose_stream(self) -> str:
        return min(
            self.streams, key=lambda s: (self.cursors[s].tokens / self.targets[s], self.ids[s])
        )

    def _draw(self) -> PlannedExample:
        stream = self._choose_stream()
        cursor = self.cursors[stream]
        order, caption_first = self._epoch_order(stream, cursor.epoch)
        index = int(order[cursor.position])
        whole, start = int(self.layout_lengths[stream][index]), cursor.offset
        stop = min(whole, start + self.seq_length)
        if stop < whole and stream in self.documents:
            spans = image_spans(self.documents[stream].of(index), self.patches_per_image)
            stop = window_end(start, whole, spans, self.seq_length)
        example = PlannedExample(
            stream=stream,
            index=index,
            caption_first=bool(caption_first[cursor.position])
            if self.kinds[stream] == IMAGE
            else True,
            length=stop - start,
            start=start,
        )
        cursor.tokens += example.length
        if start + example.length < whole:  # continues from this window's last position
            cursor.offset = start + example.length - 1
            return example
        cursor.position, cursor.offset = cursor.position + 1, 0
        if cursor.position == len(order):
            cursor.epoch, cursor.position = cursor.epoch + 1, 0
        return example

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per source: (laid-out tokens in the rows planned so far, epochs completed)."""
        tokens = {s: c.tokens for s, c in self.cursors.items()}
        if self.pending is not None:  # drawn, not yet in a row
            tokens[self.pending.stream] -= self.pending.length
        return {s: (tokens[s], c.epoch) for s, c in self.cursors.items()}

    def next_row(self) -> list[PlannedExample]:
        row, used = [], 0
        while True:
            example = self.pending or self._draw()
            self.pending = None
            if used + example.length > self.seq_length:
                self.pending = example
                break
            row.append(example)
            used += example.length
        self.rows_planned += 1
        return row

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "rows_planned": self.rows_planned,
            "cursors": {s: asdict(c) for s, c in self.cursors.items()},
            "pending": asdict(self.pending) if self.pending else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or set(state["cursors"]) != set(self.streams):
            raise UserError(
                f"the saved data state is of a run with seed {state['seed']} and sources "
                f"{sorted(state['cursors'])}, this run has seed {self.seed} and sources "
                f"{sorted(self.streams)}: keep run.seed and the names of data.sources"
            )
        self.rows_planned = state["rows_planned"]
        self.cursors = {s: _Cursor(**c) for s, c in state["cursors"].items()}
        self.pending = PlannedExample(**state["pending"]) if state["pending"] else None
