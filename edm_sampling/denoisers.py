"""Any diffusion model as one denoiser D(x; sigma) (EDM paper, Table 1 and appendix B).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

The coefficient functions below are the one place each family's c_skip / c_out / c_in /
c_noise is written; the samplers, the diffusers schedulers and the training losses all call
them. Networks are any callables `net(x, timestep, **model_kwargs)` returning a tensor, a tuple
whose first item is the tensor, or an object with `.sample` (diffusers' UNet outputs).
Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from .schedules import (
    VP_BETA_D,
    VP_BETA_MIN,
    alphas_cumprod_from_betas,
    alphas_cumprod_to_sigmas,
    betas_from_config,
    sigma_to_timestep,
    snap_sigma,
    vp_sigma,
    vp_sigma_inv,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_MAPPINGS = ("interpolate", "round")


class Coefficients(NamedTuple):
    """The preconditioning of Table 1: D = c_skip x + c_out F(c_in x; c_noise)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming the allowed values for an unknown prediction_type."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def vp_coefficients(sigma: torch.Tensor, prediction_type: str = "epsilon") -> Coefficients:
    """A VP (DDPM-family) network in EDM form, with x_vp = x / sqrt(sigma^2 + 1):

    epsilon:      D = x - sigma eps                                 (1, -sigma, 1/sqrt(sigma^2+1))
    v_prediction: D = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v       (1/(sigma^2+1), -sigma/sqrt(sigma^2+1), ...)
    sample:       D = F                                             (0, 1, ...)
    """
    check_prediction_type(prediction_type)
    c_in = torch.rsqrt(sigma**2 + 1)
    if prediction_type == "epsilon":
        return Coefficients(torch.ones_like(sigma), -sigma, c_in)
    if prediction_type == "v_prediction":
        return Coefficients(c_in**2, -sigma * c_in, c_in)
    return Coefficients(torch.zeros_like(sigma), torch.ones_like(sigma), c_in)


def ve_coefficients(sigma: torch.Tensor) -> Coefficients:
    """VE (NCSN++): c_skip = 1, c_out = sigma, c_in = 1."""
    return Coefficients(torch.ones_like(sigma), sigma, torch.ones_like(sigma))


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> Coefficients:
    """EDM: c_skip = sigma_d^2/(sigma^2+sigma_d^2), c_out = sigma sigma_d/sqrt(sigma^2+sigma_d^2),
    c_in = 1/sqrt(sigma^2+sigma_d^2); unit variance for the network's input and target."""
    c_in = torch.rsqrt(sigma**2 + sigma_data**2)
    return Coefficients(sigma_data**2 * c_in**2, sigma * sigma_data * c_in, c_in)


def edm_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's noise conditioning c_noise = ln(sigma) / 4."""
    return torch.log(sigma) / 4


def ve_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """VE's noise conditioning c_noise = ln(sigma / 2) (Table 1)."""
    return torch.log(sigma / 2)


def vp_c_noise(
    sigma: torch.Tensor, num_train_timesteps: int = 1000, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN
) -> torch.Tensor:
    """Continuous VP's noise conditioning c_noise = (M - 1) sigma_VP^-1(sigma)."""
    return ((num_train_timesteps - 1) * vp_sigma_inv(sigma, beta_d, beta_min)).to(sigma.dtype)


