"""Image metrics. FID, Inception score and CLIP score are torchmetrics' (the ``metrics``
extra), so that they mean what published ones mean; nothing is downloaded: all take weights
from local paths.

- ``caption_match``: how much a generated image resembles the image of its own caption
  rather than other captions' images (pairwise; 0.5 is chance). Ours: it needs no weights, so
  it is what small runs report; compare with unconditional samples (guidance 0).
- ``fid``: torchmetrics' ``FrechetInceptionDistance`` on torch-fidelity's port of the
  TF-Inception network with the TF-FID weights (``pt_inception-2015-12-05-6726825d.pth``),
  images resized to 299 px by the TF-1 bilinear resize that the published FID used.
- ``inception_score``: torchmetrics' ``InceptionScore`` (the mean over 10 random splits of
  exp E KL(p(y|x) ‖ p(y))) on the same network's 1008 logits, as torch-fidelity computes it;
  the splits are drawn from a fixed seed, not the global RNG, so the same images score alike.
- ``clip_score``: torchmetrics' ``CLIPScore`` (100 · mean cosine of CLIP's image and caption
  embeddings, floored at 0) with a local Hugging Face CLIP directory and its own processor.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_transfusion import platform
from megatron_transfusion.config import EvalConfig, UserError

INSTALL_METRICS = "pip install 'megatron_transfusion[metrics]'"
INCEPTION_SCORE_SPLITS = 10  # the published protocol's (of 50,000 images)
INCEPTION_SCORE_MIN_IMAGES = 2 * INCEPTION_SCORE_SPLITS  # one per split scores exactly 1


def caption_match(generated: torch.Tensor, real: torch.Tensor, pooled: int = 8) -> float:
    """Fraction of pairs (i, j ≠ i) where generated image i is closer to real image i than
    to real image j; images [n, 3, H, W] in [-1, 1], compared as ``pooled``² colour maps."""
    a = F.adaptive_avg_pool2d(generated.float(), pooled).flatten(1)
    b = F.adaptive_avg_pool2d(real.float(), pooled).flatten(1)
    distance = torch.cdist(a, b)
    own = distance.diagonal()[:, None]
    n = len(a)
    closer = (own < distance).float().sum() / (n * (n - 1))  # the diagonal never counts
    return float(closer)


def _require(metric: str, *modules: str) -> None:
    """One line saying which extra brings a missing package."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"{metric} needs the package '{e.name}': {INSTALL_METRICS}") from None


def _brief(error: Exception, limit: int = 240) -> str:
    """A library's multi-line message (torch lists every key it missed) as a short clause."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_weights(e: EvalConfig) -> None:
    """Fail on a missing extra or weights path before any image is drawn, not after."""
    if e.inception_weights:
        check_fid_weights(e.inception_weights)
    if e.clip_model:
        check_clip_model(e.clip_model)


def check_fid_weights(path: str | Path) -> Path:
    """``path`` if it is a file of tensors only (torch-fidelity unpickles it in full, so it is
    read with torch's weights-only unpickler first: nothing in it runs)."""
    _require("FID (eval.inception_weights)", "torchmetrics", "torch_fidelity")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.inception_weights '{path}' does not exist: give the local path of the "
            "TF-Inception FID weights, pt_inception-2015-12-05-6726825d.pth"
        )
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(
            f"eval.inception_weights '{path}' is not a state dict of tensors ({_brief(e)}); "
            "nothing in it was run"
        ) from None
    return path


