"""The Transfusion mask against a brute-force reference built from the documents
themselves (not from the packed tensors), and every attention backend against the dense
SDPA reference.

What runs where (torch 2.14): dense SDPA and the ``flash`` run decomposition (one SDPA call
per run on CPU) are checked forward and backward on CPU; FlexAttention forward on CPU, eager
and compiled. FlexAttention has no CPU backward in torch 2.14 (``NotImplementedError: FlexAttention
does not support backward on CPU``): that test skips with the reason and compares gradients
once torch supports it. The CUDA tests (compiled FlexAttention forward and backward, the
run split on CUDA tensors) run only where a GPU is present (benchmarks/gpu_check.sh).
"""

import pytest
import torch

from kernels.attention import (
    attend,
    attention_runs,
    block_mask,
    build_attention_mask,
    dense_mask,
    flex_kernel,
)
from megatron_transfusion.batch import ImageSegment, SpecialTokens, TextSegment, pack_documents
from megatron_transfusion.config import ModelConfig

SPECIAL = SpecialTokens(pad=0, bos=3, eos=4, boi=1, eoi=2)
PATCHES = 4
SHAPE = (2, 2, 2)


def image(caption_first=True):
    return ImageSegment(torch.randn(SHAPE), caption_first)


def text(n):
    return TextSegment(list(range(3, 3 + n)))


def reference_mask(rows, seq_length, unconditional):
    """allowed[b][q][k] from the document structure, position by position."""
    out = []
    image_index = 0
    for documents in rows:
        spans = []  # (doc, start, end, image_index or None)
        cursor = 0
        for d, document in enumerate(documents):
            for segment in document:
                if isinstance(segment, TextSegment):
                    spans.append((d, cursor, cursor + len(segment.tokens), None))
                    cursor += len(segment.tokens)
                else:
                    spans.append((d, cursor, cursor + 1, None))  # BOI
                    spans.append((d, cursor + 1, cursor + 1 + PATCHES, image_index))
                    spans.append((d, cursor + 1 + PATCHES, cursor + 2 + PATCHES, None))  # EOI
                    image_index += 1
                    cursor += PATCHES + 2
        owner = [None] * seq_length
        for span in spans:
            for i in range(span[1], span[2]):
                owner[i] = span
        allowed = [[False] * seq_length for _ in range(seq_length)]
        for q in range(seq_length):
            for k in range(seq_length):
                oq, ok = owner[q], owner[k]
                if q == k:
                    allowed[q][k] = True
                elif oq is None or ok is None or oq[0] != ok[0]:
                    allowed[q][k] = False  # padding, or another document
                elif oq[3] is not None and oq[3] == ok[3]:
                    allowed[q][k] = True  # same image: bidirectional
                elif oq[3] is not None and unconditional[oq[3]]:
                    allowed[q][k] = False  # a caption-dropped image sees only itself
                else:
                    allowed[q][k] = k <= q
        out.append(allowed)
    return torch.tensor(out)


def random_rows(generator, n_rows, seq_length):
    rows = []
    for _ in range(n_rows):
        documents, used = [], 0
        while True:
            n_segments = int(torch.randint(1, 5, (1,), generator=generator))
            document, length = [], 0
            for _ in range(n_segments):
                if torch.rand(1, generator=generator) < 0.5:
                    n = int(torch.randint(0, 6, (1,), generator=generator))  # may be empty
                    document.append(text(n))
                    length += n
                else:
                    document.append(image(bool(torch.rand(1, generator=generator) < 0.8)))
                    length += PATCHES + 2
            if used + length > seq_length:
                break
            documents.append(document)
            used += length
        rows.append(documents)
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_dense_mask_equals_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = random_rows(generator, 3, 48)
    batch = pack_documents(rows, 48, PATCHES, SHAPE, SPECIAL)
    unconditional = torch.rand(batch.num_images, generator=generator) < 0.3
    batch = batch.replace(unconditional=unconditional)
    expected = reference_mask(rows, 48, unconditional.tolist())
    assert torch.equal(dense_mask(batch)[:, 0], expected)


