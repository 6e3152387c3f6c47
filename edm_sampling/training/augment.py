"""Non-leaky geometric augmentation (EDM_SPEC.md section 3), pure torch.

Each clean image is transformed before noise is added, and the network is told which
transform it saw through a conditioning vector. Sampling uses the zero vector, which is
the identity transform, so the augmented images never leak into the samples.

The conditioning vector has ``AUGMENT_DIM = 9`` numbers, all zero for the identity:

    0 x-flip (0 or 1)            1 y-flip (0 or 1)
    2 sin(k pi/2), 3 cos(k pi/2) - 1   for a rotation by k * 90 degrees
    4, 5 total translation (integer + fractional) in units of the image width / height
    6 log2 isotropic scale       7 log2 anisotropic scale (x stretched, y squeezed)
    8 arbitrary rotation angle / pi, in (-1, 1]

All transforms of one image are composed into a single affine map and applied once with
bilinear resampling and reflection padding; images that drew no transform are returned
bit-for-bit unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9


@dataclass
class GeometricAugment:
    """Apply each geometric augmentation with probability ``p`` times its multiplier.

    The multipliers switch individual transforms off (0) or on (1), as in the paper's
    ablation; parameter spreads follow the usual adaptive-augmentation defaults:
    integer translation up to ``translate_int_max`` of the size, log2 scales with std
    ``scale_std``, a uniform arbitrary rotation, fractional translation with std
    ``translate_frac_std`` of the size.
    """

    p: float = 0.12
    xflip: float = 1.0
    yflip: float = 1.0
    rotate_int: float = 1.0
    translate_int: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    translate_int_max: float = 0.125
    scale_std: float = 0.2
    translate_frac_std: float = 0.125

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augment p must be in [0, 1], got {self.p}")
        for name in ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac"):
            value = getattr(self, name)
            if not 0.0 <= self.p * value <= 1.0:
                raise ValueError(f"augment multiplier {name} times p must be in [0, 1], got {value}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(augmented images, conditioning vectors [B, AUGMENT_DIM])``."""
        return augment_images(images, self, generator)


def _draw(shape: tuple[int, ...], probability: float, generator, device) -> torch.Tensor:
    """Bernoulli(probability) mask as float, drawn from ``generator``."""
    return (torch.rand(shape, generator=generator, device=device) < probability).float()


def augment_parameters(
    batch: int, aug: GeometricAugment, size: tuple[int, int] = (32, 32), generator=None, device=None
) -> torch.Tensor:
    """Draw the conditioning vectors [batch, AUGMENT_DIM] (float32); zero rows mean identity.

    ``size`` = (height, width) snaps the integer translation to whole pixels.

    Every random number is drawn whatever the probabilities, so the generator advances by
    the same amount each call (needed for exact resume).
    """
    p = aug.p

    def rand(*shape):
        return torch.rand((batch, *shape), generator=generator, device=device)

    def randn(*shape):
        return torch.randn((batch, *shape), generator=generator, device=device)

    xflip = _draw((batch,), p * aug.xflip, generator, device) * torch.randint(0, 2, (batch,), generator=generator, device=device)
    yflip = _draw((batch,), p * aug.yflip, generator, device) * torch.randint(0, 2, (batch,), generator=generator, device=device)
    k = _draw((batch,), p * aug.rotate_int, generator, device) * torch.randint(0, 4, (batch,), generator=generator, device=device)
    pixels = torch.tensor([size[1], size[0]], dtype=torch.float32, device=device)
    t_int = _draw((batch, 1), p * aug.translate_int, generator, device) * (rand(2) * 2 - 1) * aug.translate_int_max
    t_int = torch.round(t_int * pixels) / pixels
    log_scale = _draw((batch,), p * aug.scale, generator, device) * randn() * aug.scale_std
    angle = _draw((batch,), p * aug.rotate_frac, generator, device) * (rand() * 2 - 1)
    log_aniso = _draw((batch,), p * aug.aniso, generator, device) * randn() * aug.scale_std
    t_frac = _draw((batch, 1), p * aug.translate_frac, generator, device) * randn(2) * aug.translate_frac_std
    k = k.long()
    sin_k = torch.tensor([0.0, 1.0, 0.0, -1.0], device=device)[k]
    cos_k = torch.tensor([1.0, 0.0, -1.0, 0.0], device=device)[k]
    return torch.stack(
        [
            xflip.float(),
            yflip.float(),
            sin_k,
            cos_k - 1,
            t_int[:, 0] + t_frac[:, 0],
            t_int[:, 1] + t_frac[:, 1],
            log_scale,
            log_aniso,
            angle,
        ],
        dim=1,
    )


def augment_matrices(params: torch.Tensor) -> torch.Tensor:
    """Affine maps [B, 2, 3] in normalised output -> input coordinates for ``affine_grid``.

    The forward transform is x' = T R_theta S_aniso S_iso R_90k Flip x; ``affine_grid``
    needs its inverse, composed here from the inverse of each factor in reverse order.
    """
    b = params.shape[0]
    dtype, device = params.dtype, params.device
    eye = torch.eye(3, dtype=dtype, device=device).expand(b, 3, 3).clone()

    flip = eye.clone()
    flip[:, 0, 0] = 1 - 2 * params[:, 0]
    flip[:, 1, 1] = 1 - 2 * params[:, 1]
    rot90 = eye.clone()
    s, c = params[:, 2], params[:, 3] + 1
    rot90[:, 0, 0], rot90[:, 0, 1], rot90[:, 1, 0], rot90[:, 1, 1] = c, -s, s, c
    scale = eye.clone()
    iso = torch.exp2(params[:, 6])
    aniso = torch.exp2(params[:, 7])
    scale[:, 0, 0] = iso * aniso
    scale[:, 1, 1] = iso / aniso
    rot = eye.clone()
    theta = params[:, 8] * math.pi
    rot[:, 0, 0], rot[:, 0, 1] = torch.cos(theta), -torch.sin(theta)
    rot[:, 1, 0], rot[:, 1, 1] = torch.sin(theta), torch.cos(theta)
    shift = eye.clone()
    shift[:, 0, 2] = 2 * params[:, 4]
    shift[:, 1, 2] = 2 * params[:, 5]
    forward = shift @ rot @ scale @ rot90 @ flip
    return torch.linalg.inv(forward)[:, :2, :]


def augment_images(images: torch.Tensor, aug: GeometricAugment, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch [B, C, H, W]; returns the images and their conditioning vectors."""
    b, _, h, w = images.shape
    params = augment_parameters(b, aug, (h, w), generator=generator, device=images.device)
    return apply_augment(images, params), params


def apply_augment(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply the transforms described by ``params`` [B, AUGMENT_DIM]; zero rows are untouched."""
    if params.shape != (images.shape[0], AUGMENT_DIM):
        raise ValueError(f"params must have shape [batch, {AUGMENT_DIM}], got {tuple(params.shape)}")
    active = params.abs().sum(dim=1) > 0
    if not bool(active.any()):
        return images
    theta = augment_matrices(params[active].double()).to(torch.float32)
    source = images[active].float()
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    out = images.clone()
    out[active] = warped.to(images.dtype)
    return out
