"""The built-in exact models as a diffusers epsilon-prediction UNet, so they run in real
diffusers pipelines (DDPMPipeline, DDIMPipeline) and with diffusers' own schedulers (and ours,
`EDMScheduler`, through the same plain loop).

For a DDPM timestep t (fractional allowed) with noise level sigma_t of the beta schedule:
x_edm = x_vp sqrt(sigma_t^2 + 1) and eps = (x_edm - D(x_edm; sigma_t)) / sigma_t, where D is
the exact oracle denoiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .oracles import BUILTIN_ORACLES, builtin_oracle
from .samplers import ode_slope
from .schedules import alphas_cumprod_from_betas, alphas_cumprod_to_sigmas, betas_from_config, timestep_to_sigma


COORDINATES = ("pixel", "basis")


@dataclass
class OracleUNetOutput(BaseOutput):
    """The predicted noise, as `UNet2DOutput.sample` (defined here so that importing this
    module does not import diffusers' UNet blocks)."""

    sample: torch.Tensor


class OracleUNet2DModel(ModelMixin, ConfigMixin):
    """The exact denoiser of a built-in dataset ("mixture", "gaussian" or "digits", see
    `oracles.builtin_oracle`) behind the `UNet2DModel` call signature, predicting epsilon for
    the configured beta schedule. `sample_size` / `in_channels` / `out_channels` default to the
    dataset's shape (mixture 3x16x16, gaussian and digits 1x8x8) and must match it if given.
    `coordinates="basis"` (mixture only) serves the mixture in its DCT coordinates
    (`GaussianMixtureOracle.in_basis_coordinates`): samples are DCT coefficients, images are
    `builtin_oracle("mixture").from_basis(samples)`; the benchmark samples there, 3x faster."""

    @register_to_config
    def __init__(
        self,
        dataset: str = "digits",
        sample_size: int | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        coordinates: str = "pixel",
    ):
        super().__init__()
        if dataset not in BUILTIN_ORACLES:
            raise ValueError(f"dataset must be one of {BUILTIN_ORACLES}, got {dataset!r}")
        if coordinates not in COORDINATES or (coordinates == "basis" and dataset != "mixture"):
            raise ValueError(f"coordinates must be one of {COORDINATES} ('basis' for dataset 'mixture' only), got {coordinates!r}")
        oracle = builtin_oracle(dataset)
        if coordinates == "basis":
            oracle = oracle.in_basis_coordinates()
        channels, height, width = oracle.sample_shape
        given = (in_channels, out_channels, sample_size)
        expected = (channels, channels, height)
        if height != width or any(g is not None and g != e for g, e in zip(given, expected)):
            raise ValueError(f"the built-in {dataset!r} has sample shape {(channels, height, width)}; got "
                             f"in_channels={in_channels}, out_channels={out_channels}, sample_size={sample_size}")
        self.register_to_config(sample_size=height, in_channels=channels, out_channels=channels)
        self.oracle = oracle  # float64 throughout: it is the exact model the references are computed with
        betas = betas_from_config(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self._tables = {"train_sigmas": alphas_cumprod_to_sigmas(alphas_cumprod_from_betas(betas))}

    @property
    def dtype(self) -> torch.dtype:
        """float32: what pipelines draw their noise in and what the model returns for float32
        input; the oracle inside computes in float64 (its output has the input's dtype)."""
        return torch.float32

    def forward(self, sample: torch.Tensor, timestep: Any, return_dict: bool = True, **unused: Any) -> OracleUNetOutput | tuple:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        sigma = timestep_to_sigma(timestep.to(torch.float64), self._tables["train_sigmas"].to(sample.device))
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        x = sample.double() * torch.sqrt(sigma**2 + 1)
        eps = ode_slope(x, self.oracle(x, sigma.reshape(-1)), sigma).to(sample.dtype)  # eps = (x - D) / sigma
        return OracleUNetOutput(sample=eps) if return_dict else (eps,)