def test_edge_layouts_equal_brute_force():
    """Image first in the row, image last in the row, image-only and empty-text documents,
    back-to-back images, and a full row with no padding."""
    rows = [
        [[image(False), text(3)], [text(2), image()]],
        [[image()], [text(0), image(), image(), text(0)]],
        [[text(4), image(), text(1), image(), text(2)], [text(7)]],
    ]
    lengths = [
        sum(len(s.tokens) if isinstance(s, TextSegment) else PATCHES + 2 for d in r for s in d)
        for r in rows
    ]
    seq_length = max(lengths)
    batch = pack_documents(rows, seq_length, PATCHES, SHAPE, SPECIAL)
    unconditional = torch.tensor([False, True, False, False, True, False, False])
    batch = batch.replace(unconditional=unconditional)
    expected = reference_mask(rows, seq_length, unconditional.tolist())
    assert torch.equal(dense_mask(batch)[:, 0], expected)
    # Spot checks that the reference itself encodes the rules.
    first = expected[0]
    assert first[1, 4] and first[4, 1], "patches of one image see each other both ways"
    assert not first[7, 8], "text never sees a later token"
    assert not first[9, 3], "documents are isolated"


def test_flex_block_mask_matches_dense_sdpa():
    generator = torch.Generator().manual_seed(11)
    cfg = ModelConfig(latent_channels=2, latent_size=4, patch_size=1)
    from megatron_transfusion.synthetic import random_batch

    batch = random_batch(generator, cfg, 2, 256)
    batch = batch.replace(unconditional=torch.rand(batch.num_images, generator=generator) < 0.3)
    q, k, v = (torch.randn(2, 4, 256, 16, generator=generator) for _ in range(3))
    dense = attend(q, k, v, build_attention_mask(batch, "sdpa"))
    flex = attend(q, k, v, build_attention_mask(batch, "flex", block_size=32))
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-4)
    # Block sparsity is real: packed documents leave whole blocks masked.
    assert block_mask(batch, 32).sparsity() > 30.0


def test_grouped_query_attention_matches_repeated_heads():
    generator = torch.Generator().manual_seed(3)
    cfg = ModelConfig(latent_channels=2, latent_size=4, patch_size=1)
    from megatron_transfusion.synthetic import random_batch

    mask = build_attention_mask(random_batch(generator, cfg, 1, 64), "sdpa")
    q = torch.randn(1, 4, 64, 8, generator=generator)
    k, v = (torch.randn(1, 2, 64, 8, generator=generator) for _ in range(2))
    expected = attend(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask)
    torch.testing.assert_close(attend(q, k, v, mask), expected)


def mixed_batch(seed, rows=3, seq_length=200):
    """Random packed rows with padding, image-first and caption-dropped images."""
    from megatron_transfusion.synthetic import random_batch

    generator = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(latent_channels=2, latent_size=4, patch_size=1)
    batch = random_batch(generator, cfg, rows, seq_length)
    batch = batch.replace(unconditional=torch.rand(batch.num_images, generator=generator) < 0.3)
    assert (
        batch.num_images
        and bool((batch.document_ids < 0).any())
        and bool(batch.unconditional.any())
    )
    return batch, generator


def attention_inputs(
    generator, rows, seq_length, heads=4, kv_heads=4, dtype=torch.float64, device="cpu"
):
    def draw(h):
        return (
            torch.randn(rows, h, seq_length, 16, generator=generator, dtype=dtype)
            .to(device)
            .requires_grad_()
        )

    return (
        draw(heads),
        draw(kv_heads),
        draw(kv_heads),
        torch.randn(rows, heads, seq_length, 16, generator=generator, dtype=dtype).to(device),
    )


def forward_backward(q, k, v, grad_out, mask, scale=0.3):
    out = attend(q, k, v, mask, scale=scale)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("seed", range(4))
