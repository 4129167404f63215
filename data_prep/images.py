"""Image decoding and preprocessing: raw bytes -> square RGB uint8 -> model range [-1, 1]."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to an upright RGB image; transparency is composited onto white.

    Raises ValueError for anything Pillow cannot decode, so a sharding job can skip and count it.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)  # phone photos store rotation in EXIF
            image.load()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ...) on corrupt input
        raise ValueError(f"undecodable image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes: lossless, so a drawn image is stored exactly as drawn."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def center_crop_resize(image: Image.Image, size: int) -> np.ndarray:
    """Crop the largest centred square, resize it to ``size`` (bicubic): uint8 [size, size, 3]."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [n, H, W, 3], got {images.dtype} {list(images.shape)}")
    return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


def from_model_range(images: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] (values outside are clipped) -> uint8 [n, H, W, 3]."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
