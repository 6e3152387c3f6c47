"""Where the clean images of each micro-batch come from: memory, a streamed source, or a latent cache.

:class:`BatchFeed` answers ``fetch(step, round_)`` with this process's items of that
accumulation round: their indices and (unless the latents are cached) their images on the
training device. The items are `data.micro_batch_indices`, a pure function of
(seed, step, round, process); streamed images are read by a ``DataLoader`` (with workers),
which is restarted from any step, so a resumed run reads exactly what an uninterrupted one
would.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import micro_batch_indices
from .sources import StepBatchSampler, StreamedImages, collate_images


class BatchFeed:
    """This process's micro-batches (see the module docstring).

    ``images``: an in-memory [N, C, H, W] tensor; or ``streamed``: a :class:`StreamedImages`;
    or ``cached`` (latents): only indices are fetched.
    """

    def __init__(self, num_items: int, *, seed: int, batch_size: int, grad_accum: int, processes: int,
                 process_index: int, device: torch.device, images: torch.Tensor | None = None,
                 streamed: StreamedImages | None = None, cached: bool = False, num_workers: int = 0):
        self.num_items = num_items
        self.order = (seed, batch_size, grad_accum, processes, process_index)
        self.device, self.num_workers = device, num_workers
        self.images = images.to(device) if images is not None else None  # small sets: kept on the device
        self.streamed = None if cached else streamed
        self._iterator: Any = None
        self._position: tuple[int, int] | None = None

    def indices(self, step: int, round_: int, device: torch.device | None = None) -> torch.Tensor:
        seed, batch_size, grad_accum, processes, process_index = self.order
        return micro_batch_indices(self.num_items, seed, step, round_, batch_size, grad_accum, processes,
                                   process_index, device)

    def fetch(self, step: int, round_: int) -> dict[str, Any]:
        """{"index": [b] (on the device), "images": [b, C, H, W] or absent, "failed": [names]}."""
        if self.images is not None:
            index = self.indices(step, round_, self.device)
            return {"index": index, "images": self.images[index], "failed": []}
        if self.streamed is None:
            return {"index": self.indices(step, round_, self.device), "failed": []}
        batch = self._next_streamed(step, round_)
        return {"index": batch["index"].to(self.device), "images": batch["images"].to(self.device, non_blocking=True),
                "failed": batch["failed"]}

    def _next_streamed(self, step: int, round_: int) -> dict[str, Any]:
        if self._position != (step, round_):
            self._start(step, round_)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._start(step, round_)
            batch = next(self._iterator)
        grad_accum = self.order[2]
        self._position = (step + 1, 0) if round_ + 1 == grad_accum else (step, round_ + 1)
        return batch

    def _start(self, step: int, round_: int, steps_ahead: int = 100_000) -> None:
        """A DataLoader reading from (step, round_) on, its workers prefetching ahead."""
        seed, batch_size, grad_accum, processes, process_index = self.order
        sampler = StepBatchSampler(self.num_items, seed, batch_size, grad_accum, processes, process_index,
                                   step, step + steps_ahead)
        loader = torch.utils.data.DataLoader(
            self.streamed, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_images,
            pin_memory=self.device.type == "cuda",
        )
        self._iterator = iter(loader)
        for _ in range(round_):
            next(self._iterator)
        self._position = (step, round_)

    def close(self) -> None:
        """Stop the loader's workers."""
        self._iterator, self._position = None, None
