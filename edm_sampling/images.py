"""Image batches as PNG grids (sample grids of the benchmark and the trainer), optionally as
titled panels side by side.

Files are written atomically (`edm_sampling.safety.atomic_write`): an interrupted or failed
write leaves the previous file as it was.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edm_sampling.safety import atomic_write


def image_grid(
    images: Any,
    max_images: int | None = 64,
    min_cell: int = 32,
    scale: int | None = None,
    pad_value: float = 1.0,
) -> np.ndarray:
    """A square grid of the first `max_images` images ([B, C, H, W] in [-1, 1]) as uint8
    [rows, cols, 3] (C = 1 is repeated to grey; other channel counts are cut to 3).

    Cells are separated by 1 pixel of `pad_value`. The grid is enlarged by the integer
    `scale` (nearest neighbour), by default the smallest that makes a cell `min_cell` pixels.
    """
    array = np.asarray(images.detach().cpu().float().numpy() if hasattr(images, "detach") else images, dtype=np.float32)
    array = array[:max_images]
    n, c, h, w = array.shape
    if c != 3:
        array = array[:, :3] if c > 3 else np.repeat(array[:, :1], 3, axis=1)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), pad_value, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = array[i].transpose(1, 2, 0)
    pixels = np.clip((grid + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    scale = scale or max(1, int(math.ceil(min_cell / max(h, w))))
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def _save(image: Any, path: str | os.PathLike) -> Path:
    """A PIL image written atomically, in the format its suffix names (PNG by default; PNGs
    with fast compression: a benchmark writes a hundred grids)."""
    from PIL import Image

    path = Path(path)
    file_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    options = {"compress_level": 1} if file_format == "PNG" else {}
    return atomic_write(path, lambda tmp: image.save(tmp, format=file_format, **options))


def save_image_grid(
    images: Any,
    path: str | os.PathLike,
    max_images: int | None = 64,
    min_cell: int = 32,
    scale: int | None = None,
    pad_value: float = 1.0,
) -> Path:
    """`image_grid` written as an image file (grey when the images have one channel)."""
    from PIL import Image

    pixels = image_grid(images, max_images, min_cell, scale, pad_value)
    grey = (images.shape if hasattr(images, "shape") else np.shape(images))[1] == 1
    return _save(Image.fromarray(pixels[:, :, 0] if grey else pixels), path)


def save_titled_grids(panels: Sequence[tuple[str, Any]], path: str | os.PathLike, title: str = "",
                      max_images: int | None = 64, min_cell: int = 32) -> Path:
    """Grids side by side, each under its own caption, under an optional title (wrapped at
    ", " to the width of the grids): `panels` = [(caption, images [B, C, H, W] in [-1, 1]), ...]."""
    from PIL import Image, ImageDraw, ImageFont

    grids = [image_grid(images, max_images, min_cell) for _, images in panels]
    font = ImageFont.load_default(size=14)
    line, gap = 20, 16
    columns = [max(g.shape[1], math.ceil(font.getlength(caption))) for (caption, _), g in zip(panels, grids)]
    width = sum(columns) + gap * (len(grids) + 1)
    if title:  # wide enough for the title's longest part: small images never clip the text
        width = max(width, max(math.ceil(font.getlength(part)) for part in title.split(", ")) + 2 * gap)
    title_lines = _wrap(title, font, width - 2 * gap) if title else []
    top = line * (len(title_lines) + 1) + 4
    height = top + max(g.shape[0] for g in grids) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title_lines):
        draw.text((gap, 2 + k * line), text, fill="black", font=font)
    x = gap
    for (caption, _), grid, column in zip(panels, grids, columns):
        draw.text((x, top - line), caption, fill="black", font=font)
        canvas.paste(Image.fromarray(grid), (x, top))
        x += column + gap
    return _save(canvas, path)


def _wrap(text: str, font: Any, width: float) -> list[str]:
    """`text` cut at ", " into lines no wider than `width` pixels (a longer part keeps its own line)."""
    lines: list[str] = []
    for part in text.split(", "):
        candidate = f"{lines[-1]}, {part}" if lines else part
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(part)
    return lines
