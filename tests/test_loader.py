"""The mixed-modality loader: determinism, mixing, ordering, packing, DP split, resume."""

import pytest
import torch

from data_prep.shard import ShardJob, merge, run_shard_job
from data_prep.tokenizer import train_bpe
from data_prep.vae import ConvVAE, VAEConfig, save_vae
from megatron_transfusion.config import load_config
from megatron_transfusion.data import MixedModalityLoader, MixturePlanner
from tests.conftest import run_torchrun
from tests.data_fixtures import write_inputs


def prepare(root):
    source = write_inputs(root / "inputs", n_images=90, n_docs=30, corrupt=False)
    train_bpe(source["documents"] + source["captions"][:500], 400, root / "tok.json")
    torch.manual_seed(0)
    save_vae(ConvVAE(VAEConfig()), VAEConfig(), 0.5, root / "vae")
    common = dict(tokenizer=str(root / "tok.json"), vae=str(root / "vae"), image_size=32, max_text_tokens=100)
    from data_prep.readers import Columns

    columns = Columns("picture", "caption", "body")
    run_shard_job(ShardJob(kind="text", inputs=[str(root / "inputs/text")], out=str(root / "text"),
                           columns=columns, **common))  # fmt: skip
    run_shard_job(ShardJob(kind="image_caption", inputs=[str(root / "inputs/images/part-0.tar"),
                           str(root / "inputs/images/part-1.tar")], out=str(root / "img"),
                           columns=columns, **common))  # fmt: skip
    merge(root / "text")
    merge(root / "img")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    prepare(root)
    return root


def config(root, *extra):
    return load_config("tiny", [f"data.text_data={root / 'text'}", f"data.image_caption_data={root / 'img'}",
                                "data.seq_length=128", "data.micro_batch_size=2",
                                "data.global_batch_tokens=512", "model.vocab_size=512",
                                "model.max_sequence_length=128", *extra])  # fmt: skip


def rows_of(batches):
    """Rows as comparable tuples (tokens + latents of their images)."""
    out = []
    for batch in batches:
        for r in range(batch.tokens.shape[0]):
            ids = batch.image_ids[r][batch.image_ids[r] >= 0].unique().tolist()
            out.append((tuple(batch.tokens[r].tolist()), tuple(batch.latents[i].sum().item() for i in ids)))
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
    bos, eos = loader.bos, loader.eos
    batch = loader.next_step()[0]
    for r in range(batch.tokens.shape[0]):
        tokens, docs, images = batch.tokens[r], batch.document_ids[r], batch.image_ids[r]
        for d in docs[docs >= 0].unique().tolist():
            where = (docs == d).nonzero().flatten()
            assert tokens[where[0]] == bos and tokens[where[-1]] == eos
            assert batch.positions[r][where].tolist() == list(range(len(where)))
        for i in images[images >= 0].unique().tolist():
            where = (images == i).nonzero().flatten()
            assert tokens[where[0] - 1] == loader.special.boi and tokens[where[-1] + 1] == loader.special.eoi
            # Image-first pairs start their document with BOS, BOI.
            if not batch.caption_first[i]:
                assert tokens[where[0] - 2] == bos


def test_token_mix_and_caption_order_over_many_steps():
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = {"text": rng.integers(20, 500, 5000), "image_caption": rng.integers(5, 40, 3000)}
    for fraction in (0.5, 0.3):
        planner = MixturePlanner(lengths, 1024, 64, fraction, 0.8, seed=3)
        tokens = {"text": 0, "image_caption": 0}
        caption_first = []
        for _ in range(2000):
            for example in planner.next_row():
                tokens[example.stream] += example.length
                if example.stream == "image_caption":
                    caption_first.append(example.caption_first)
        share = tokens["text"] / sum(tokens.values())
        assert abs(share - fraction) < 0.02, share
        assert abs(np.mean(caption_first) - 0.8) < 0.01
        assert len(caption_first) > 10000


def test_sample_too_long_for_the_sequence_is_a_clear_error():
    import numpy as np

    with pytest.raises(ValueError, match="more than data.seq_length=64"):
        MixturePlanner({"text": np.array([10, 100])}, 64, 16, 1.0, 0.8, seed=0)


def test_exact_resume_mid_epoch(data_root):
    cfg = config(data_root)
    uninterrupted = MixedModalityLoader(cfg)
    for _ in range(5):
        uninterrupted.next_step()
    state = uninterrupted.state_dict()
    expected = [rows_of(uninterrupted.next_step()) for _ in range(4)]  # crosses epochs
    resumed = MixedModalityLoader(cfg)
    resumed.load_state_dict(state)
    assert [rows_of(resumed.next_step()) for _ in range(4)] == expected


def test_data_parallel_ranks_split_the_global_batch_and_resume_on_another_dp_size(data_root):
    cfg = config(data_root)
    single = MixedModalityLoader(cfg)
    ranks = [MixedModalityLoader(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = rows_of(single.next_step())
        parts = [rows_of(loader.next_step()) for loader in ranks]
        # Rows are strided over ranks: rank r holds global rows r, r + 2, ...
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    # State saved at DP=2 continues the same sample stream at DP=1 (same global batch).
    resumed = MixedModalityLoader(cfg)
    resumed.load_state_dict(ranks[0].state_dict())
    whole = rows_of(single.next_step())
    assert rows_of(resumed.next_step()) == whole


def test_bad_loader_configs_are_clear(data_root):
    with pytest.raises(ValueError, match="model.vocab_size"):
        MixedModalityLoader(config(data_root, "model.vocab_size=128"))
    with pytest.raises(ValueError, match="model expects"):
        MixedModalityLoader(config(data_root, "model.latent_size=8", "model.patch_size=2"))
    with pytest.raises(ValueError, match="do not split"):
        MixedModalityLoader(config(data_root), dp_rank=0, dp_size=3)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        MixedModalityLoader(config(data_root, f"data.text_data={data_root / 'inputs'}"))


def test_two_gloo_processes_dp_disjoint_and_tp_replicated(data_root):
    run_torchrun("tests/distributed/loader_worker.py", 2, str(data_root))
