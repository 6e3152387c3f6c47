"""Writing image batches as one PNG grid (sample grids of the benchmark and the trainer).

The file is written atomically (`edm_sampling.safety.atomic_write`): an interrupted or failed
write leaves the previous grid as it was.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from edm_sampling.safety import atomic_write


def save_image_grid(
    images: Any,
    path: str | os.PathLike,
    max_images: int | None = 64,
    min_cell: int = 32,
    scale: int | None = None,
    pad_value: float = 1.0,
) -> Path:
    """A square grid PNG of the first `max_images` images ([B, C, H, W] in [-1, 1]).

    C = 1 gives a grey image and C = 3 RGB (other channel counts are cut to 3 or repeated).
    Cells are separated by 1 pixel of `pad_value`. The grid is enlarged by the integer
    `scale` (nearest neighbour), by default the smallest that makes a cell `min_cell` pixels.
    """
    from PIL import Image

    array = np.asarray(images.detach().cpu().float().numpy() if hasattr(images, "detach") else images, dtype=np.float32)
    array = array[:max_images]
    n, c, h, w = array.shape
    if c not in (1, 3):
        array = array[:, :3] if c > 3 else np.repeat(array[:, :1], 3, axis=1)
        c = array.shape[1]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), pad_value, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = array[i].transpose(1, 2, 0)
    pixels = np.clip((grid + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    scale = scale or max(1, int(math.ceil(min_cell / max(h, w))))
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    path = Path(path)
    file_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=file_format))
