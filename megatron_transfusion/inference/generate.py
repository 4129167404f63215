"""Transfusion decoding: LM mode until BOI, diffusion mode for the image, then back.

Per row: text is sampled token by token (greedy, temperature, top-p). When BOI is produced
(or forced after the prompt), n pure-noise patches follow; the reverse process runs on them
with classifier-free guidance, each step overwriting the image's keys/values in the cache,
so earlier noise levels are never attended to. The clean latent then replaces the noise
(written once more at t = 0), EOI is appended, and LM mode continues from EOI's logits.

The unconditional branch is built the way training dropped captions: the image attends
only to itself. In the cache it occupies a scratch row per row, beside the row it guides,
and each diffusion step runs two forwards: the conditional and the unconditional prediction.

``use_cache=False`` recomputes every forward over the whole sequence with the training
forward and mask: the reference the cached path is tested against. Each generate call
computes its forwards through one session, ``_CachedSession`` or ``_ReferenceSession``;
the decoding around them (``Generator._generate``, ``Generator._image``) is shared, so the
two paths differ only in how a forward is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from megatron.core import tensor_parallel

from kernels.kv_cache import KVCache, KVCacheView
from megatron_transfusion.batch import (
    Document,
    ImageSegment,
    PackedBatch,
    SpecialTokens,
    TextSegment,
    pack_documents,
)
from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.diffusion.sampler import ReverseProcess
from megatron_transfusion.diffusion.schedule import CosineSchedule

# (latents x_t [k, C, H, W], t) -> predicted noise: one branch of an image being denoised
Denoiser = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # text tokens per row (a forced BOI does not count)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    diffusion_steps: int = 250
    sampler: str = "ddpm"  # or "ddim"
    spacing: str = "leading"  # where the respaced chain starts (diffusion.sampler.SPACINGS)
    guidance_scale: float = 5.0  # 1: no guidance (no unconditional branch)
    max_images: int = 1  # images per row; BOI is not sampled after that
    seed: int = 0
    use_cache: bool = True


@dataclass
class _Row:
    document: Document  # prompt + everything generated so far
    generator: torch.Generator  # this row's draws: results do not depend on the batch
    generated: Document = field(default_factory=list)
    new_tokens: int = 0
    images: int = 0
    done: bool = False
    cut: bool = False  # stopped by the model's context before max_new_tokens

    def append_token(self, token: int) -> None:
        for segments in (self.document, self.generated):
            if segments and isinstance(segments[-1], TextSegment):
                segments[-1] = TextSegment([*segments[-1].tokens, token])
            else:
                segments.append(TextSegment([token]))

    def append_image(self, latent: torch.Tensor) -> None:
        self.document.append(ImageSegment(latent))
        self.generated.append(ImageSegment(latent))


class Generator:
    """Generates for a batch of prompts with one (TP-sharded) model on this rank."""

    def __init__(
        self,
        model,
        cfg: ExperimentConfig,
        special: SpecialTokens,
        sampling: SamplingConfig,
        vocab_size: int | None = None,
    ):
        """``cfg``: the run's config: its model shapes, and the noise schedule it trained with.
        ``vocab_size``: the tokenizer's, when the model's vocabulary is larger (a preset's 32k
        beside a smaller tokenizer): ids the tokenizer lacks decode to nothing, so they are
        never sampled (an early checkpoint's captions came out empty)."""
        self.model = model
        self.cfg = model_cfg = cfg.model
        self.special = special
        self.vocab_size = vocab_size or model_cfg.vocab_size
        self.sampling = sampling
        schedule = CosineSchedule.from_config(cfg.diffusion)
        self.reverse = ReverseProcess(
            schedule, sampling.diffusion_steps, sampling.sampler, sampling.spacing
        )
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.latent_shape = (
            model_cfg.latent_channels,
            model_cfg.latent_size,
            model_cfg.latent_size,
        )
        self.patches = model_cfg.patches_per_image
        self.guided = sampling.guidance_scale != 1.0
        self.stopped_at_context_limit: list[int] = []  # rows of the last generate() cut short

    def check_prompts(self, prompts: list[Document], force_image: bool) -> None:
        """ValueError naming the first prompt that does not fit the model's context."""
        for i, prompt in enumerate(prompts):
            needed = self._document_length(prompt) + (self.patches + 2 if force_image else 0)
            if needed > self.cfg.max_sequence_length:
                raise ValueError(
                    f"prompt {i} needs {needed} positions"
                    f"{' with its image' if force_image else ''}; "
                    f"the model's max_sequence_length is {self.cfg.max_sequence_length}"
                )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Document],
        force_image: bool = False,
        progress=None,
        seeds: list[int] | None = None,
    ) -> list[Document]:
        """Returns what each row generated after its prompt: text and image latents.
        ``force_image`` starts an image right after the prompt (text -> image).
        ``seeds`` seed each row (default: sampling.seed + row), so a prompt's result does not
        depend on what it is batched with. ``progress(step, total)`` follows diffusion steps."""
        seeds = (
            seeds if seeds is not None else [self.sampling.seed + i for i in range(len(prompts))]
        )
        self.check_prompts(prompts, force_image)
        training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompts, force_image, progress, seeds)
        finally:
            self.model.train(training)

    def _generate(self, prompts, force_image, progress, seeds) -> list[Document]:
        """Every row's state machine, one step per iteration for all active rows at once: in
        LM mode a row samples a token (or takes the forced BOI); EOS ends it; BOI switches it
        to diffusion mode for one image (``_image``), which ends with EOI back in LM mode."""
        rows = [
            _Row(list(p), torch.Generator().manual_seed(s))
            for p, s in zip(prompts, seeds, strict=True)
        ]
        session = (
            _CachedSession(self, len(rows)) if self.sampling.use_cache else _ReferenceSession(self)
        )
        logits = session.prefill(rows)
        forced = force_image
        while True:
            for row in rows:
                if not (forced or row.done) and (
                    row.new_tokens >= self.sampling.max_new_tokens or self._room(row) < 1
                ):
                    row.done = True
                    row.cut = row.new_tokens < self.sampling.max_new_tokens
            active = [i for i, row in enumerate(rows) if not row.done]
            if not active:
                break
            if forced:
                chosen = dict.fromkeys(active, self.special.boi)
            else:
                chosen = self._sample(logits, rows, active)
                for i in active:
                    rows[i].new_tokens += 1
            forced = False
            for i in active:
                if chosen[i] == self.special.eos:
                    rows[i].append_token(self.special.eos)
                    rows[i].done = True
            text = [i for i in active if chosen[i] not in (self.special.eos, self.special.boi)]
            imaging = [i for i in active if chosen[i] == self.special.boi]
            if text:
                for i in text:
                    rows[i].append_token(chosen[i])
                logits[text] = session.after_token(rows, text)
            if imaging:
                logits[imaging] = self._image(session, rows, imaging, progress)
        self.stopped_at_context_limit = [i for i, row in enumerate(rows) if row.cut]
        return [row.generated for row in rows]

    def _image(
        self, session: _Session, rows: list[_Row], indices: list[int], progress
    ) -> torch.Tensor:
        """Generate one image for each of ``rows[indices]`` (BOI, denoise, clean, EOI);
        returns the logits at EOI."""
        x = self._normal(rows, indices)  # the chain runs in fp32 whatever the model's dtype
        conditional, unconditional = session.begin_image(rows, indices)
        timesteps = self.reverse.timesteps()
        for step, t in enumerate(timesteps):
            eps = conditional(x, t)
            if self.guided:
                eps = self._guide(eps, unconditional(x, t))
            t_prev = timesteps[step + 1] if step + 1 < len(timesteps) else -1
            x = self.reverse.step(x, eps, t, t_prev, self._normal(rows, indices))
            if progress is not None:
                progress(step + 1, len(timesteps))
        for i, latent in zip(indices, x):
            rows[i].append_image(latent.detach().clone())
            rows[i].images += 1
        return session.after_image(rows, indices, x)

    def _alone_query(self, k: int) -> PackedBatch:
        """k images by themselves at positions 0..n-1: the unconditional branch."""
        n = self.patches
        positions = torch.arange(n, device=self.device).expand(k, n).contiguous()
        image = torch.arange(k, device=self.device)[:, None].expand(k, n).contiguous()
        return self._query(torch.full_like(positions, self.special.pad), positions, image)

    def _guide(self, conditional: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
        """ε = ε_uncond + g·(ε_cond − ε_uncond)."""
        return unconditional + self.sampling.guidance_scale * (conditional - unconditional)

    def _forward(
        self, batch: PackedBatch, kv_cache: KVCacheView | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [s, b, vocab] gathered over TP ranks, predicted noise)."""
        out = self.model(batch, kv_cache=kv_cache)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out.logits)
        return logits.float(), out.predicted_noise

    def _denoise(self, batch: PackedBatch, kv_cache: KVCacheView | None = None) -> torch.Tensor:
        """Predicted noise alone: the LM head is skipped while an image is denoised."""
        return self.model(batch, kv_cache=kv_cache, text_logits=False).predicted_noise.float()

    # ---- helpers ------------------------------------------------------------------------

    def _timesteps(self, k: int, t: int) -> torch.Tensor:
        return torch.full((k,), t, dtype=torch.long, device=self.device)

    def _normal(self, rows: list[_Row], indices: list[int]) -> torch.Tensor:
        """One standard-normal latent per row, from that row's generator."""
        draws = [torch.randn(self.latent_shape, generator=rows[i].generator) for i in indices]
        return torch.stack(draws).to(self.device)

    def _sample(self, logits: torch.Tensor, rows: list[_Row], active: list[int]) -> dict[int, int]:
        scores = logits[active].clone()
        banned = [self.special.pad, self.special.bos, self.special.eoi]  # never LM targets
        scores[:, banned] = -torch.inf
        scores[:, self.vocab_size :] = -torch.inf  # ids the tokenizer lacks, TP padding
        for k, i in enumerate(active):
            if rows[i].images >= self.sampling.max_images or self._room(rows[i]) < self.patches + 2:
                scores[k, self.special.boi] = -torch.inf
        if self.sampling.temperature == 0:
            chosen = scores.argmax(-1)
        else:
            probs = _top_p(
                torch.softmax(scores / self.sampling.temperature, dim=-1).cpu(), self.sampling.top_p
            )
            chosen = torch.stack(
                [
                    torch.multinomial(p, 1, generator=rows[i].generator)[0]
                    for p, i in zip(probs, active)
                ]
            )
        return dict(zip(active, chosen.tolist()))

    def _last_logits(
        self, output: tuple[torch.Tensor, torch.Tensor], rows: list[_Row]
    ) -> torch.Tensor:
        logits, _ = output
        last = torch.tensor([self._length(row) - 1 for row in rows], device=logits.device)
        return logits[last, torch.arange(len(rows), device=logits.device)]

    def _pack(self, documents: list[Document]) -> PackedBatch:
        length = max(self._document_length(d) for d in documents)
        return pack_documents(
            [[d] for d in documents], length, self.patches, self.latent_shape, self.special
        ).to(self.device)

    def _query(self, tokens, positions, image_ids, latents=None, timesteps=None) -> PackedBatch:
        """A batch of new positions only (their context is in the cache)."""
        images = int(image_ids.max()) + 1 if image_ids.numel() else 0
        if latents is None:
            latents = torch.zeros(
                (images, *self.latent_shape), dtype=self.dtype, device=self.device
            )
        if timesteps is None:
            timesteps = torch.zeros(images, dtype=torch.long, device=self.device)
        return PackedBatch(
            tokens=tokens,
            positions=positions,
            document_ids=torch.zeros_like(tokens),
            image_ids=image_ids,
            latents=latents,
            timesteps=timesteps,
            caption_first=torch.ones(images, dtype=torch.bool, device=self.device),
            unconditional=torch.zeros(images, dtype=torch.bool, device=self.device),
            given=torch.zeros(images, dtype=torch.bool, device=self.device),
        )

    def _document_length(self, document: Document) -> int:
        return sum(
            len(s.tokens) if isinstance(s, TextSegment) else self.patches + 2 for s in document
        )

    def _length(self, row: _Row) -> int:
        return self._document_length(row.document)

    def _room(self, row: _Row) -> int:
        return self.cfg.max_sequence_length - self._length(row)


class _CachedSession:
    """One generate call's forwards through a KV cache: each computes only the new
    positions. Row i's unconditional branch lives in scratch row ``rows + i``."""

    def __init__(self, generator: Generator, rows: int):
        self.g = generator
        self.scratch_offset = rows
        scratch_rows = rows if generator.guided else 0
        self.cache = KVCache(
            rows + scratch_rows, generator.cfg.max_sequence_length, generator.device
        )
        self.images_written = 0  # numbers the cache's images (_image_ids)

    def prefill(self, rows: list[_Row]) -> torch.Tensor:
        """Encode the prompts; logits [rows, vocab] at each prompt's last position."""
        g = self.g
        batch = g._pack([row.document for row in rows])
        length = batch.tokens.shape[1]
        every = torch.arange(len(rows), device=g.device)
        slots = torch.arange(length, device=g.device).expand(len(rows), length)
        view = self.cache.view(
            every,
            slots,
            batch.document_ids,
            batch.image_ids,
            torch.zeros_like(batch.image_ids, dtype=torch.bool),
        )
        self.images_written = batch.num_images
        return g._last_logits(g._forward(batch, view), rows)

    def after_token(self, rows: list[_Row], indices: list[int]) -> torch.Tensor:
        """Logits after the token just appended to each of ``rows[indices]``."""
        tokens = [rows[i].document[-1].tokens[-1] for i in indices]
        slots = [self.g._length(rows[i]) - 1 for i in indices]
        return self._write_tokens(indices, tokens, slots)

    def begin_image(self, rows: list[_Row], indices: list[int]) -> tuple[Denoiser, Denoiser | None]:
        """Write BOI after each of ``rows[indices]``; the (conditional, unconditional)
        predictions of the noise of the images that follow it."""
        g = self.g
        n, k = g.patches, len(indices)
        starts = torch.tensor([g._length(rows[i]) for i in indices], device=g.device)  # BOI slot
        slots = starts[:, None] + 1 + torch.arange(n, device=g.device)
        self._write_tokens(indices, [g.special.boi] * k, starts.tolist())
        rows_index = torch.tensor(indices, device=g.device)
        image = self._image_ids(k, n)
        query = g._query(torch.full_like(slots, g.special.pad), slots, image - self.images_written)
        prefixed = self.cache.view(
            rows_index,
            slots,
            torch.zeros_like(image),
            image,
            torch.zeros_like(image, dtype=torch.bool),
        )

        def conditional(x: torch.Tensor, t: int) -> torch.Tensor:
            return g._denoise(query.replace(latents=x, timesteps=g._timesteps(k, t)), prefixed)

        if not g.guided:
            return conditional, None
        # The unconditional branch in the scratch rows: the image alone, at positions
        # 0..n-1 (RoPE is relative), so it never reads the prefix.
        alone = g._alone_query(k)
        isolated = self.cache.view(
            rows_index + self.scratch_offset,
            alone.positions,
            torch.zeros_like(image),
            image,
            torch.ones_like(image, dtype=torch.bool),
        )

        def unconditional(x: torch.Tensor, t: int) -> torch.Tensor:
            return g._denoise(alone.replace(latents=x, timesteps=g._timesteps(k, t)), isolated)

        return conditional, unconditional

    def after_image(self, rows: list[_Row], indices: list[int], x: torch.Tensor) -> torch.Tensor:
        """The clean images ``x`` replace the last noise level in the cache, then EOI follows
        them; returns the logits at EOI."""
        g = self.g
        n, k = g.patches, len(indices)
        first = torch.tensor(
            [g._length(rows[i]) - n - 1 for i in indices], device=g.device
        )  # first patch
        slots = first[:, None] + torch.arange(n + 1, device=g.device)  # the patches, then EOI
        tokens = torch.full_like(slots, g.special.pad)
        tokens[:, -1] = g.special.eoi
        image = self._image_ids(k, n + 1)
        query_images = image - self.images_written
        image[:, -1] = query_images[:, -1] = -1
        batch = g._query(tokens, slots, query_images, latents=x, timesteps=g._timesteps(k, 0))
        view = self.cache.view(
            torch.tensor(indices, device=g.device),
            slots,
            torch.zeros_like(image),
            image,
            torch.zeros_like(image, dtype=torch.bool),
        )
        self.images_written += k
        logits, _ = g._forward(batch, view)
        return logits[-1]

    def _write_tokens(
        self, indices: list[int], tokens: list[int], slots: list[int]
    ) -> torch.Tensor:
        """One text token per row at ``slots``; returns their logits."""
        device = self.g.device
        tokens = torch.tensor(tokens, device=device)[:, None]
        slots = torch.tensor(slots, device=device)[:, None]
        not_image = torch.full_like(tokens, -1)
        batch = self.g._query(tokens, slots, not_image)
        view = self.cache.view(
            torch.tensor(indices, device=device),
            slots,
            torch.zeros_like(tokens),
            not_image,
            torch.zeros_like(tokens, dtype=torch.bool),
        )
        logits, _ = self.g._forward(batch, view)
        return logits[-1]

    def _image_ids(self, k: int, width: int) -> torch.Tensor:
        """[k, width] cache ids of the k images being generated: after every image written
        so far (ids only need to differ within a row; a counter makes them unique)."""
        first = self.images_written
        return (first + torch.arange(k, device=self.g.device))[:, None].expand(k, width).clone()


class _ReferenceSession:
    """One generate call's forwards without a cache: each recomputes whole sequences with
    the training forward and mask. The reference the cached path is tested against."""

    def __init__(self, generator: Generator):
        self.g = generator

    def prefill(self, rows: list[_Row]) -> torch.Tensor:
        return self._logits(rows, list(range(len(rows))))

    def after_token(self, rows: list[_Row], indices: list[int]) -> torch.Tensor:
        return self._logits(rows, indices)

    def begin_image(self, rows: list[_Row], indices: list[int]) -> tuple[Denoiser, Denoiser | None]:
        """The conditional branch appends the noisy image to the whole sequence; the
        unconditional one is the image alone, flagged unconditional (what CFG dropout
        trained)."""
        g = self.g
        k = len(indices)
        documents = [rows[i].document for i in indices]
        # Each row's pending image: after its earlier images and those of the rows before it.
        earlier = torch.tensor([sum(isinstance(s, ImageSegment) for s in doc) for doc in documents])
        pending = (earlier + 1).cumsum(0) - 1

        def conditional(x: torch.Tensor, t: int) -> torch.Tensor:
            batch = g._pack([doc + [ImageSegment(latent)] for doc, latent in zip(documents, x)])
            timesteps = batch.timesteps.clone()
            timesteps[pending] = t
            return g._denoise(batch.replace(timesteps=timesteps))[pending]

        alone = g._alone_query(k).replace(
            unconditional=torch.ones(k, dtype=torch.bool, device=g.device)
        )

        def unconditional(x: torch.Tensor, t: int) -> torch.Tensor:
            return g._denoise(alone.replace(latents=x, timesteps=g._timesteps(k, t)))

        return conditional, unconditional

    def after_image(self, rows: list[_Row], indices: list[int], x: torch.Tensor) -> torch.Tensor:
        return self._logits(rows, indices)

    def _logits(self, rows: list[_Row], indices: list[int]) -> torch.Tensor:
        """Logits at the last position of each of ``rows[indices]``."""
        chosen = [rows[i] for i in indices]
        return self.g._last_logits(
            self.g._forward(self.g._pack([row.document for row in chosen])), chosen
        )


_Session = _CachedSession | _ReferenceSession


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
