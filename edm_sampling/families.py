"""Model families: what makes a network of each kind the EDM denoiser D(x; sigma).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))     (EDM, Table 1)

One object per family (discrete VP with epsilon / v / sample output, continuous VP, VE, EDM,
flow matching) knows, without a network:

- its supported noise levels `sigma_min` .. `sigma_max` and `round_sigma`;
- the preconditioning c_skip, c_out, c_in (`coefficients`) and the input scale s(sigma): the
  state a diffusers pipeline holds is s(sigma) x_edm (VP 1/sqrt(sigma^2+1), flow 1/(1+sigma),
  VE 1, EDM c_in), which is c_in for every family here;
- the network's time input c_noise (`net_time`: a DDPM timestep, sigma for the fourier UNet,
  ln(sigma)/4, flow t * 1000, ...) and its output convention (`net_output`);
- its natural time variable t(sigma) / sigma(t) (`time_of_sigma`, `sigma_of_time`): the DDPM
  timestep for discrete VP, the flow t for flow matching, Table 1's VP t otherwise.

`read_scheduler_config` (and `family_from_scheduler_config`) recognise the family of any
diffusers scheduler config: DDPM-family configs, ScoreSdeVe, EDMEuler / EDMDPMSolver,
FlowMatchEuler / FlowMatchHeun, `use_flow_sigmas=True` on DPM / UniPC / DEIS, and
`EDMScheduler`'s own. It is the only place that reads a foreign scheduler config. Torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import torch

from .schedules import (
    VP_BETA_D,
    VP_BETA_MIN,
    alphas_cumprod_from_betas,
    alphas_cumprod_to_sigmas,
    betas_from_config,
    sigma_to_timestep,
    snap_sigma,
    timestep_to_sigma,
    vp_sigma,
    vp_sigma_inv,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_PREDICTION_TYPE = "flow_prediction"
TIMESTEP_MAPPINGS = ("interpolate", "round")
VE_TIME_INPUTS = ("fourier", "positional")
TIME_SHIFT_TYPES = ("exponential", "linear")
MODEL_FAMILIES = ("discrete_vp", "continuous_vp", "ve", "edm", "flow")
LEGACY_FAMILY_NAMES = {"vp": "discrete_vp"}  # EDMScheduler configs saved before the VP split


# --- Table 1, written once ------------------------------------------------------------------------


class Coefficients(NamedTuple):
    """The preconditioning of Table 1: D = c_skip x + c_out F(c_in x; c_noise)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


def check_prediction_type(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES) -> None:
    """Raise a ValueError naming the allowed values for an unknown prediction_type."""
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {allowed}, got {prediction_type!r}")


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


def flow_coefficients(sigma: torch.Tensor) -> Coefficients:
    """Flow matching (rectified flow) in EDM form.

    x_t = (1 - t) y + t n with n ~ N(0, I) and a network predicting the velocity v = n - y. With
    sigma = t / (1 - t), x_t = (1 - t)(y + sigma n) = x_edm / (1 + sigma), so t = sigma / (1 + sigma)
    and the input scale is c_in = 1 - t = 1 / (1 + sigma). The exact denoiser is
    D = x_t - t v = x_edm / (1 + sigma) - sigma / (1 + sigma) v:
    c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma), c_in = 1 / (1 + sigma).

    Pure noise, t = 1 (sigma = inf), where SD3 / Flux start: a state at sigma = inf is held as
    x_edm / sigma = n (`Family.infinite_sigma`), on which the coefficients are the limits of
    (sigma c_skip, c_out, sigma c_in) = (1, -1, 1): D = n - v(n; t = 1), the data mean.
    """
    at_infinity = torch.isinf(sigma)
    c_in = torch.where(at_infinity, torch.ones_like(sigma), 1 / (1 + sigma))
    return Coefficients(c_in, -flow_time(sigma), c_in)


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


def flow_time(sigma: Any) -> Any:
    """The flow time of noise level sigma: t = sigma / (1 + sigma); t = 1 at sigma = inf."""
    if isinstance(sigma, torch.Tensor):
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    return 1.0 if sigma == math.inf else sigma / (1 + sigma)


def flow_sigma(t: Any) -> Any:
    """The noise level of flow time t < 1: sigma = t / (1 - t)."""
    return t / (1 - t)


