"""Exponential moving average of the weights, with the half-life counted in images.

EDM_SPEC.md section 3: half-life h images, ramp-up ratio r (the half-life never exceeds
r x images seen so far). After a step of ``batch`` images the EMA keeps the fraction

    beta = 0.5 ** (batch / max(min(h, r * seen), 1e-8))

of its old value: beta halves the weight of the past every h images.
"""

from __future__ import annotations

import torch


def ema_beta(batch_images: int, halflife_images: float, images_seen: int, rampup_ratio: float | None = 0.05) -> float:
    """The EMA decay for one optimizer step of ``batch_images`` images (see module docstring)."""
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    if halflife_images < 0:
        raise ValueError(f"halflife_images must be >= 0, got {halflife_images}")
    halflife = float(halflife_images)
    if rampup_ratio is not None:
        halflife = min(halflife, images_seen * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, parameter by parameter; buffers are copied."""
    targets = list(ema.parameters())
    sources = [p if p.dtype == t.dtype else p.to(t.dtype) for t, p in zip(targets, model.parameters())]
    torch._foreach_lerp_(targets, sources, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
