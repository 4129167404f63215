"""PackedBatch: the one definition of a mixed-modality batch.

The data pipeline produces it, the model and the attention-mask builder consume it, and
inference builds it step by step. A row is a fixed-length sequence holding one or more
documents; a document is text with images spliced in as ``BOI <patches> EOI``:

    tokens        [b, s]  token ids; image positions hold ``placeholder_id``
    positions     [b, s]  RoPE positions, restarting at 0 in every document
    document_ids  [b, s]  document index within the row, -1 for padding
    image_ids     [b, s]  index into ``latents`` for image positions, -1 for text

and per image (numbered in row-major order of appearance):

    latents        [n, C, H, W] model input: clean latents from data, x_t once noised
    timesteps      [n]  diffusion step of ``latents`` (0 for clean images)
    caption_first  [n]  the caption precedes the image (else the noise limit applies)
    unconditional  [n]  the image may not attend to anything before it (CFG dropout)
    given          [n]  the image is an input, not generated (an edit's source image): it
                        stays clean at t = 0 and has no diffusion loss
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class PackedBatch:
    tokens: torch.Tensor
    positions: torch.Tensor
    document_ids: torch.Tensor
    image_ids: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    caption_first: torch.Tensor
    unconditional: torch.Tensor
    given: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device) -> PackedBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def replace(self, **changes) -> PackedBatch:
        return replace(self, **changes)

    def image_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every image position, ordered by image then patch."""
        rows, cols = torch.nonzero(self.image_ids >= 0, as_tuple=True)
        return rows, cols

    def lm_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token labels [b, s] and the mask of positions that get an LM loss.

        A position is trained to predict the next token only when both are text of the
        same document: no loss from BOI into the image, none inside it, none across
        document boundaries or into padding.
        """
        labels = torch.zeros_like(self.tokens)
        labels[:, :-1] = self.tokens[:, 1:]
        is_text = (self.image_ids < 0) & (self.document_ids >= 0)
        mask = torch.zeros_like(is_text)
        mask[:, :-1] = (
            is_text[:, :-1]
            & is_text[:, 1:]
            & (self.document_ids[:, :-1] == self.document_ids[:, 1:])
        )
        return labels, mask

    def validate(self, patches_per_image: int) -> None:
        """Cheap structural checks; raises ValueError naming what is inconsistent."""
        shape = self.tokens.shape
        for name in ("positions", "document_ids", "image_ids"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"PackedBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {tuple(shape)} like tokens"
                )
        n = self.num_images
        for name in ("timesteps", "caption_first", "unconditional", "given"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"PackedBatch.{name} must have one entry per image ({n})")
        counts = torch.bincount(self.image_ids[self.image_ids >= 0].flatten(), minlength=n)
        if counts.numel() != n or bool((counts != patches_per_image).any()):
            raise ValueError(
                f"every image needs exactly {patches_per_image} positions; got {counts.tolist()}"
            )
        flat = self.image_ids[self.image_ids >= 0]
        if flat.numel() and bool((flat[1:] < flat[:-1]).any()):
            raise ValueError("image_ids must number images in row-major order of appearance")


@dataclass(frozen=True)
class TextSegment:
    tokens: list[int]


@dataclass(frozen=True)
class ImageSegment:
    latent: torch.Tensor  # [C, H, W]
    caption_first: bool = True
    given: bool = False  # an input image (an edit's source): clean, no diffusion loss


Document = list  # of TextSegment | ImageSegment

# What a document's layout adds to its content, in positions: BOS and EOS around the
# document (the loader adds them), BOI and EOI around each image (``pack_documents``).
# Every length limit (the loader's plan, sharding checks) is derived from these.
DOCUMENT_OVERHEAD = 2
IMAGE_OVERHEAD = 2


def text_document_length(text_tokens: int) -> int:
    """Positions of a text document laid out whole: BOS text EOS."""
    return text_tokens + DOCUMENT_OVERHEAD


def image_caption_length(caption_tokens: int, patches_per_image: int) -> int:
    """Positions of an image–caption pair in either order: BOS caption BOI patches EOI EOS."""
    return caption_tokens + DOCUMENT_OVERHEAD + patches_per_image + IMAGE_OVERHEAD


# A prepared document of the kinds "interleaved" and "image_edit" is stored as its text
# tokens, concatenated, and its parts in order: n >= 0 is the next n of those tokens, a
# negative part the next image latent, generated (trained with the diffusion loss) or given
# (an edit's input: clean, no loss).
GENERATED_IMAGE, GIVEN_IMAGE = -1, -2


def document_length(text_tokens, images, patches_per_image: int):
    """Positions of a document laid out whole: BOS, its text and images, EOS (ints or arrays)."""
    return text_tokens + DOCUMENT_OVERHEAD + images * (patches_per_image + IMAGE_OVERHEAD)


def image_spans(parts, patches_per_image: int) -> list[tuple[int, int]]:
    """(BOI, EOI) positions of each image of a document laid out whole (BOS at 0)."""
    spans, cursor = [], 1
    for part in parts:
        if part >= 0:
            cursor += int(part)
        else:
            spans.append((cursor, cursor + patches_per_image + 1))
            cursor += patches_per_image + IMAGE_OVERHEAD
    return spans


def window_end(start: int, whole: int, spans: list[tuple[int, int]], seq_length: int) -> int:
    """Where the window of a document (``whole`` positions laid out) that starts at text
    position ``start`` ends (exclusive): as far as a row reaches, but never through an
    image, which ends it before its BOI instead. The next window starts at this one's last
    position, which is therefore text too."""
    stop = min(start + seq_length, whole)
    for boi, eoi in spans:
        if boi < stop <= eoi:
            return boi
    return stop


def document_segments(
    tokens: list[int], parts: list[int], latents: torch.Tensor, special: SpecialTokens
) -> Document:
    """A stored document as segments, BOS and EOS included. An image is caption-first
    (trained over every noise level) when text precedes it in the document, else it gets
    the image-first noise limit, as an image before its caption does."""
    document: Document = [TextSegment([special.bos])]
    text, image, seen_text = 0, 0, False
    for part in parts:
        if part >= 0:
            ids = tokens[text : text + part]
            text += part
            seen_text = seen_text or part > 0
            if isinstance(document[-1], TextSegment):
                document[-1] = TextSegment([*document[-1].tokens, *ids])
            else:
                document.append(TextSegment(list(ids)))
        else:
            document.append(ImageSegment(latents[image], seen_text, part == GIVEN_IMAGE))
            image += 1
    if isinstance(document[-1], TextSegment):
        document[-1] = TextSegment([*document[-1].tokens, special.eos])
    else:
        document.append(TextSegment([special.eos]))
    return document


def cut_document(document: Document, start: int, stop: int, patches_per_image: int) -> Document:
    """Positions [start, stop) of a laid-out document: text is sliced, an image must lie
    wholly inside or outside (``window_end`` chooses such windows)."""
    window: Document = []
    cursor = 0
    for segment in document:
        if isinstance(segment, TextSegment):
            end = cursor + len(segment.tokens)
            ids = segment.tokens[max(start - cursor, 0) : max(stop - cursor, 0)]
            if ids:
                window.append(TextSegment(list(ids)))
        else:
            end = cursor + patches_per_image + IMAGE_OVERHEAD
            if start <= cursor and end <= stop:
                window.append(segment)
            elif cursor < stop and start < end:
                raise ValueError(f"window [{start}, {stop}) cuts the image at [{cursor}, {end})")
        cursor = end
    return window


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the five special tokens, in ``data_prep.tokenizer.SPECIAL_TOKENS`` order."""

    pad: int  # also the placeholder at image positions
    bos: int  # document bounds: the loader adds them, the packer does not
    eos: int
    boi: int  # image bounds: the packer writes them around each image's patches
    eoi: int