def undo_fourier_division(output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """diffusers' UNet2DModel(time_embedding_type="fourier") divides its output by its timestep
    (sigma); multiplying back gives the F of Table 1, so that D = x + sigma F = x + sigma^2 output."""
    return output * sigma


def flow_shift_factor(shift: float, use_dynamic_shifting: bool, time_shift_type: str, mu: float | None) -> float:
    """The factor by which a flow model's time shift multiplies sigma.

    diffusers shifts flow times as t' = shift t / (1 + (shift - 1) t); then
    t' / (1 - t') = shift t / (1 - t), i.e. sigma' = shift sigma. Dynamic (resolution-dependent)
    shifting with mu: exponential t' = e^mu / (e^mu + 1/t - 1), so sigma' = e^mu sigma; linear
    t' = mu / (mu + 1/t - 1), so sigma' = mu sigma. A shift is a rescaling of every noise level.
    """
    if not use_dynamic_shifting:
        return float(shift)
    if mu is None:
        raise ValueError("mu must be given to set_timesteps when use_dynamic_shifting=True (the pipeline computes it)")
    factor = math.exp(mu) if time_shift_type == "exponential" else float(mu)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"mu={mu!r} gives a time shift factor {factor!r}; it must be finite and > 0")
    return factor


# --- the families ----------------------------------------------------------------------------------


def _f64(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class Family:
    """The common interface; subclasses give `coefficients` and `net_time`."""

    name = "family"
    sigma_min = 0.0  # supported noise levels (dataclass fields or properties in subclasses)
    sigma_max = math.inf
    infinite_sigma = False
    """True when D can be evaluated at sigma = inf (pure noise): the state there is held as
    x_edm / sigma (the noise itself), and `coefficients`, `input_scale` and `net_time` give
    their limits on it."""

    @property
    def data_std(self) -> float:
        """The std the family's data are scaled to in x_edm units: 1 (VP's and flow matching's
        unit-variance data), EDM's sigma_data. The `adams_alpha` solver's interpolation scale."""
        return 1.0

    @property
    def integer_timesteps(self) -> bool:
        """True when the network's time input is an integer (the iDDPM "round" rule)."""
        return False

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:  # pragma: no cover
        raise NotImplementedError

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def net_output(self, output: Any, sigma: Any) -> Any:
        """F of Table 1 from the network's raw output (identity unless the network rescales it)."""
        return output

    def input_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s(sigma): a pipeline's state is s(sigma) x_edm; the model's own input scale c_in."""
        return self.coefficients(sigma).c_in

    def round_sigma(self, sigma: Any) -> Any:
        """A noise level the model represents exactly (identity unless discrete)."""
        return sigma

    def time_of_sigma(self, sigma: Any) -> torch.Tensor:
        """Table 1's VP time t = sigma_VP^-1(sigma) (beta_d = 19.9, beta_min = 0.1)."""
        return vp_sigma_inv(sigma)

    def sigma_of_time(self, t: Any) -> torch.Tensor:
        """Table 1's VP schedule sigma_VP(t)."""
        return vp_sigma(t)

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """Model data (in [-1, 1]) as images in [0, 1]."""
        return x / 2 + 0.5

    def scheduler_config(self) -> dict[str, Any]:  # pragma: no cover
        """The EDMScheduler config keys that describe this family."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class DiscreteVP(Family):
    """A DDPM / DDIM / Stable Diffusion network trained on discrete timesteps j with
    alphas_cumprod abar_j: sigma_j = sqrt((1 - abar_j)/abar_j); output epsilon, v or the sample.

    The network sees timestep t(sigma): fractional by log-sigma interpolation ("interpolate"), or
    the nearest trained level ("round", the paper's iDDPM rule, with round_sigma snapping every
    sigma to a trained level so the ODE is solved at the levels the model saw).
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    timestep_mapping: str = "interpolate"
    train_sigmas: torch.Tensor = field(init=False, repr=False)
    name = "discrete_vp"

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)
        if self.timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {self.timestep_mapping!r}")
        train_sigmas = alphas_cumprod_to_sigmas(self.alphas_cumprod)
        if not bool((train_sigmas[1:] > train_sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1)")
        object.__setattr__(self, "alphas_cumprod", _f64(self.alphas_cumprod))
        object.__setattr__(self, "train_sigmas", train_sigmas)
        object.__setattr__(self, "_by_device", {})

    @classmethod
    def from_betas(cls, betas: torch.Tensor, **kwargs: Any) -> "DiscreteVP":
        return cls(alphas_cumprod_from_betas(betas), **kwargs)

    @property
    def sigma_min(self) -> float:
        return float(self.train_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.train_sigmas[-1])

    @property
    def integer_timesteps(self) -> bool:
        return self.timestep_mapping == "round"

    @property
    def betas(self) -> torch.Tensor:
        """beta_j = 1 - abar_j / abar_{j-1} (abar_{-1} = 1)."""
        previous = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return 1 - self.alphas_cumprod / previous

    def train_sigmas_on(self, device: torch.device) -> torch.Tensor:
        """The trained levels on `device`, cached (no copy per call)."""
        if device not in self._by_device:
            self._by_device[device] = self.train_sigmas.to(device)
        return self._by_device[device]

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return vp_coefficients(sigma, self.prediction_type)

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_timestep(sigma.to(torch.float64), self.train_sigmas_on(sigma.device), self.timestep_mapping)

    def round_sigma(self, sigma: Any) -> Any:
        if self.timestep_mapping != "round":
            return sigma
        device = sigma.device if isinstance(sigma, torch.Tensor) else torch.device("cpu")
        snapped = snap_sigma(sigma, self.train_sigmas_on(device))
        return snapped.to(sigma.dtype) if isinstance(sigma, torch.Tensor) else snapped

    def time_of_sigma(self, sigma: Any) -> torch.Tensor:
        """The (fractional) DDPM timestep of sigma."""
        return sigma_to_timestep(_f64(sigma), self.train_sigmas, "interpolate")

    def sigma_of_time(self, t: Any) -> torch.Tensor:
        return timestep_to_sigma(_f64(t), self.train_sigmas)

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "model_family": self.name,
            "num_train_timesteps": len(self.train_sigmas),
            "trained_betas": self.betas.tolist(),
            "prediction_type": self.prediction_type,
            "timestep_mapping": self.timestep_mapping,
        }


