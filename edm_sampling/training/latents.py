"""Frozen encoders of a latent text-to-image pipeline: the VAE and the text encoder.

Both stay frozen: eval mode, no gradients, optionally in half precision on a GPU.

- :class:`LatentCodec`: images -> the VAE posterior's moments (mean, std), and moments ->
  training latents z = (mean + std * eps - shift_factor) * scaling_factor with eps drawn
  from the step's generator (what diffusers' training scripts get from
  ``latent_dist.sample() * scaling_factor``, but reproducible), and back for sample grids.
- :class:`LatentCache`: ``--cache-latents``: the moments of every image (and of its mirror
  image when random flips are on) computed once into one .npy file in the run folder,
  memory-mapped while training, rebuilt only when the model, its dtype, the data or the resolution
  change.
- :class:`TextConditioner`: captions -> ``encoder_hidden_states`` with the pipeline's own
  tokenizer and text encoder (padded to the tokenizer's ``model_max_length``, as
  StableDiffusionPipeline encodes prompts).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from edm_sampling.safety import atomic_write, atomic_write_text


def freeze(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``module`` in eval mode with no gradients, on ``device`` (and in ``dtype`` if given)."""
    module = module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


class LatentCodec:
    """The VAE of a latent pipeline (see the module docstring)."""

    def __init__(self, vae: torch.nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        self.vae = freeze(vae, device, dtype)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = int(vae.config.latent_channels)
        self.image_channels = int(vae.config.in_channels)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 2C, h, w] float32: the posterior mean and std of images [B, 3, H, W] in [-1, 1]."""
        posterior = self.vae.encode(images.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
        return torch.cat([posterior.mean, posterior.std], dim=1).float()

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training latents from moments: (mean + std * eps - shift) * scaling, eps from ``generator``."""
        mean, std = moments.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32) from training-scale latents."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(device=self.vae.device, dtype=self.vae.dtype)).sample.float().clamp(-1, 1)


class TextConditioner:
    """Captions -> ``encoder_hidden_states`` with a frozen tokenizer + text encoder."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = freeze(text_encoder, device, dtype)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


CACHE_DIR = "latent_cache"
CACHE_FILES = ("moments.npy", "meta.json")


class LatentCache:
    """Moments of every item, [N, F, 2C, h, w] float32 (F = 2 with flips: plain, mirrored).

    ``key`` identifies what the cache was computed from; a cache with another key is rebuilt.
    Both files are written atomically (the moments first, so a cache is valid only when both
    are complete).
    """

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]):
        self.folder = Path(folder)
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        self.array: Any = None
        self.failed: list[str] = []

    @property
    def path(self) -> Path:
        return self.folder / "moments.npy"

    def valid(self) -> bool:
        meta = self.folder / "meta.json"
        try:
            return self.path.is_file() and json.loads(meta.read_text()).get("key") == self.key
        except (OSError, ValueError, AttributeError):  # missing or garbled: rebuild
            return False

    def build(self, batches: Callable[[], Any], codec: LatentCodec, num_items: int, flip: bool,
              progress: bool = False) -> None:
        """Encode every item: ``batches()`` yields dicts with "images" and "index" (and "failed")."""
        import numpy as np
        from tqdm.auto import tqdm

        state: dict[str, Any] = {"failed": []}

        def encode(tmp: Path) -> None:
            array, start = None, 0
            bar = tqdm(total=num_items, disable=not progress, desc="cache latents")
            for batch in batches():
                images = batch["images"]
                views = [images, images.flip(-1)] if flip else [images]
                moments = torch.stack([codec.moments(v) for v in views], dim=1).cpu().numpy()
                if array is None:
                    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                      shape=(num_items, *moments.shape[1:]))
                array[start : start + len(moments)] = moments
                start += len(moments)
                state["failed"] += batch.get("failed", [])
                bar.update(len(moments))
            bar.close()
            if start != num_items:
                raise RuntimeError(f"latent cache: encoded {start} of {num_items} items")
            array.flush()

        atomic_write(self.path, encode)
        atomic_write_text(self.folder / "meta.json", json.dumps({"key": self.key, "failed": state["failed"]}))

    def open(self) -> None:
        import numpy as np

        self.array = np.load(self.path, mmap_mode="r")
        self.failed = json.loads((self.folder / "meta.json").read_text()).get("failed", [])

    def __len__(self) -> int:
        return 0 if self.array is None else int(self.array.shape[0])

    def moments(self, indices: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """Moments [B, 2C, h, w] of items ``indices``, mirrored where ``flips`` is True."""
        import numpy as np

        rows = torch.from_numpy(np.ascontiguousarray(self.array[indices.cpu().numpy()]))
        view = flips.long().cpu() if flips is not None else torch.zeros(len(indices), dtype=torch.long)
        return rows[torch.arange(len(indices)), view]