def test_split_runs_cover_exactly_the_mask(seed):
    """The flash decomposition is exact by construction: every query is in one run, and
    the keys of its run (causal: bottom-right aligned) are exactly its row of the mask."""
    batch, _ = mixed_batch(seed)
    b, s = batch.tokens.shape
    runs = attention_runs(batch)
    covered = torch.zeros(b * s, b * s, dtype=torch.bool)
    for r, causal in ((runs.causal, True), (runs.full, False)):
        for i in range(len(r.cu_queries) - 1):
            queries = r.queries[r.cu_queries[i] : r.cu_queries[i + 1]]
            keys = r.keys[r.cu_keys[i] : r.cu_keys[i + 1]]
            allowed = torch.ones(len(queries), len(keys), dtype=torch.bool)
            if causal:
                allowed = allowed.tril(len(keys) - len(queries))
            assert not covered[queries].any(), "a query lies in two runs"
            covered[queries[:, None], keys[None, :]] = allowed
    covered[runs.alone, runs.alone] = True
    expected = torch.block_diag(*dense_mask(batch)[:, 0])  # rows never see each other
    assert torch.equal(covered, expected)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_runs_equal_dense_sdpa_forward_and_backward(kv_heads):
    """The ``flash`` backend's decomposition (here with one SDPA call per run, the same
    varlen contract flash_attn_varlen_func implements) against the dense reference."""
    batch, generator = mixed_batch(5)
    q, k, v, grad_out = attention_inputs(generator, 3, 200, kv_heads=kv_heads)
    expected = forward_backward(q, k, v, grad_out, build_attention_mask(batch, "sdpa"))
    actual = forward_backward(q, k, v, grad_out, build_attention_mask(batch, "flash"))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10, msg=name)


def test_flex_backward_on_cpu_equals_dense_or_is_unsupported():
    batch, generator = mixed_batch(6, rows=2, seq_length=256)
    q, k, v, grad_out = attention_inputs(generator, 2, 256, dtype=torch.float32)
    expected = forward_backward(q, k, v, grad_out, build_attention_mask(batch, "sdpa"))
    try:
        actual = forward_backward(
            q, k, v, grad_out, build_attention_mask(batch, "flex", block_size=32)
        )
    except NotImplementedError as e:
        pytest.skip(f"torch {torch.__version__}: {e}")
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=1e-4)


def test_compiled_flex_compiles_once_across_batches():
    """The GPU path's contract, checked with torch.compile on CPU (the same Dynamo guards):
    three batches with different documents and images reuse one compiled graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kernel = flex_kernel(compiled=True)
    for seed in range(3):
        batch, generator = mixed_batch(seed, rows=2, seq_length=256)
        q, k, v = (torch.randn(2, 4, 256, 16, generator=generator) for _ in range(3))
        out = kernel(q, k, v, block_mask=block_mask(batch, 32), scale=0.3)
        expected = attend(q, k, v, build_attention_mask(batch, "sdpa"), scale=0.3)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_gpu_backends_equal_dense_forward_and_backward(backend):
    """On a GPU, in bf16 as trained: the compiled FlexAttention kernel and the run split
    (flash-attn's varlen kernel where installed, else one SDPA call per run) against dense
    SDPA computed in fp32."""
    batch, generator = mixed_batch(7, rows=2, seq_length=512)
    batch = batch.to(torch.device("cuda"))
    q, k, v, grad_out = attention_inputs(generator, 2, 512, dtype=torch.bfloat16, device="cuda")
    expected = forward_backward(
        *(t.float().detach().requires_grad_() for t in (q, k, v)),
        grad_out.float(),
        build_attention_mask(batch, "sdpa"),
    )
    actual = forward_backward(
        q, k, v, grad_out, build_attention_mask(batch, backend, block_size=128)
    )
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e, atol=2e-2, rtol=2e-2)