@dataclass(frozen=True, eq=False)
class ContinuousVP(Family):
    """Song et al.'s continuous VP model: epsilon output, c_noise = (M - 1) sigma_VP^-1(sigma),
    supported on sigma_VP(epsilon_t) .. sigma_VP(1)."""

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN
    num_train_timesteps: int = 1000
    epsilon_t: float = 1e-5
    name = "continuous_vp"

    @property
    def sigma_min(self) -> float:
        return float(vp_sigma(self.epsilon_t, self.beta_d, self.beta_min))

    @property
    def sigma_max(self) -> float:
        return float(vp_sigma(1.0, self.beta_d, self.beta_min))

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return vp_coefficients(sigma, "epsilon")

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return vp_c_noise(sigma, self.num_train_timesteps, self.beta_d, self.beta_min)

    def time_of_sigma(self, sigma: Any) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def sigma_of_time(self, t: Any) -> torch.Tensor:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def scheduler_config(self) -> dict[str, Any]:
        if (self.beta_d, self.beta_min, self.epsilon_t) != (VP_BETA_D, VP_BETA_MIN, 1e-5):
            raise ValueError("EDMScheduler runs continuous VP models with Table 1's beta_d, beta_min and epsilon_t only")
        return {"model_family": self.name, "num_train_timesteps": self.num_train_timesteps, "prediction_type": "epsilon"}


