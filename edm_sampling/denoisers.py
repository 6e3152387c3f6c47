"""Any diffusion model as one denoiser D(x; sigma): a network plus its model family.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

The family (`edm_sampling.families`) holds every formula: c_skip / c_out / c_in, the network's
time input and output convention, the supported range and round_sigma. This module only runs
the network: `PreconditionedDenoiser(net, family)` is D for any family, and the named adapters
(`DiscreteVPDenoiser`, `ContinuousVPDenoiser`, `VEDenoiser`, `EDMDenoiser`, `FlowDenoiser`) build
it from their usual arguments. Networks are any callables `net(x, timestep, **model_kwargs)`
returning a tensor, a tuple whose first item is the tensor, or an object with `.sample`
(diffusers' UNet outputs). Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .families import (  # noqa: F401  (the coefficient functions are part of this module's API)
    EDM,
    EDM_PREDICTION_TYPES,
    PREDICTION_TYPES,
    TIMESTEP_MAPPINGS,
    VE,
    Coefficients,
    ContinuousVP,
    DiscreteVP,
    Family,
    FlowMatching,
    check_prediction_type,
    edm_c_noise,
    edm_coefficients,
    family_from_scheduler_config,
    flow_coefficients,
    undo_fourier_division,
    ve_c_noise,
    ve_coefficients,
    vp_c_noise,
    vp_coefficients,
)
from .schedules import VP_BETA_D, VP_BETA_MIN


def denoised_from_output(x: torch.Tensor, output: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """D = c_skip x + c_out F."""
    return coefficients.c_skip * x + coefficients.c_out * output


def network_output(result: Any) -> torch.Tensor:
    """The tensor a network returned: itself, `.sample`, or the first item of a tuple."""
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)):
        return result[0]
    raise TypeError(f"cannot read a tensor from a network output of type {type(result).__name__}")


def mean_output(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The prediction part of a network output: models with a learned variance (iDDPM / ADM,
    `variance_type="learned_range"`) return twice the input's channels, prediction first."""
    if output.ndim > 1 and x.ndim > 1 and output.shape[1] == 2 * x.shape[1]:
        return output[:, : x.shape[1]]
    return output