def denoised_from_output(x: torch.Tensor, output: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """D = c_skip x + c_out F."""
    return coefficients.c_skip * x + coefficients.c_out * output


def undo_fourier_division(output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """diffusers' UNet2DModel(time_embedding_type="fourier") divides its output by its timestep
    (sigma); multiplying back gives the F of Table 1, so that D = x + sigma F = x + sigma^2 output."""
    return output * sigma


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
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class PreconditionedDenoiser(Denoiser):
    """The Table 1 template around a network: subclasses give `coefficients` and `net_timestep`.

    The network may run in float16 / bfloat16: its input is cast to its dtype, the coefficients
    are computed in at least float32, and D is returned in x's dtype.
    """

    def __init__(self, net: Callable[..., Any] | None):
        super().__init__()
        self.net = net  # None: the adapter serves as its family's maps only (as EDMScheduler uses it)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:  # pragma: no cover
        raise NotImplementedError

    def net_timestep(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def net_output(self, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F from the network's raw output (a hook for networks that rescale their output)."""
        return output

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
    """A DDPM / DDIM / Stable Diffusion network trained on discrete timesteps j with
    alphas_cumprod abar_j: sigma_j = sqrt((1 - abar_j)/abar_j).

    The network sees timestep t(sigma): fractional by log-sigma interpolation ("interpolate"),
    or the nearest trained level ("round", the paper's iDDPM rule, with round_sigma snapping
    every sigma to a trained level so the ODE is solved at the levels the model saw).
    """

    def __init__(
        self,
        net: Callable[..., Any],
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        timestep_mapping: str = "interpolate",
    ):
        super().__init__(net)
        check_prediction_type(prediction_type)
        if timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {timestep_mapping!r}")
        self.prediction_type = prediction_type
        self.timestep_mapping = timestep_mapping
        self.train_sigmas = alphas_cumprod_to_sigmas(alphas_cumprod)
        if not bool((self.train_sigmas[1:] > self.train_sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1)")
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(self.train_sigmas[-1])
        self._train_sigmas_by_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_scheduler_config(cls, net: Callable[..., Any], config: Mapping[str, Any], **kwargs: Any) -> "DiscreteVPDenoiser":
        """From any diffusers DDPM-family scheduler config (betas keys and prediction_type)."""
        betas = betas_from_config(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 1e-4),
            beta_end=config.get("beta_end", 0.02),
            beta_schedule=config.get("beta_schedule", "linear"),
            trained_betas=config.get("trained_betas"),
        )
        kwargs.setdefault("prediction_type", config.get("prediction_type", "epsilon"))
        return cls(net, alphas_cumprod_from_betas(betas), **kwargs)

    def _train_sigmas_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._train_sigmas_by_device:
            self._train_sigmas_by_device[device] = self.train_sigmas.to(device)
        return self._train_sigmas_by_device[device]

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.timestep_mapping == "round":
            device = sigma.device if isinstance(sigma, torch.Tensor) else torch.device("cpu")
            snapped = snap_sigma(sigma, self._train_sigmas_on(device))
            return snapped.to(sigma.dtype) if isinstance(sigma, torch.Tensor) else snapped
        return sigma

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return vp_coefficients(sigma, self.prediction_type)

    def net_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        train_sigmas = self._train_sigmas_on(sigma.device)
        return sigma_to_timestep(sigma.to(torch.float64), train_sigmas, self.timestep_mapping)


class ContinuousVPDenoiser(PreconditionedDenoiser):
    """Song et al.'s continuous VP model: c_noise = (M - 1) sigma_VP^-1(sigma), epsilon output,
    supported on sigma_VP(epsilon_t) .. sigma_VP(1)."""

    def __init__(
        self,
        net: Callable[..., Any],
        beta_d: float = VP_BETA_D,
        beta_min: float = VP_BETA_MIN,
        num_train_timesteps: int = 1000,
        epsilon_t: float = 1e-5,
    ):
        super().__init__(net)
        self.beta_d, self.beta_min, self.num_train_timesteps = beta_d, beta_min, num_train_timesteps
        self.sigma_min = float(vp_sigma(epsilon_t, beta_d, beta_min))
        self.sigma_max = float(vp_sigma(1.0, beta_d, beta_min))

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return vp_coefficients(sigma, "epsilon")

    def net_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return vp_c_noise(sigma, self.num_train_timesteps, self.beta_d, self.beta_min)


class VEDenoiser(PreconditionedDenoiser):
    """A diffusers NCSN++ `UNet2DModel(time_embedding_type="fourier")`: its timestep is sigma
    itself (it takes the log inside) and it divides its output by sigma, so it returns a score:
    D(x; sigma) = x + sigma^2 output, for data in [0, 1]."""

    def __init__(self, net: Callable[..., Any], sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(net)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return ve_coefficients(sigma)

    def net_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def net_output(self, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return undo_fourier_division(output, sigma)


EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


class EDMDenoiser(PreconditionedDenoiser):
    """An EDM-preconditioned network: D = c_skip x + c_out F(c_in x; ln(sigma)/4).

    prediction_type "epsilon" is the network F itself; "v_prediction" is a network returning
    -F (the two conventions of diffusers' EDMEulerScheduler).
    """

    def __init__(
        self,
        net: Callable[..., Any],
        sigma_data: float = 0.5,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
        prediction_type: str = "epsilon",
    ):
        super().__init__(net)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {EDM_PREDICTION_TYPES} for EDM models, got {prediction_type!r}")
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.prediction_type = prediction_type

    def net_output(self, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return -output if self.prediction_type == "v_prediction" else output

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)

    def net_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_c_noise(sigma)