def check_clip_model(model_dir: str | Path) -> Path:
    """``model_dir`` if it holds a Hugging Face CLIP with its processor, loadable offline."""
    _require("CLIP score (eval.clip_model)", "torchmetrics", "transformers")
    model_dir = Path(model_dir)
    needed = ("config.json", "preprocessor_config.json")
    missing = [name for name in needed if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"eval.clip_model '{model_dir}' is not a local Hugging Face CLIP directory "
            f"({', '.join(missing)} missing): download e.g. openai/clip-vit-large-patch14 there"
        )
    return model_dir


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] in [-1, 1] -> uint8 [n, 3, H, W], quantised as the PNGs we write are."""
    from data_prep.images import from_model_range

    return torch.from_numpy(from_model_range(images)).permute(0, 3, 1, 2)


@contextmanager
def _tf_inception(weights: Path):
    """Builds the TF-Inception network from ``weights``: other tensors a one-line error."""
    try:
        yield
    except RuntimeError as e:  # load_state_dict: other tensors than the TF-FID network's
        raise UserError(
            f"eval.inception_weights '{weights}' is not the TF-Inception FID network "
            f"({_brief(e)}); use pt_inception-2015-12-05-6726825d.pth"
        ) from None


def _keeps_global_rng(metric):
    """Building the network (random init before its weights load) and IS's splits draw
    from torch's global RNG: run ``metric`` on a fork, so that evaluating moves no seed."""

    @functools.wraps(metric)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return metric(*args, **kwargs)

    return wrapped


@_keeps_global_rng
@torch.no_grad()
def fid(generated: torch.Tensor, real: torch.Tensor, weights: str | Path, batch: int = 64) -> float:
    """FID between two image sets [n, 3, H, W] in [-1, 1] (n ≥ 2 each)."""
    weights = check_fid_weights(weights)
    from torchmetrics.image.fid import FrechetInceptionDistance

    with _tf_inception(weights):
        metric = FrechetInceptionDistance(
            feature=2048,
            feature_extractor_weights_path=str(weights),
            antialias=False,  # TF-1's resize, as torch-fidelity and the published FID
            sync_on_compute=False,  # tensor-parallel ranks hold the same images
        )
    device = platform.current().device()
    metric = metric.to(device)
    for images, is_real in ((generated, False), (real, True)):
        for start in range(0, len(images), batch):
            metric.update(_pixels(images[start : start + batch]).to(device), real=is_real)
    return float(metric.compute())


@_keeps_global_rng
@torch.no_grad()
def inception_score(
    images: torch.Tensor, weights: str | Path, seed: int = 0, batch: int = 64
) -> float:
    """Inception score of images [n, 3, H, W] in [-1, 1] (n ≥ INCEPTION_SCORE_MIN_IMAGES)."""
    weights = check_fid_weights(weights)
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    with _tf_inception(weights):
        network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["logits_unbiased"],  # what InceptionScore builds by default
            feature_extractor_weights_path=str(weights),
            antialias=False,
        )
    device = platform.current().device()
    with warnings.catch_warnings():  # that it keeps every image's logits: 1008 floats each
        warnings.filterwarnings("ignore", "Metric `InceptionScore` will save all")
        metric = InceptionScore(
            feature=network, splits=INCEPTION_SCORE_SPLITS, sync_on_compute=False
        ).to(device)
    for start in range(0, len(images), batch):
        metric.update(_pixels(images[start : start + batch]).to(device))
    torch.manual_seed(seed)  # compute() splits at random with the global RNG
    mean, _ = metric.compute()
    return float(mean)


@torch.no_grad()
def clip_score(
    images: torch.Tensor, captions: list[str], model_dir: str | Path, batch: int = 64
) -> float:
    """CLIP score of images [n, 3, H, W] in [-1, 1] against their captions."""
    model_dir = check_clip_model(model_dir)
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
        # The slow processor: PIL's bicubic resize, CLIP's own preprocessing.
        processor = CLIPProcessor.from_pretrained(model_dir, local_files_only=True, use_fast=False)
        return model, processor

    device = platform.current().device()
    metric = CLIPScore(model_name_or_path=load, sync_on_compute=False).to(device)
    for start in range(0, len(images), batch):
        pixels = _pixels(images[start : start + batch]).to(device)
        metric.update(list(pixels), captions[start : start + batch])
    return float(metric.compute())