def module_dtype(module: Any, default: torch.dtype) -> torch.dtype:
    """The dtype a network computes in: its own `dtype`, else its first floating parameter's."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(module, nn.Module):
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return default


def sigma_column(sigma: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sigma as a [B, 1, ..., 1] tensor on x's device, from a float, 0-d or [B] tensor."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """D(x; sigma), the one interface every sampler uses.

    `sigma_min` / `sigma_max` bound the noise levels the model supports; `round_sigma` maps a
    noise level to one the model can represent exactly (identity unless discrete).
    `infinite_sigma`: D can be called at sigma = inf (pure noise) on x / sigma, the noise itself
    (flow-matching models: D(n; inf) = lim D(sigma n; sigma), the data mean).
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf
    infinite_sigma: bool = False

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class PreconditionedDenoiser(Denoiser):
    """D(x; sigma) of a network of any model family: the family gives the coefficients, the
    network's time input and output convention, the range and round_sigma.

    The network may run in float16 / bfloat16: its input is cast to its dtype, the coefficients
    are computed in at least float32, and D is returned in x's dtype.
    """

    def __init__(self, net: Callable[..., Any] | None, family: Family):
        super().__init__()
        self.net = net
        self.family = family

    @classmethod
    def from_scheduler_config(cls, net: Callable[..., Any], config: Mapping[str, Any]) -> "PreconditionedDenoiser":
        """The denoiser of `net` for the family any diffusers scheduler config describes."""
        return PreconditionedDenoiser(net, family_from_scheduler_config(config))

    @property
    def sigma_min(self) -> float:  # type: ignore[override]
        return self.family.sigma_min

    @property
    def sigma_max(self) -> float:  # type: ignore[override]
        return self.family.sigma_max

    @property
    def infinite_sigma(self) -> bool:  # type: ignore[override]
        return self.family.infinite_sigma

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.family.round_sigma(sigma)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return self.family.coefficients(sigma)

    def net_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.family.net_time(sigma)

    def net_output(self, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F from the network's raw output (the family's convention)."""
        return self.family.net_output(output, sigma)

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = sigma_column(sigma, x, compute_dtype)
        coefficients = self.coefficients(sigma)
        net_dtype = module_dtype(self.net, compute_dtype)
        net_input = (coefficients.c_in * x.to(compute_dtype)).to(net_dtype)
        timestep = self.net_timestep(sigma.reshape(-1))
        if net_dtype in (torch.float16, torch.bfloat16):
            timestep = timestep.float()
        else:
            timestep = timestep.to(net_dtype)
        output = mean_output(network_output(self.net(net_input, timestep, **model_kwargs)), x).to(compute_dtype)
        denoised = denoised_from_output(x.to(compute_dtype), self.net_output(output, sigma), coefficients)
        return denoised.to(x.dtype)


class DiscreteVPDenoiser(PreconditionedDenoiser):
    """A DDPM / DDIM / Stable Diffusion network trained on discrete timesteps with
    `alphas_cumprod` (family `DiscreteVP`: epsilon / v / sample output; timestep_mapping
    "interpolate" or the paper's iDDPM "round")."""

    def __init__(
        self,
        net: Callable[..., Any],
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        timestep_mapping: str = "interpolate",
    ):
        super().__init__(net, DiscreteVP(alphas_cumprod, prediction_type, timestep_mapping))

    @classmethod
    def from_scheduler_config(cls, net: Callable[..., Any], config: Mapping[str, Any], **kwargs: Any) -> "DiscreteVPDenoiser":
        """From any diffusers DDPM-family scheduler config (betas keys and prediction_type);
        `prediction_type` / `timestep_mapping` given here override the config's."""
        family = family_from_scheduler_config(config)
        if not isinstance(family, DiscreteVP):
            raise ValueError(f"the scheduler config describes a {family.name!r} model, not a discrete VP (DDPM-family) one")
        kwargs = {"prediction_type": family.prediction_type, "timestep_mapping": family.timestep_mapping, **kwargs}
        return cls(net, family.alphas_cumprod, **kwargs)

    @property
    def train_sigmas(self) -> torch.Tensor:
        return self.family.train_sigmas

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type

    @property
    def timestep_mapping(self) -> str:
        return self.family.timestep_mapping


class ContinuousVPDenoiser(PreconditionedDenoiser):
    """Song et al.'s continuous VP model (family `ContinuousVP`)."""

    def __init__(
        self,
        net: Callable[..., Any],
        beta_d: float = VP_BETA_D,
        beta_min: float = VP_BETA_MIN,
        num_train_timesteps: int = 1000,
        epsilon_t: float = 1e-5,
    ):
        super().__init__(net, ContinuousVP(beta_d, beta_min, num_train_timesteps, epsilon_t))


class VEDenoiser(PreconditionedDenoiser):
    """A VE model (family `VE`). time_input "fourier" (default): a diffusers NCSN++
    `UNet2DModel(time_embedding_type="fourier")`, which takes sigma as its timestep and returns a
    score: D(x; sigma) = x + sigma^2 output, for data in [0, 1]. "positional": Table 1's
    c_noise = ln(sigma / 2)."""

    def __init__(self, net: Callable[..., Any], sigma_min: float = 0.02, sigma_max: float = 100.0, time_input: str = "fourier"):
        super().__init__(net, VE(sigma_min, sigma_max, time_input))


class EDMDenoiser(PreconditionedDenoiser):
    """An EDM-preconditioned network (family `EDM`): D = c_skip x + c_out F(c_in x; ln(sigma)/4);
    prediction_type "v_prediction" is a network returning -F."""

    def __init__(
        self,
        net: Callable[..., Any],
        sigma_data: float = 0.5,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
        prediction_type: str = "epsilon",
    ):
        super().__init__(net, EDM(sigma_data, sigma_min, sigma_max, prediction_type))

    @property
    def sigma_data(self) -> float:
        return self.family.sigma_data


class FlowDenoiser(PreconditionedDenoiser):
    """A flow-matching network predicting the velocity, called as net(x_t, t * M) (family
    `FlowMatching`): D = x_t - t v with x_t = x / (1 + sigma), t = sigma / (1 + sigma)."""

    def __init__(self, net: Callable[..., Any], num_train_timesteps: int = 1000):
        super().__init__(net, FlowMatching(num_train_timesteps))
