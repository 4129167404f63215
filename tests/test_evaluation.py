"""Evaluation metrics against independent references: CIDEr-D and BLEU-4 against
pycocoevalcap, the Fréchet distance against its closed form for diagonal covariances,
CLIP score against the model's own similarity logits, and caption match by hand."""

import random

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from megatron_transfusion.evaluation.captions import bleu4, cider_d, tokenize
from megatron_transfusion.evaluation.images import caption_match, clip_score, fid, frechet_distance


def caption_corpus(seed, n=60):
    rng = random.Random(seed)
    words = [
        "a",
        "red",
        "heart",
        "face",
        "dog",
        "cat",
        "smiling",
        "grinning",
        "with",
        "big",
        "eyes",
        "blue",
        "green",
    ]
    sentence = lambda: " ".join(rng.choices(words, k=rng.randint(1, 7)))  # noqa: E731
    refs = [[sentence() for _ in range(rng.randint(1, 3))] for _ in range(n)]
    hyps = [refs[i][0] if i % 3 == 0 else sentence() for i in range(n)]  # some exact hits
    return hyps, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_caption_metrics_equal_pycocoevalcap(seed):
    hyps, refs = caption_corpus(seed)
    gts, res = dict(enumerate(refs)), {i: [h] for i, h in enumerate(hyps)}
    assert bleu4(hyps, refs) == pytest.approx(
        Bleu(4).compute_score(gts, res, verbose=0)[0][3], rel=1e-12
    )
    assert cider_d(hyps, refs) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    assert bleu4([r[0] for r in refs], [[r[0]] for r in refs]) == pytest.approx(1.0)


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Grinning Face, with big-eyes!") == "grinning face with big eyes"


def test_frechet_distance_matches_the_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 1.0])
    va, vb = torch.cov(a.T).diagonal(), torch.cov(b.T).diagonal()
    # With (near-)diagonal covariances: Σ (μa-μb)² + Σ (√va - √vb)²; off-diagonals are noise.
    expected = (a.mean(0) - b.mean(0)).square().sum() + (va.sqrt() - vb.sqrt()).square().sum()
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_runs_on_local_inception_weights(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True)
    for module in model.modules():  # one train-mode batch sets the BatchNorm statistics,
        if isinstance(module, torch.nn.BatchNorm2d):  # as trained weights would have them
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 299, 299))
    weights = tmp_path / "inception.pt"
    torch.save(model.state_dict(), weights)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    different, same = fid(images, -images, weights), fid(images, images, weights)
    # Six samples give rank-5 covariances in 2048 dimensions: the matrix square root of
    # the singular product leaves ~1e-5 relative error (pytorch-fid sees the same).
    assert different > 0 and abs(same) < 1e-4 * different
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        fid(images, images, tmp_path / "missing.pt")


def test_clip_score_equals_the_models_similarity(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["red", "heart", "dog", "face", "blue"]
    backend = Tokenizer(
        models.WordLevel(
            {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}, unk_token="<unk>"
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>"
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=7,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            eos_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["red heart", "dog face", "blue"]
    score = clip_score(images, captions, tmp_path)

    from megatron_transfusion.evaluation.images import CLIP_MEAN, CLIP_STD, _normalise

    model = CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        text = tokenizer(captions, padding=True, return_tensors="pt")
        out = model(
            pixel_values=_normalise(images, 32, CLIP_MEAN, CLIP_STD),
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
        )
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert score == pytest.approx(float(100 * cosine.clamp(min=0).mean()), rel=1e-5)


def test_caption_match_counts_pairs_where_the_own_image_is_closer():
    real = torch.stack([torch.full((3, 8, 8), v) for v in (-0.8, 0.0, 0.8)])
    assert caption_match(real, real) == 1.0
    # reversed: only the middle image is still its own nearest, beating both others: 2 of 6 pairs
    assert caption_match(real.flip(0), real) == pytest.approx(2 / 6)