@dataclass(frozen=True, eq=False)
class VE(Family):
    """VE (NCSN++): c_skip = 1, c_out = sigma, c_in = 1, data in [0, 1].

    time_input "fourier": diffusers' `UNet2DModel(time_embedding_type="fourier")` takes sigma
    itself as its timestep and divides its output by it (a score), which `net_output` undoes.
    "positional": Table 1's c_noise = ln(sigma / 2) for a positional-embedding network.
    """

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    time_input: str = "fourier"
    name = "ve"

    def __post_init__(self) -> None:
        if self.time_input not in VE_TIME_INPUTS:
            raise ValueError(f"time_input must be one of {VE_TIME_INPUTS}, got {self.time_input!r}")

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return ve_coefficients(sigma)

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma if self.time_input == "fourier" else ve_c_noise(sigma)

    def net_output(self, output: Any, sigma: Any) -> Any:
        return undo_fourier_division(output, sigma) if self.time_input == "fourier" else output

    def to_unit_range(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def scheduler_config(self) -> dict[str, Any]:
        if self.time_input != "fourier":
            raise ValueError("EDMScheduler runs VE models with diffusers' fourier UNet convention only")
        return {"model_family": self.name}


@dataclass(frozen=True, eq=False)
class EDM(Family):
    """An EDM-preconditioned network: D = c_skip x + c_out F(c_in x; ln(sigma)/4).

    prediction_type "epsilon" is the network F itself; "v_prediction" is a network returning
    -F (the two conventions of diffusers' EDMEulerScheduler).
    """

    sigma_data: float = 0.5
    sigma_min: float = 0.0
    sigma_max: float = math.inf
    prediction_type: str = "epsilon"
    name = "edm"

    def __post_init__(self) -> None:
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data!r}")
        check_prediction_type(self.prediction_type, EDM_PREDICTION_TYPES)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_c_noise(sigma)

    def net_output(self, output: Any, sigma: Any) -> Any:
        return -output if self.prediction_type == "v_prediction" else output

    @property
    def data_std(self) -> float:
        return self.sigma_data

    def scheduler_config(self) -> dict[str, Any]:
        return {"model_family": self.name, "sigma_data": self.sigma_data, "prediction_type": self.prediction_type}


