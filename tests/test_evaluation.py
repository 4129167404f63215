"""Evaluation metrics against independent references: CIDEr-D and BLEU-4 against
pycocoevalcap, FID against torch-fidelity's features and scipy's matrix square root,
Inception score against torch-fidelity's, CLIP
score against the model's own similarity logits, and caption match by hand. The weights are
random stand-ins built locally (tests/metric_models.py)."""

import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from megatron_transfusion.config import UserError
from megatron_transfusion.evaluation.captions import bleu4, cider_d, tokenize
from megatron_transfusion.evaluation.images import (
    caption_match,
    clip_score,
    fid,
    inception_score,
)
from tests.metric_models import CLIP_MEAN, CLIP_STD


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


def pixels(images):
    """[-1, 1] -> uint8, written out here rather than through the code under test."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def test_fid_equals_scipy_on_torch_fidelitys_features(fid_weights):
    """Our FID (torchmetrics) against the published recipe written out: torch-fidelity's own
    TF-Inception feature extractor on the same weights (its TF-1 resize to 299 px), then
    ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb) with scipy's matrix square root."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    g = torch.Generator().manual_seed(0)
    generated = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    real = torch.rand(12, 3, 32, 32, generator=g).square() * 2 - 1  # darker on average
    ours = fid(generated, real, fid_weights, batch=5)  # batches need not divide the sets

    network = FeatureExtractorInceptionV3("reference", ["2048"], str(fid_weights))
    with torch.no_grad():
        a, b = (network(pixels(x))[0].double().numpy() for x in (generated, real))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # 12 samples in 2048 dimensions: singular covariances
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = (
        np.square(a.mean(0) - b.mean(0)).sum() + np.trace(cov_a) + np.trace(cov_b)
    ) - 2 * np.trace(root)
    assert expected > 1.0 and ours == pytest.approx(expected, rel=1e-5)


def test_inception_score_equals_torch_fidelitys_on_the_same_splits(fid_weights):
    """torch-fidelity's IS on its own TF-Inception logits, the images split as ours are
    (torch.randperm from seed 0, ten splits of two); ours leaves the global RNG alone."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 3, 32, 32, generator=g) * 2 - 1
    images[:10] = images[:10].square()  # two kinds of image: a score clearly above 1
    rng = torch.get_rng_state()
    ours = inception_score(images, fid_weights, batch=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert inception_score(images, fid_weights, batch=7) == ours  # the same splits again

    network = FeatureExtractorInceptionV3("reference", ["logits_unbiased"], str(fid_weights))
    with torch.no_grad():
        (logits,) = network(pixels(images))
    split = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    expected = isc_features_to_metric(logits[split], splits=10, shuffle=False)
    assert expected[KEY_METRIC_ISC_MEAN] > 1.01
    assert ours == pytest.approx(expected[KEY_METRIC_ISC_MEAN], rel=1e-5)
    other = inception_score(images, fid_weights, seed=1)  # other splits, another score
    assert other != pytest.approx(ours, rel=1e-9)


def test_fid_weights_mistakes_are_one_line_errors(fid_weights, tmp_path, monkeypatch):
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights '.*missing.pth' does not"):
        fid(images, images, tmp_path / "missing.pth")
    # torchvision's ImageNet Inception-v3 is not the TF-FID network (1000 classes, aux head)
    from torchvision.models import inception_v3

    imagenet = tmp_path / "inception_v3_imagenet.pth"
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), imagenet)
    with pytest.raises(UserError, match="is not the TF-Inception FID network"):
        fid(images, images, imagenet)
    # torch-fidelity unpickles the file in full: a file that would run code is refused first
    ran = tmp_path / "ran"
    planted = tmp_path / "planted.pth"
    torch.save({"x": Planted(ran)}, planted)
    with pytest.raises(UserError, match="is not a state dict of tensors.*nothing in it was run"):
        fid(images, images, planted)
    assert not ran.exists()
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # the extra not installed
    with pytest.raises(UserError, match=r"needs the package 'torch_fidelity': pip install "):
        fid(images, images, fid_weights)


class Planted:
    """Unpickling this creates a file: the proof that unpickling ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_clip_score_equals_the_models_similarity(clip_model):
    """torchmetrics' CLIPScore through our code path against the model's own similarity
    logits on inputs prepared by hand (32-px images: the processor's resize and crop are
    the identity, leaving rescale and normalise)."""
    from transformers import CLIPModel, CLIPTokenizer

    g = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    captions = ["red heart", "dog face", "blue", "a green cat", "red"]
    score = clip_score(images, captions, clip_model, batch=2)

    model = CLIPModel.from_pretrained(clip_model).eval()
    tokens = CLIPTokenizer.from_pretrained(clip_model)(captions, padding=True, return_tensors="pt")
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    with torch.no_grad():
        out = model(
            pixel_values=(pixels(images) / 255 - mean) / std,
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
        )
        cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = float(100 * cosine.mean())  # torchmetrics floors the mean at 0, not each image
    assert expected > 0 and score == pytest.approx(expected, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json missing"):
        clip_score(images, captions, clip_model / "vocab.json")


def test_caption_match_counts_pairs_where_the_own_image_is_closer():
    real = torch.stack([torch.full((3, 8, 8), v) for v in (-0.8, 0.0, 0.8)])
    assert caption_match(real, real) == 1.0
    # reversed: only the middle image is still its own nearest, beating both others: 2 of 6 pairs
    assert caption_match(real.flip(0), real) == pytest.approx(2 / 6)
