"""A diffusers UNet as a core denoiser D(x; sigma), ready for training.

The preconditioning itself is the core's: a model family of `edm_sampling.families` (EDM, the
continuous VP and the VE rows of Table 1) inside the core `PreconditionedDenoiser`, so sampling
and training evaluate the same D:

    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)

This module only adapts the UNet to the `net(x, c_noise, **kwargs)` call those classes make
(:class:`UNetNet`):

- class labels go to `UNet2DModel(num_class_embeds=...)` / `UNet2DConditionModel`'s
  `class_labels`; text conditioning goes to `UNet2DConditionModel` as
  `encoder_hidden_states`;
- the augmentation vector (``augment_labels``, EDM_SPEC section 3) goes through a learned
  bias-free linear map added to the UNet's time embedding (a forward hook on
  ``unet.time_embedding`` during the call). Neither diffusers UNet has an input for it;
  since the map has no bias, the zero vector used at sampling adds exactly nothing, so the
  plain UNet (what the export saves) is the sampling-time network;
- a fourier (NCSN++) `UNet2DModel` takes the log of its timestep and divides its output by
  it; it is refused unless ``undo_fourier_division=True``, which feeds it exp(c_noise) (so the
  embedding sees c_noise) and multiplies the output back (core `undo_fourier_division`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edm_sampling.denoisers import PreconditionedDenoiser, VEDenoiser, undo_fourier_division
from edm_sampling.families import EDM, VE, ContinuousVP, Family

# training family names (the loss names): "vp" is Table 1's continuous VP, also "continuous_vp"
FAMILIES = ("edm", "vp", "ve")
_FAMILY_ALIASES = {"continuous_vp": "vp"}


def is_fourier_unet(unet: nn.Module) -> bool:
    """True for a diffusers UNet2DModel(time_embedding_type="fourier"), which divides by its timestep."""
    config = getattr(unet, "config", {})
    return type(unet).__name__ == "UNet2DModel" and config.get("time_embedding_type") == "fourier"


def time_embedding_dim(unet: nn.Module) -> int:
    """Width of the UNet's time embedding (the vector every resnet block is conditioned on)."""
    embedding = getattr(unet, "time_embedding", None)
    linear = getattr(embedding, "linear_2", None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{type(unet).__name__} has no time_embedding.linear_2; augment conditioning needs a diffusers UNet")
    return linear.out_features


class UNetNet(nn.Module):
    """``F(x_in, c_noise, class_labels=..., encoder_hidden_states=..., augment_labels=...)``
    for a diffusers UNet2DModel / UNet2DConditionModel (see module docstring)."""

    def __init__(self, unet: nn.Module, augment_dim: int = 0, undo_fourier: bool = False):
        super().__init__()
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be >= 0, got {augment_dim}")
        self.unet = unet
        self.fourier = is_fourier_unet(unet)
        if self.fourier and not undo_fourier:
            raise ValueError(
                "a fourier (NCSN++) UNet2DModel divides its output by its timestep; pass "
                "undo_fourier_division=True to train it with this preconditioning"
            )
        self.augment_dim = augment_dim
        self.augment_proj = nn.Linear(augment_dim, time_embedding_dim(unet), bias=False) if augment_dim else None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        kwargs = dict(unet_kwargs)
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        if encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        timestep = torch.exp(c_noise) if self.fourier else c_noise
        handle = None
        if augment_labels is not None:
            if self.augment_proj is None:
                raise ValueError("augment_labels given but the denoiser was built with augment_dim=0")
            if augment_labels.shape != (x.shape[0], self.augment_dim):
                raise ValueError(f"augment_labels must have shape [batch, {self.augment_dim}], got {tuple(augment_labels.shape)}")
            extra = self.augment_proj(augment_labels.to(self.augment_proj.weight.dtype))
            handle = self.unet.time_embedding.register_forward_hook(lambda module, args, out: out + extra.to(out.dtype))
        try:
            output = self.unet(x, timestep, return_dict=False, **kwargs)[0]
        finally:
            if handle is not None:
                handle.remove()
        if self.fourier:
            output = undo_fourier_division(output, timestep.reshape(-1, *([1] * (output.ndim - 1))).to(output.dtype))
        return output


class VETrainingDenoiser(VEDenoiser):
    """Table 1's VE row for a positional-embedding network: c_skip = 1, c_out = sigma,
    c_in = 1, c_noise = ln(sigma / 2), on 0.02 .. 100 (family `VE(time_input="positional")`)."""

    def __init__(self, net: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(net, sigma_min, sigma_max, time_input="positional")


def training_family(family: str, sigma_data: float = 0.5) -> Family:
    """The model family a training run preconditions with: "edm", "vp" (continuous VP, also
    spelled "continuous_vp") or "ve" (positional VE)."""
    name = _FAMILY_ALIASES.get(family, family)
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} (or 'continuous_vp'), got {family!r}")
    if name == "edm":
        return EDM(sigma_data)
    if name == "vp":
        return ContinuousVP()
    return VE(0.02, 100.0, time_input="positional")


def precondition(
    unet: nn.Module,
    family: str = "edm",
    *,
    sigma_data: float = 0.5,
    augment_dim: int = 0,
    undo_fourier_division: bool = False,
) -> PreconditionedDenoiser:
    """Wrap a diffusers UNet as the core denoiser of ``family`` ("edm", "vp" = continuous VP, or "ve").

    The result is a core `PreconditionedDenoiser` whose ``net`` is a :class:`UNetNet`; call it
    as ``D(x, sigma, class_labels=..., encoder_hidden_states=..., augment_labels=...)``.
    """
    family_object = training_family(family, sigma_data)
    net = UNetNet(unet, augment_dim=augment_dim, undo_fourier=undo_fourier_division)
    return PreconditionedDenoiser(net, family_object)


def unet_of(denoiser: nn.Module) -> nn.Module:
    """The diffusers UNet inside a denoiser built by :func:`precondition` (unwrapping DDP)."""
    inner = getattr(denoiser, "module", denoiser)
    return inner.net.unet