def pack_documents(
    rows: list[list[Document]],
    seq_length: int,
    patches_per_image: int,
    latent_shape: tuple[int, int, int],
    special: SpecialTokens,
) -> PackedBatch:
    """Lay documents out into a PackedBatch; ``rows[i]`` are the documents of row i.

    Images become BOI, ``patches_per_image`` placeholders, EOI. A row that overflows
    ``seq_length`` is an error: choosing what to pack where is the data loader's job.
    """
    b = len(rows)
    tokens = torch.full((b, seq_length), special.pad, dtype=torch.long)
    positions = torch.zeros((b, seq_length), dtype=torch.long)
    document_ids = torch.full((b, seq_length), -1, dtype=torch.long)
    image_ids = torch.full((b, seq_length), -1, dtype=torch.long)
    latents, caption_first, given = [], [], []
    for r, documents in enumerate(rows):
        cursor = 0
        for d, document in enumerate(documents):
            start = cursor
            for segment in document:
                if isinstance(segment, TextSegment):
                    ids = list(segment.tokens)
                    image = None
                else:
                    if tuple(segment.latent.shape) != tuple(latent_shape):
                        raise ValueError(
                            f"row {r}: image latent has shape "
                            f"{tuple(segment.latent.shape)}, expected {latent_shape}"
                        )
                    ids = [special.boi] + [special.pad] * patches_per_image + [special.eoi]
                    image = len(latents)
                    latents.append(segment.latent)
                    caption_first.append(segment.caption_first)
                    given.append(segment.given)
                end = cursor + len(ids)
                if end > seq_length:
                    raise ValueError(f"row {r} needs more than seq_length={seq_length} tokens")
                tokens[r, cursor:end] = torch.tensor(ids, dtype=torch.long)
                if image is not None:
                    image_ids[r, cursor + 1 : end - 1] = image
                cursor = end
            positions[r, start:cursor] = torch.arange(cursor - start)
            document_ids[r, start:cursor] = d
    n = len(latents)
    stacked = torch.stack(latents) if n else torch.zeros((0, *latent_shape))
    return PackedBatch(
        tokens=tokens,
        positions=positions,
        document_ids=document_ids,
        image_ids=image_ids,
        latents=stacked,
        timesteps=torch.zeros(n, dtype=torch.long),
        caption_first=torch.tensor(caption_first, dtype=torch.bool),
        unconditional=torch.zeros(n, dtype=torch.bool),
        given=torch.tensor(given, dtype=torch.bool),
    )
