"""The mixed-modality loader: determinism, mixing, ordering, packing, DP split, resume."""

import json
import shutil

import pytest
import torch

from data_prep.shard import ShardJob, merge, run_shard_job
from data_prep.tokenizer import train_bpe
from data_prep.vae import ConvVAE, VAEConfig, save_vae
from megatron_transfusion.config import ConfigError, UserError, load_config, sources_override
from megatron_transfusion.data import MixedModalityLoader, MixtureSampler, PreparedDataset
from tests.conftest import run_torchrun
from tests.data_fixtures import write_inputs


def prepare(root):
    source = write_inputs(root / "inputs", n_images=90, n_docs=30, corrupt=False)
    train_bpe(source["documents"] + source["captions"][:500], 400, root / "tok.json")
    torch.manual_seed(0)
    save_vae(ConvVAE(VAEConfig()), VAEConfig(), 0.5, root / "vae")
    common = dict(tokenizer=str(root / "tok.json"), vae=str(root / "vae"), image_size=32)
    from data_prep.readers import Columns

    columns = Columns("picture", "caption", "body")
    run_shard_job(
        ShardJob(
            kind="text",
            inputs=[str(root / "inputs/text")],
            out=str(root / "text"),
            columns=columns,
            **common,
        )
    )
    run_shard_job(
        ShardJob(
            kind="image_caption",
            inputs=[str(root / "inputs/images/part-0.tar"), str(root / "inputs/images/part-1.tar")],
            out=str(root / "img"),
            columns=columns,
            **common,
        )
    )
    merge(root / "text")
    merge(root / "img")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    prepare(root)
    return root


def config(root, *extra):
    return load_config(
        "tiny",
        [
            sources_override(root / "text", root / "img"),
            "data.seq_length=128",
            "data.micro_batch_size=2",
            "data.global_batch_tokens=512",
            "model.vocab_size=512",
            "model.max_sequence_length=128",
            *extra,
        ],
    )


def rows_of(batches):
    """Rows as comparable tuples (tokens + latents of their images)."""
    out = []
    for batch in batches:
        for r in range(batch.tokens.shape[0]):
            ids = batch.image_ids[r][batch.image_ids[r] >= 0].unique().tolist()
            out.append(
                (tuple(batch.tokens[r].tolist()), tuple(batch.latents[i].sum().item() for i in ids))
            )
    return out


def test_batches_are_valid_and_deterministic(data_root):
    cfg = config(data_root)
    a, b = MixedModalityLoader(cfg), MixedModalityLoader(cfg)
    for _ in range(3):
        step_a, step_b = a.next_step(), b.next_step()
        assert len(step_a) == 2  # 4 rows per step / micro-batches of 2
        for batch in step_a:
            batch.validate(cfg.model.patches_per_image)
            assert batch.tokens.shape == (2, 128)
        assert rows_of(step_a) == rows_of(step_b)
    other = MixedModalityLoader(config(data_root, "run.seed=99"))
    assert rows_of(other.next_step()) != rows_of(MixedModalityLoader(cfg).next_step())


def test_layout_of_documents(data_root):
    cfg = config(data_root)
    loader = MixedModalityLoader(cfg)
    bos, eos = loader.special.bos, loader.special.eos
    batch = loader.next_step()[0]
    for r in range(batch.tokens.shape[0]):
        tokens, docs, images = batch.tokens[r], batch.document_ids[r], batch.image_ids[r]
        for d in docs[docs >= 0].unique().tolist():
            where = (docs == d).nonzero().flatten()
            # A long text continues over rows: its later windows start a row, all but its
            # last fill one.
            assert tokens[where[0]] == bos or d == 0
            assert tokens[where[-1]] == eos or len(where) == cfg.data.seq_length
            assert batch.positions[r][where].tolist() == list(range(len(where)))
        for i in images[images >= 0].unique().tolist():
            where = (images == i).nonzero().flatten()
            assert (
                tokens[where[0] - 1] == loader.special.boi
                and tokens[where[-1] + 1] == loader.special.eoi
            )
            # Image-first pairs start their document with BOS, BOI.
            if not batch.caption_first[i]:
                assert tokens[where[0] - 2] == bos


