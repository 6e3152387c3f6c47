"""The built-in exact model as a diffusers epsilon-prediction UNet, so it can run in real
diffusers pipelines (DDPMPipeline, DDIMPipeline) and with diffusers' own schedulers.

For a DDPM timestep t (fractional allowed) with noise level sigma_t of the beta schedule:
x_edm = x_vp sqrt(sigma_t^2 + 1) and eps = (x_edm - D(x_edm; sigma_t)) / sigma_t, where D is
the exact oracle denoiser.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from .samplers import ode_slope
from .oracles import DIGITS_SHAPE, FiniteDataOracle, builtin_gaussian, load_digits
from .schedules import alphas_cumprod_from_betas, alphas_cumprod_to_sigmas, betas_from_config, timestep_to_sigma


class OracleUNet2DModel(ModelMixin, ConfigMixin):
    """The exact denoiser of a built-in dataset ("digits" or "gaussian") behind the
    `UNet2DModel` call signature, predicting epsilon for the configured beta schedule."""

    @register_to_config
    def __init__(
        self,
        dataset: str = "digits",
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int = 1,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ):
        super().__init__()
        if (in_channels, sample_size, sample_size) != DIGITS_SHAPE or out_channels != in_channels:
            raise ValueError(f"the built-in oracles have sample shape {DIGITS_SHAPE}; got in_channels={in_channels}, "
                             f"out_channels={out_channels}, sample_size={sample_size}")
        if dataset == "digits":
            self.oracle = FiniteDataOracle(load_digits()).float()
        elif dataset == "gaussian":
            self.oracle = builtin_gaussian().float()
        else:
            raise ValueError(f"dataset must be 'digits' or 'gaussian', got {dataset!r}")
        betas = betas_from_config(num_train_timesteps, beta_start, beta_end, beta_schedule)
        # kept out of the module's tensors so that `self.dtype` is the oracle's float32
        self._tables = {"train_sigmas": alphas_cumprod_to_sigmas(alphas_cumprod_from_betas(betas))}

    def forward(self, sample: torch.Tensor, timestep: Any, return_dict: bool = True, **unused: Any) -> UNet2DOutput | tuple:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        sigma = timestep_to_sigma(timestep.to(torch.float64), self._tables["train_sigmas"].to(sample.device))
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
        x = sample.double() * torch.sqrt(sigma**2 + 1)
        eps = ode_slope(x, self.oracle(x, sigma.reshape(-1)), sigma).to(sample.dtype)  # eps = (x - D) / sigma
        return UNet2DOutput(sample=eps) if return_dict else (eps,)
