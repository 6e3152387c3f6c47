"""In-memory training data and the data order.

:class:`ImageDataset` holds images as float32 [N, C, H, W] in [-1, 1] and integer class
labels [N] (all zero when there are no classes): the built-in scikit-learn digits (no
download) or a small image folder read whole. Larger folders and datasets are streamed
(`sources.py`). The order of the data is a pure function of (seed, step) for both.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


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
    """Read every image of a folder into memory at its own size (`sources.FolderSource`:
    direct subfolders name the classes, unreadable files are left out).

    All images must share one size; greyscale sets stay one channel, anything else is
    converted to RGB. Raises ValueError for a missing folder, one without a usable image, or
    mixed sizes, before anything is decoded in full. Training streams folders instead
    (`sources.StreamedImages`); this is for small sets and tests.
    """
    from .sources import StreamedImages, FolderSource, source_mode, source_resolution

    source = FolderSource(path)
    images = StreamedImages(source, source_resolution(source), source_mode(source))
    stacked = torch.stack([images[i]["image"] for i in range(len(images))])
    labels = torch.tensor(source.labels or [0] * len(source), dtype=torch.long)
    return ImageDataset(stacked.contiguous(), labels, len(source.class_names), source.class_names)


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


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_items: int, seed: int, epoch: int, device: torch.device | None = None) -> torch.Tensor:
    """The data order of one epoch: a pure function of (seed, epoch), so resume is exact.

    Cached (and moved to ``device`` once per epoch), so a step costs no host-device copy.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
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


def micro_batch_indices(num_items: int, seed: int, step: int, round_: int, batch_size: int, grad_accum: int,
                        processes: int, process_index: int, device: torch.device | None = None) -> torch.Tensor:
    """The indices process ``process_index`` trains on in accumulation round ``round_`` of
    step ``step``: its slice of that round's share of the global batch (`batch_indices`)."""
    indices = batch_indices(num_items, seed, step, batch_size, device)
    micro = batch_size // (processes * grad_accum)
    chunk = indices[round_ * micro * processes : (round_ + 1) * micro * processes]
    return chunk[process_index * micro : (process_index + 1) * micro]
