"""Feature extractors for the Frechet distance.

Two are offered; both take images as tensors [B, C, H, W] with values in [-1, 1].

- `InceptionFeatures` (`--inception PATH`): the standard FID features, the 2048-d pool
  activations of Inception-v3 (see `inception.py`) from a weights file the user supplies.
- `PixelFeatures` (the offline default): the image itself, box-averaged down to the largest
  square side s that divides H and for which C * s * s <= max_dim (256 by default), then
  flattened. For the
  built-in 8x8 digits this is the 64 raw pixels; a 3x32x32 image gives 3x8x8 = 192 features.
  The Frechet distance on these features ("FD-pixels") needs no weights and no download; it
  ranks samplers on small images well but is not comparable with published FID numbers.
"""

from __future__ import annotations

import math

import torch


class PixelFeatures:
    """Box-averaged raw pixels: a weight-free, deterministic feature map (documented above)."""

    def __init__(self, max_dim: int = 256) -> None:
        if max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {max_dim}")
        self.max_dim = max_dim

    def side(self, channels: int, height: int) -> int:
        """The pooled side s: the largest divisor of H with C * s^2 <= max_dim (at least 1)."""
        limit = min(height, int(math.isqrt(self.max_dim // max(channels, 1))))
        return next((s for s in range(limit, 0, -1) if height % s == 0), 1)

    def describe(self, shape: tuple[int, ...]) -> dict:
        c, h = shape[-3], shape[-2]
        s = self.side(c, h)
        return {"features": "pixels", "pooled_shape": [c, s, s], "dim": c * s * s}

    @property
    def name(self) -> str:
        return f"FD-pixels(max_dim={self.max_dim})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().to(torch.float64)
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        s = self.side(images.shape[1], images.shape[2])
        if (s, s) != tuple(images.shape[2:]):
            images = torch.nn.functional.adaptive_avg_pool2d(images, (s, s))
        return images.reshape(images.shape[0], -1).cpu()


class InceptionFeatures:
    """FID features: Inception-v3 2048-d pool activations from a local state-dict file."""

    def __init__(self, path, device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        from .inception import load_fid_inception
        from .metrics import files_fingerprint

        self.path = str(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = load_fid_inception(path, device=self.device)
        self.fingerprint = files_fingerprint([path])

    def describe(self, shape: tuple[int, ...]) -> dict:
        """The features, and the weights file by path and by (size, modification time): the
        cached reference statistics of other weights at the same path are not reused."""
        return {"features": "inception-v3-pool3", "weights": self.path, "weights_file": self.fingerprint, "dim": 2048}

    @property
    def name(self) -> str:
        return "FID(inception-v3)"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device, torch.float32)
            batch = ((batch + 1) / 2).clamp(0, 1)
            out.append(self.model(batch).to(torch.float64).cpu())
        return torch.cat(out)
