"""Image metrics. Nothing is downloaded: FID and CLIP score take weights from local paths.

- ``caption_match``: how much a generated image resembles the image of its own caption
  rather than other captions' images (pairwise; 0.5 is chance). Needs no weights, so it
  is what small runs report; compare with unconditional samples (guidance 0).
- ``fid``: Fréchet distance of Inception-v3 pool features (torchvision's architecture
  and a state dict given by path; values are comparable between runs of this tool, and
  with published FID only when the weights are the TF-FID ones converted to torchvision).
- ``clip_score``: 100 · mean max(cos(image, caption), 0) with a local Hugging Face CLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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


def _normalise(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    x = F.interpolate(
        (images.float() + 1) / 2, size=(size, size), mode="bilinear", align_corners=False
    )
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def load_inception(path: str | Path) -> torch.nn.Module:
    from torchvision.models import inception_v3

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights '{path}' do not exist (eval.inception_weights)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary pickle
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    model.load_state_dict(state)
    model.fc = torch.nn.Identity()  # 2048-d pool features
    return model.eval()


@torch.no_grad()
def inception_features(
    model: torch.nn.Module, images: torch.Tensor, batch: int = 32
) -> torch.Tensor:
    return torch.cat(
        [
            model(_normalise(images[i : i + batch], 299, IMAGENET_MEAN, IMAGENET_STD))
            for i in range(0, len(images), batch)
        ]
    ).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ over feature rows of a and b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def fid(generated: torch.Tensor, real: torch.Tensor, weights: str | Path) -> float:
    model = load_inception(weights)
    return frechet_distance(inception_features(model, generated), inception_features(model, real))


@torch.no_grad()
def clip_score(images: torch.Tensor, captions: list[str], model_dir: str | Path) -> float:
    from transformers import AutoTokenizer, CLIPModel

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP model '{model_dir}' is not a local Hugging Face directory "
            "(config.json missing; eval.clip_model)"
        )
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pixels = _normalise(images, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD)
    text = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    image_embeds = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
    text_embeds = F.normalize(
        model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]),
        dim=-1,
    )
    return float(100 * (image_embeds * text_embeds).sum(-1).clamp(min=0).mean())