def test_token_mix_and_caption_order_over_many_steps():
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = {"text": rng.integers(20, 500, 5000), "image_caption": rng.integers(5, 40, 3000)}
    kinds = {"text": "text", "image_caption": "image_caption"}
    for fraction in (0.5, 0.3):
        weights = {"text": fraction, "image_caption": 1 - fraction}
        sampler = MixtureSampler(lengths, kinds, weights, 1024, 64, 0.8, seed=3)
        tokens = {"text": 0, "image_caption": 0}
        caption_first = []
        for _ in range(2000):
            for example in sampler.next_row():
                tokens[example.stream] += example.length
                if example.stream == "image_caption":
                    caption_first.append(example.caption_first)
        share = tokens["text"] / sum(tokens.values())
        assert abs(share - fraction) < 0.02, share
        assert abs(np.mean(caption_first) - 0.8) < 0.01
        assert len(caption_first) > 10000


def test_three_weighted_sources_hit_their_token_shares_and_small_ones_repeat():
    """Two image sources and one text source at 0.5 / 0.3 / 0.2 over 200 steps of eight
    1,024-token rows: each within 1% of its share, counted as the sampler reports it; the
    small image source runs through several epochs."""
    import numpy as np

    rng = np.random.default_rng(1)
    lengths = {
        "web": rng.integers(20, 900, 4000),
        "laion": rng.integers(5, 60, 50_000),
        "tiny-set": rng.integers(5, 20, 300),
    }
    kinds = {"web": "text", "laion": "image_caption", "tiny-set": "image_caption"}
    weights = {"web": 5.0, "laion": 3.0, "tiny-set": 2.0}  # relative, not normalised
    sampler = MixtureSampler(lengths, kinds, weights, 1024, 64, 0.8, seed=3)
    tokens = dict.fromkeys(lengths, 0)
    for _ in range(200 * 8):
        for example in sampler.next_row():
            tokens[example.stream] += example.length
    total = sum(tokens.values())
    for name, weight in weights.items():
        assert abs(tokens[name] / total - weight / 10) < 0.01, (name, tokens[name] / total)
    progress = sampler.progress()
    assert {name: drawn for name, (drawn, _) in progress.items()} == tokens
    assert progress["tiny-set"][1] >= 3 and progress["laion"][1] == 0


TEXT_ONLY = {"text": "text"}


def test_long_text_continues_over_rows_and_resumes_mid_document():
    """A 100-token text is BOS + 100 + EOS = 102 positions: windows [0, 64) and [63, 102),
    the second starting on the first's last position; a 10-token one fits whole."""
    import numpy as np

    sampler = MixtureSampler(
        {"text": np.array([10, 100])}, TEXT_ONLY, {"text": 1.0}, 64, 16, 0.8, seed=0
    )
    examples = [e for _ in range(6) for e in sampler.next_row()]
    long = [(e.start, e.length) for e in examples if e.index == 1]
    assert long[:2] == [(0, 64), (63, 39)]
    assert all(e.length <= 64 for e in examples)
    assert [(e.start, e.length) for e in examples if e.index == 0][0] == (0, 12)
    sampler = MixtureSampler(
        {"text": np.array([10, 100])}, TEXT_ONLY, {"text": 1.0}, 64, 16, 0.8, seed=0
    )
    while sampler.next_row()[-1].length != 64:  # stop inside the long document
        pass
    state = sampler.state_dict()
    assert state["pending"]["start"] == 63  # the window that continues it
    resumed = MixtureSampler(
        {"text": np.array([10, 100])}, TEXT_ONLY, {"text": 1.0}, 64, 16, 0.8, seed=0
    )
    resumed.load_state_dict(state)
    assert [resumed.next_row() for _ in range(5)] == [sampler.next_row() for _ in range(5)]


