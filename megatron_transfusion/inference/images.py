"""Generated images on disk: the grid that ``mtf-generate`` and ``mtf-evaluate`` write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def image_grid(images: list[np.ndarray], columns: int = 8) -> np.ndarray:
    """Images [H, W, 3] uint8 in one array, row-major, white where a row is short."""
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * h, min(columns, len(images)) * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return grid


def save_grid(images: list[np.ndarray], path: Path, columns: int = 8) -> None:
    """All images in one PNG, for a quick look; none: no file."""
    if images:
        Image.fromarray(image_grid(images, columns)).save(path)