@dataclass(frozen=True, eq=False)
class FlowMatching(Family):
    """A flow-matching (rectified flow) network predicting the velocity v = n - y of
    x_t = (1 - t) y + t n, with time input t * M (SD3, Flux, Sana, AuraFlow); see
    `flow_coefficients` for its EDM form.

    `shift`, `use_dynamic_shifting` and `time_shift_type` are how the model's scheduler shifts
    flow times (`flow_shift_factor`, `sigmas_of_flow_times`): with time-uniform flow times, the
    model's preferred grid. Supported range: every t in (0, 1], i.e. any sigma, and pure noise
    (t = 1, sigma = inf) too.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    name = "flow"
    infinite_sigma = True  # t = 1: see flow_coefficients

    def __post_init__(self) -> None:
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {self.time_shift_type!r}")

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return flow_coefficients(sigma)

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        return flow_time(sigma) * self.num_train_timesteps

    def time_of_sigma(self, sigma: Any) -> torch.Tensor:
        return flow_time(_f64(sigma))

    def sigma_of_time(self, t: Any) -> torch.Tensor:
        return flow_sigma(_f64(t))

    def shift_factor(self, mu: float | None = None) -> float:
        """sigma' = factor * sigma for this model's time shift (static, or dynamic with mu)."""
        return flow_shift_factor(self.shift, self.use_dynamic_shifting, self.time_shift_type, mu)

    def sigmas_of_flow_times(self, times: Any, mu: float | None = None) -> torch.Tensor:
        """Noise levels of flow times as diffusers' flow schedulers take them (before the shift):
        sigma = factor t / (1 - t); t = 1 (pure noise) gives inf."""
        t = _f64(times).flatten()
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"sigmas of a flow-matching model are flow times in [0, 1], got {t.tolist()}")
        return self.shift_factor(mu) * flow_sigma(t)

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "model_family": self.name,
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": FLOW_PREDICTION_TYPE,
            "shift": self.shift,
            "use_dynamic_shifting": self.use_dynamic_shifting,
            "time_shift_type": self.time_shift_type,
        }


# --- reading scheduler configs -----------------------------------------------------------------------

EDM_SCHEDULER = "EDMScheduler"
VE_SOURCES = ("ScoreSdeVeScheduler",)
EDM_SOURCES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SOURCES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# diffusers schedulers of discrete VP (DDPM-family) models: their configs carry the betas
VP_SOURCES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "TCDScheduler",
    "LCMScheduler",
)
_VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
# EDMScheduler's config keys: an in-memory config (no _class_name) holding only these is its own
EDM_SCHEDULER_KEYS = (
    "solver", "sigma_min", "sigma_max", "rho", "s_churn", "s_tmin", "s_tmax", "s_noise", "model_family",
    "timestep_mapping", "sigma_data", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
    "trained_betas", "prediction_type", "shift", "use_dynamic_shifting", "time_shift_type",
    "solver_order", "afs", "schedule", "schedule_file", "final_step",
)
# keys that only diffusers' pipelines read (to compute mu): carried along, never interpreted here
FLOW_PIPELINE_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


@dataclass(frozen=True)
class SchedulerConfigReading:
    """What a scheduler config says: the model `family`, the EDMScheduler keys that describe it
    and its sampling range where the source states one (`scheduler_keys`), the `source` class,
    and which of its public keys were `used` (the rest have no meaning for EDMScheduler)."""

    family: Family
    scheduler_keys: dict[str, Any]
    source: str
    used: frozenset[str]


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def is_own_config(config: Mapping[str, Any]) -> bool:
    """True for an EDMScheduler config: named so, carrying its `model_family` key (a config that
    went through another scheduler and back keeps it as a hidden key), or, in memory (no
    _class_name), holding only its keys."""
    if config.get("_class_name") == EDM_SCHEDULER or "model_family" in config:
        return True
    return config.get("_class_name") is None and set(_public(config)) <= set(EDM_SCHEDULER_KEYS)


def _discrete_vp(config: Mapping[str, Any], source: str) -> DiscreteVP:
    betas = betas_from_config(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_start=config.get("beta_start", 1e-4),
        beta_end=config.get("beta_end", 0.02),
        beta_schedule=config.get("beta_schedule", "linear"),
        trained_betas=config.get("trained_betas"),
    )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} of {source} cannot be mapped: allowed are {PREDICTION_TYPES}")
    return DiscreteVP.from_betas(
        betas, prediction_type=prediction_type, timestep_mapping=config.get("timestep_mapping", "interpolate")
    )


def _own_family(config: Mapping[str, Any]) -> Family:
    """The family an EDMScheduler config describes (VE / EDM / flow ranges are the grid's business)."""
    name = LEGACY_FAMILY_NAMES.get(config.get("model_family", "discrete_vp"), config.get("model_family", "discrete_vp"))
    if name not in MODEL_FAMILIES:
        raise ValueError(f"model_family must be one of {MODEL_FAMILIES}, got {config.get('model_family')!r}")
    prediction_type = config.get("prediction_type", FLOW_PREDICTION_TYPE if name == "flow" else "epsilon")
    if name == "discrete_vp":
        return _discrete_vp(config, EDM_SCHEDULER)
    if name == "continuous_vp":
        check_prediction_type(prediction_type, ("epsilon",))
        return ContinuousVP(num_train_timesteps=config.get("num_train_timesteps", 1000))
    if name == "ve":
        return VE(0.0, math.inf)
    if name == "edm":
        return EDM(config.get("sigma_data", 0.5), prediction_type=prediction_type)
    check_prediction_type(prediction_type, (FLOW_PREDICTION_TYPE,))
    return _flow_family(config, "shift")


def _flow_family(config: Mapping[str, Any], shift_key: str) -> FlowMatching:
    return FlowMatching(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        shift=float(config.get(shift_key, 1.0)),
        use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
        time_shift_type=config.get("time_shift_type", "exponential"),
    )


def _unmappable(key: str, value: Any, source: str, why: str) -> ValueError:
    return ValueError(f"{key}={value!r} of {source} cannot be mapped: {why}")


def _read_flow(config: Mapping[str, Any], source: str) -> SchedulerConfigReading:
    public = _public(config)
    if public.get("invert_sigmas"):
        raise _unmappable("invert_sigmas", True, source, "inverted flow schedules (Mochi) are not supported")
    if public.get("shift_terminal"):
        raise _unmappable("shift_terminal", public["shift_terminal"], source, "a stretched flow schedule is not a shift")
    prediction_type = public.get("prediction_type", FLOW_PREDICTION_TYPE)
    if prediction_type != FLOW_PREDICTION_TYPE:
        raise _unmappable("prediction_type", prediction_type, source, "use_flow_sigmas models predict a velocity")
    shift_key = "flow_shift" if "use_flow_sigmas" in public else "shift"
    family = _flow_family(public, shift_key)
    used = {"num_train_timesteps", shift_key, "use_dynamic_shifting", "time_shift_type", "prediction_type",
            "use_flow_sigmas", "invert_sigmas", "shift_terminal", *FLOW_PIPELINE_KEYS}
    return SchedulerConfigReading(family, family.scheduler_config(), source, frozenset(used & set(public)))


def read_scheduler_config(config: Mapping[str, Any]) -> SchedulerConfigReading:
    """Recognise the model family of a diffusers scheduler config (see the module docstring).

    EDMScheduler's own config describes its family directly. Foreign configs:
    - ScoreSdeVeScheduler -> VE (fourier UNet) on its sigma_min .. sigma_max;
    - EDMEulerScheduler / EDMDPMSolverMultistepScheduler -> EDM with its sigma_data and
      prediction_type; its sigma range and rho are the sampling grid's;
    - FlowMatchEuler / FlowMatchHeun, or `use_flow_sigmas=True` -> flow matching with the
      model's shift (`shift` or `flow_shift`), dynamic shifting and time_shift_type;
    - DDPM-family configs (betas) -> discrete VP with their betas and prediction_type.
    Configs that cannot be mapped raise a ValueError naming the key.
    """
    public = _public(config)
    source = config.get("_class_name") or "the given scheduler"
    if is_own_config(config):
        family = _own_family(config)
        return SchedulerConfigReading(family, dict(public), EDM_SCHEDULER, frozenset(public))
    if source in VE_SOURCES or {"snr", "sampling_eps"} <= set(public):
        lo, hi = float(public.get("sigma_min", 0.01)), float(public.get("sigma_max", 1348.0))
        keys = {"model_family": "ve", "sigma_min": lo, "sigma_max": hi}
        return SchedulerConfigReading(VE(lo, hi), keys, source, frozenset({"sigma_min", "sigma_max"} & set(public)))
    if source in EDM_SOURCES or "sigma_data" in public:
        if public.get("sigma_schedule", "karras") != "karras":
            raise _unmappable("sigma_schedule", public["sigma_schedule"], source, "EDMScheduler uses the rho grid ('karras')")
        if public.get("final_sigmas_type", "zero") != "zero":
            raise _unmappable("final_sigmas_type", public["final_sigmas_type"], source, "EDMScheduler always ends at sigma = 0")
        family = EDM(float(public.get("sigma_data", 0.5)), prediction_type=public.get("prediction_type", "epsilon"))
        grid = {key: float(public[key]) for key in ("sigma_min", "sigma_max", "rho") if public.get(key) is not None}
        used = {"sigma_data", "prediction_type", "sigma_schedule", "final_sigmas_type", *grid}
        return SchedulerConfigReading(family, {**family.scheduler_config(), **grid}, source, frozenset(used & set(public)))
    if source in FLOW_SOURCES or public.get("use_flow_sigmas") or ("shift" in public and "beta_schedule" not in public):
        return _read_flow(config, source)
    if "beta_schedule" not in public and "trained_betas" not in public:
        raise ValueError(
            f"_class_name={source!r}: the config has no betas and is not a known VE, EDM or flow-matching scheduler, "
            f"so it cannot be mapped to a model family {MODEL_FAMILIES}"
        )
    if public.get("rescale_betas_zero_snr"):
        raise _unmappable("rescale_betas_zero_snr", True, source, "its last noise level is infinite, outside the EDM sigma range")
    if public.get("timestep_type", "discrete") != "discrete":
        raise _unmappable("timestep_type", public["timestep_type"], source, "only 'discrete' VP timesteps are supported")
    family = _discrete_vp(public, source)
    keys = {"model_family": family.name, **{key: public[key] for key in _VP_KEYS if key in public}}
    used = {*_VP_KEYS, "rescale_betas_zero_snr", "timestep_type", "use_flow_sigmas"}
    return SchedulerConfigReading(family, keys, source, frozenset(used & set(public)))


def family_from_scheduler_config(config: Mapping[str, Any]) -> Family:
    """The model family of any diffusers scheduler config (see `read_scheduler_config`)."""
    return read_scheduler_config(config).family