def word_tokenizer(path, words):
    """An HF tokenizer.json with one token per whitespace-separated word: exact lengths."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def test_documents_at_the_4096_boundary_train_at_seq_4096(tmp_path):
    """Sharded with the default flags, documents of 4,094, 4,095 and 4,096 tokens train in
    4,096-token rows: BOS + 4,094 + EOS fills one row exactly; the longer two continue into a
    second window (BOS only on the first, EOS only on the last, one position shared), and
    every next-token prediction of every document is trained once."""
    import json

    from data_prep.shard import main

    sizes = (4094, 4095, 4096)
    documents = [[f"d{d}w{i % 97}" for i in range(n)] for d, n in enumerate(sizes)]
    word_tokenizer(tmp_path / "tok.json", sorted({w for doc in documents for w in doc}))
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"text": " ".join(words)}) + "\n" for words in documents]
    (tmp_path / "in" / "docs.jsonl").write_text("".join(lines))
    main(
        [
            "shard",
            "--kind",
            "text",
            "--inputs",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "text"),
            "--tokenizer",
            str(tmp_path / "tok.json"),
        ]
    )
    main(["merge", "--out", str(tmp_path / "text")])
    cfg = load_config(
        "tiny",
        [
            sources_override(tmp_path / "text"),
            "data.seq_length=4096",
            "model.max_sequence_length=4096",
            "data.micro_batch_size=1",
            "data.global_batch_tokens=20480",
        ],
    )
    loader = MixedModalityLoader(cfg)
    batches = loader.next_step()  # 5 rows: the epoch's 5 windows, one row each
    pieces, trained = [], 0
    for batch in batches:
        batch.validate(cfg.model.patches_per_image)
        trained += int(batch.lm_targets()[1].sum())
        row, docs = batch.tokens[0], batch.document_ids[0]
        pieces += [row[docs == d].tolist() for d in docs[docs >= 0].unique().tolist()]
    dataset = PreparedDataset(str(tmp_path / "text"))
    texts = [dataset[d]["tokens"].tolist() for d in range(3)]  # each document has its own words
    assert [len(ids) for ids in texts] == list(sizes)
    owner = {t: d for d, ids in enumerate(texts) for t in ids}
    windows = [[p for p in pieces if owner[p[p[0] == loader.special.bos]] == d] for d in range(3)]
    for ids, mine in zip(texts, windows):
        assert mine[0] + [t for p in mine[1:] for t in p[1:]] == [
            loader.special.bos,
            *ids,
            loader.special.eos,
        ]
        assert [len(p) for p in mine] == ([4096] if len(ids) == 4094 else [4096, len(ids) - 4093])
        assert sum(p.count(loader.special.bos) + p.count(loader.special.eos) for p in mine) == 2
    assert trained == sum(n + 1 for n in sizes)


def test_captions_too_long_for_the_rows_name_both_settings(data_root):
    expected = (
        r"'data.seq_length': 24 cannot hold an image-caption pair .* with --max-caption-tokens 128"
    )
    with pytest.raises(ConfigError, match=expected):
        MixedModalityLoader(config(data_root, "data.seq_length=24", "data.global_batch_tokens=96"))


PRESETS = [
    "tiny",
    "transfusion-0.16b",
    "transfusion-0.37b",
    "transfusion-0.76b",
    "transfusion-1.4b",
    "transfusion-7b",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_what_sharding_writes_by_default_trains_under_every_preset(preset):
    """The longest caption the sharding job keeps by default fits every preset's rows with
    its image; texts of any length are cut to the rows (above)."""
    import dataclasses

    import numpy as np

    from megatron_transfusion.batch import image_caption_length

    cfg = load_config(preset)
    longest = {f.name: f.default for f in dataclasses.fields(ShardJob)}["max_caption_tokens"]
    s, patches = cfg.data.seq_length, cfg.model.patches_per_image
    assert image_caption_length(longest, patches) <= s
    lengths = {"text": np.array([3 * s]), "image_caption": np.array([longest])}
    kinds = {"text": "text", "image_caption": "image_caption"}
    sampler = MixtureSampler(lengths, kinds, dict.fromkeys(kinds, 1.0), s, patches, 0.8, seed=0)
    for _ in range(8):
        assert sum(e.length for e in sampler.next_row()) <= s


def three_sources(root) -> str:
    """Text and two image sources (the same shards under two names) at 0.5 / 0.3 / 0.2."""
    return "data.sources=" + json.dumps(
        [
            {"kind": "text", "path": str(root / "text"), "weight": 0.5},
            {"name": "img-a", "kind": "image_caption", "path": str(root / "img"), "weight": 0.3},
            {"name": "img-b", "kind": "image_caption", "path": str(root / "img"), "weight": 0.2},
        ]
    )


MIXES = pytest.mark.parametrize("three", [False, True], ids=["two-sources", "three-sources"])


@MIXES
def test_exact_resume_mid_epoch(data_root, three):
    cfg = config(data_root, *([three_sources(data_root)] if three else []))
    uninterrupted = MixedModalityLoader(cfg)
    for _ in range(5):
        uninterrupted.next_step()
    state = uninterrupted.state_dict()
    expected = [rows_of(uninterrupted.next_step()) for _ in range(4)]  # crosses epochs
    resumed = MixedModalityLoader(cfg)
    resumed.load_state_dict(state)
    assert [rows_of(resumed.next_step()) for _ in range(4)] == expected


@MIXES
def test_data_parallel_ranks_split_the_global_batch_and_resume_on_another_dp_size(data_root, three):
    cfg = config(data_root, *([three_sources(data_root)] if three else []))
    single = MixedModalityLoader(cfg)
    ranks = [MixedModalityLoader(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = rows_of(single.next_step())
        parts = [rows_of(loader.next_step()) for loader in ranks]
        # Rows are strided over ranks: rank r holds global rows r, r + 2, ...
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    # State saved at DP=2 continues the same sample stream at DP=1 (same global batch) ...
    resumed = MixedModalityLoader(cfg)
    resumed.load_state_dict(ranks[0].state_dict())
    whole = rows_of(single.next_step())
    assert rows_of(resumed.next_step()) == whole
    # ... and state saved at DP=1 at DP=2.
    for loader in ranks:
        loader.load_state_dict(single.state_dict())
    whole = rows_of(single.next_step())
    assert [rows_of(loader.next_step()) for loader in ranks] == [whole[0::2], whole[1::2]]


def test_bad_loader_configs_are_clear(data_root):
    with pytest.raises(ValueError, match="model.vocab_size"):
        MixedModalityLoader(config(data_root, "model.vocab_size=128"))
    with pytest.raises(ValueError, match="model expects"):
        MixedModalityLoader(config(data_root, "model.latent_size=8", "model.patch_size=2"))
    with pytest.raises(ValueError, match="do not split"):
        MixedModalityLoader(config(data_root), dp_rank=0, dp_size=3)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        MixedModalityLoader(config(data_root, f"data.sources.0.path={data_root / 'inputs'}"))
    with pytest.raises(UserError, match=r"holds text data, not image_caption .*sources\[1\]"):
        wrong = [f"data.sources.1.path={data_root / 'text'}", "data.sources.1.name=images"]
        MixedModalityLoader(config(data_root, *wrong))


def test_image_sources_of_two_vaes_are_refused(data_root, tmp_path):
    other = tmp_path / "img-other-vae"
    shutil.copytree(data_root / "img", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["vae"] = {**manifest["vae"], "path": "another-vae", "sha256": "0" * 64}
    (other / "manifest.json").write_text(json.dumps(manifest))
    extra = {"name": "other", "kind": "image_caption", "path": str(other)}
    mix = sources_override(data_root / "text", data_root / "img").replace(
        "]", f", {json.dumps(extra)}]"
    )
    with pytest.raises(UserError, match="data source 'other' has latents of another VAE"):
        MixedModalityLoader(config(data_root, mix))


def test_two_gloo_processes_dp_disjoint_and_tp_replicated(data_root):
    run_torchrun("tests/distributed/loader_worker.py", 2, str(data_root))
