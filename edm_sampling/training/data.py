"""Training data: an image folder, or the built-in scikit-learn digits (no download).

Both give an :class:`ImageDataset`: images as float32 [N, C, H, W] in [-1, 1] and integer
class labels [N] (all zero when there are no classes). Datasets are held in memory, which
suits the small sets this recipe is tested on.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class ImageDataset:
    """Images in [-1, 1], shape [N, C, H, W], and labels [N] (long)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int = 0
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


def load_image_folder(path: str | os.PathLike) -> ImageDataset:
    """Read every PNG / JPEG under ``path``; direct subfolders name the classes.

    Images directly in ``path`` (no subfolders with images) make an unconditional set.
    All images must share one size; greyscale sets stay one channel, anything else is
    converted to RGB. Raises ValueError for a missing or empty folder, an unreadable file
    or mixed sizes, before anything is decoded in full.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"data folder {str(root)!r} has no PNG or JPEG images ({', '.join(IMAGE_EXTENSIONS)})")
    class_names = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if class_names and any(len(p.relative_to(root).parts) == 1 for p in files):
        raise ValueError(f"data folder {str(root)!r} mixes images at top level with class subfolders")

    sizes, modes = {}, set()
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
                modes.add(im.mode)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"data folder {str(root)!r}: cannot read image {str(p)!r}: {error}") from error
    if len(sizes) > 1:
        examples = ", ".join(f"{w}x{h} ({q.name})" for (w, h), q in list(sizes.items())[:3])
        raise ValueError(f"data folder {str(root)!r} has images of mixed sizes: {examples}; resize them to one size")
    (width, height), _ = next(iter(sizes.items()))
    mode = "L" if modes <= {"L", "1", "I;16", "I"} else "RGB"

    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert(mode), dtype=np.float32))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"data folder {str(root)!r}: cannot decode image {str(p)!r}: {error}") from error
    images = torch.from_numpy(np.stack(arrays))
    images = images[:, None] if mode == "L" else images.permute(0, 3, 1, 2)
    images = images / 127.5 - 1.0
    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[p.relative_to(root).parts[0]] if class_names else 0 for p in files], dtype=torch.long)
    return ImageDataset(images.contiguous(), labels, len(class_names), tuple(class_names))


def load_builtin_digits(resolution: int = 16) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled to ``resolution``, in [-1, 1]."""
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    from edm_sampling.oracles import load_digits_with_labels

    images, labels = load_digits_with_labels()
    images = images.float()
    if resolution != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.clamp(-1.0, 1.0).contiguous()
    return ImageDataset(images, labels, 10, tuple(str(i) for i in range(10)))


def load_dataset(data: str | None, resolution: int = 16) -> ImageDataset:
    """``data`` = None or "digits" gives the built-in set; anything else is a folder path."""
    if data is None or data == "digits":
        return load_builtin_digits(resolution)
    return load_image_folder(data)


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_items: int, seed: int, epoch: int, device: torch.device | None = None) -> torch.Tensor:
    """The data order of one epoch: a pure function of (seed, epoch), so resume is exact.

    Cached (and moved to ``device`` once per epoch), so a step costs no host-device copy.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).to(device or "cpu")


def batch_indices(num_items: int, seed: int, step: int, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of global batch number ``step`` (batch_size items, wrapping across epochs)."""
    start = step * batch_size
    out, epoch, offset = [], start // num_items, start % num_items
    need = batch_size
    while need > 0:
        perm = epoch_permutation(num_items, seed, epoch, device)
        take = perm[offset : offset + need]
        out.append(take)
        need -= take.numel()
        epoch, offset = epoch + 1, 0
    return out[0] if len(out) == 1 else torch.cat(out)
