"""EDM sampling (Karras et al. 2022, Algorithms 1 and 2) as a drop-in diffusers scheduler.

    pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config)

turns any diffusers pipeline into an EDM Heun (or Euler) sampler with optional churn, for every
model family: DDPM-family (discrete VP), continuous VP, VE, EDM-trained and flow-matching (SD3,
Flux) models. Which family a config describes, and every formula of it, is the family object's
(`families`); the step math is the core's (`samplers`, `schedules`); this module only maps the
pipeline protocol onto them:

- the ODE is solved in sigma space (sigma(t) = t, s(t) = 1) on x_edm;
- the state handed back to the pipeline is in the model's own input scale, s(sigma) x_edm =
  c_in(sigma) x_edm: VP x_edm / sqrt(sigma^2 + 1), EDM x_edm / sqrt(sigma^2 + sigma_data^2),
  flow x_edm / (1 + sigma) = x_t, VE x_edm itself. So `scale_model_input` is the identity,
  and VP, EDM and flow models start from noise of std ~1 and work in pipelines that never
  scale (DDPM, DDIM, SD3, Flux); after the last call the state is the sample, in data space;
- `timesteps` are what the network receives at each model call (`family.net_time`: discrete VP
  the fractional or nearest train timestep, VE fourier UNet sigma, EDM ln(sigma)/4, flow t * M);
- the grid: EDM's rho grid on sigma_min .. sigma_max clamped to the model's range; flow models
  use their own shifted time-uniform grid (measured better there, benchmarks/flow_grids.py);
  flow times a pipeline passes are shifted as diffusers' flow schedulers shift them;
- Heun: one `step` after every model call, 2N - 1 calls for N steps, counted by a step index
  (timesteps may repeat); the last step, to sigma = 0, is Euler;
- churn: gamma_i is known at `set_timesteps`, the model is called at sigma_hat_i, the churn
  noise of step i + 1 is added at the end of step i, and step 0's churn is folded into the
  start noise (`init_noise_sigma`);
- speed: each call's update is linear in the state and the network output, so `set_timesteps`
  reads its coefficients off the core's rules (denoised_from_output, ode_slope, euler_step,
  heun_step) applied to unit inputs, and `step` is two to four fused multiply-adds on tensors,
  with every constant a Python float (no host-device sync, state in float32 or wider; the
  one exception is the first call's timestep lookup when no begin index is set).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils import is_torchsde_available

from .denoisers import denoised_from_output, mean_output
from .families import (
    EDM_SCHEDULER,
    EDM_SOURCES,
    FLOW_PREDICTION_TYPE,
    FLOW_SOURCES,
    LEGACY_FAMILY_NAMES,
    MODEL_FAMILIES,
    TIME_SHIFT_TYPES,
    TIMESTEP_MAPPINGS,
    VE_SOURCES,
    VP_SOURCES,
    Coefficients,
    DiscreteVP,
    Family,
    FlowMatching,
    family_from_scheduler_config,
    flow_sigma,
    flow_time,
    read_scheduler_config,
)
from .samplers import (
    SOLVERS,
    check_churn,
    check_sigmas,
    check_sigmas_in_range,
    churn_noise_std,
    churned_grid,
    euler_step,
    heun_step,
    initial_noise_std,
    ode_slope,
    randn,
)
from .schedules import check_num_steps, clamp_sigma_range, karras_sigmas

_PREDICTOR, _CORRECTOR, _EULER = 0, 1, 2
_STATE_DTYPES = (torch.float32, torch.float64)
# config keys that describe the model: always stored explicitly, so that another scheduler made
# from this config (`X.from_config(edm.config)`) sees the model's values, not its own defaults
_MODEL_KEYS = ("model_family", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type")


@dataclass(frozen=True)
class _Call:
    """Everything one `step` needs, as Python floats (no host-device sync in `step`).

    The update of one call is linear in its tensors: x (the pipeline's state) and F (the
    network's output), plus for Heun's corrector the predictor's share of the result. The
    coefficients are found once, in `set_timesteps`, by running the core's step rules on unit
    inputs (`_linear_coefficients`); `step` applies them as fused multiply-adds.
    """

    kind: int  # _PREDICTOR (Heun's first call), _CORRECTOR (its second) or _EULER
    step: int  # i, the sampler step this call belongs to
    sigma: float  # noise level the model is called at (sigma_hat_i, or sigma_{i+1} for the corrector)
    level: float  # the grid level before churn (sigma_i for first calls, sigma_{i+1} for correctors)
    sigma_from: float  # sigma_hat_i, the start of step i
    sigma_next: float  # sigma_{i+1}, the end of step i
    coefficients: Coefficients  # c_skip, c_out, c_in at `sigma`
    state_scale: float  # the pipeline's state at this call is x_edm * state_scale
    churn_std: float  # std (in x_edm units) of the churn noise added after this call; 0: none
    denoised: tuple[float, ...] = ()  # D = a x + b F
    update: tuple[float, ...] = ()  # predictor / Euler: next state = a x + b F; corrector: += a x + b F
    partial: tuple[float, ...] = ()  # predictor: its share of the corrector's result, a x + b F
    noise_scale: float = 0.0  # churn_std in the next call's state scale


def _linear_coefficients(fn: Callable[..., float], num_inputs: int) -> tuple[float, ...]:
    """Coefficients of a linear map of `num_inputs` scalars, read off unit inputs."""
    return tuple(float(fn(*[1.0 if j == k else 0.0 for j in range(num_inputs)])) for k in range(num_inputs))


def _combine(coefficients: Sequence[float], tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_k coefficients[k] tensors[k] in `dtype`, as one multiply then fused in-place adds."""
    result = None
    for coefficient, tensor in zip(coefficients, tensors):
        if coefficient == 0.0:
            continue
        if result is None:
            result = torch.mul(tensor, coefficient) if tensor.dtype == dtype else tensor.to(dtype).mul_(coefficient)
        else:
            result.add_(tensor, alpha=coefficient)
    return result if result is not None else torch.zeros_like(tensors[0], dtype=dtype)


def _as_grid(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A 1-D float64 CPU tensor of noise levels or timesteps."""
    return torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()


def _source_defaults(source: str) -> dict[str, Any] | None:
    """The __init__ defaults of diffusers scheduler class `source`, or None if unknown."""
    import diffusers

    cls = getattr(diffusers, source, None) if source.isidentifier() else None
    if not isinstance(cls, type):
        return None
    parameters = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _ignored_settings(config: Mapping[str, Any], reading: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What from_config ignores and a user may expect to act: keyword arguments EDMScheduler does
    not accept, and settings of a foreign scheduler it does not use whose value is not that
    scheduler's default (or is unknown to it), other than False / None ("off")."""
    own = set(EDMScheduler._get_init_keys(EDMScheduler)) - {"self"}
    ignored = {key: value for key, value in kwargs.items() if key not in own}
    if reading.source == EDM_SCHEDULER:
        return ignored
    defaults = _source_defaults(reading.source) or {}
    skipped = set(reading.used) | set(reading.scheduler_keys) | set(config.get("_use_default_values", []))
    for key, value in config.items():
        if key.startswith("_") or key in skipped or value is None or value is False:
            continue
        if key not in defaults or _differs(value, defaults[key]):
            ignored[key] = value
    return ignored


def _differs(value: Any, default: Any) -> bool:
    try:
        return bool(value != default)
    except (TypeError, ValueError, RuntimeError):  # arrays and tensors
        return True


class EDMScheduler(SchedulerMixin, ConfigMixin):
    """The EDM sampler (Heun or Euler, optional churn) for every model family.

    Args:
        solver: "heun" (2N - 1 model calls, `order` = 2) or "euler" (N calls).
        sigma_min, sigma_max, rho: the sampling grid (EDM eq. 5), clamped to the model's range
            (discrete VP: the noise levels of its alphas_cumprod). Flow models sample on their
            own shifted time-uniform grid, clamped to sigma_min .. sigma_max (rho unused).
        s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's churn; s_tmax None means infinity.
        model_family: "discrete_vp" (DDPM-family nets on discrete timesteps; "vp" is read as
            this), "continuous_vp" (Song et al.'s VP, timestep (M - 1) t), "ve" (NCSN++ fourier
            UNet2DModel: timestep = sigma, output a score), "edm" (EDM-preconditioned net,
            timestep = ln(sigma)/4) or "flow" (flow matching, velocity output, timestep t * M).
        timestep_mapping: discrete VP only; "interpolate" (fractional timesteps) or "round"
            (nearest trained level, the grid snapped to trained levels: the paper's iDDPM rule).
        sigma_data: EDM preconditioning's data std.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        prediction_type: the VP model's training schedule and output, DDPMScheduler's defaults
            (flow models: prediction_type "flow_prediction", set when left at its default).
        shift, use_dynamic_shifting, time_shift_type: a flow model's time shift, as in
            FlowMatchEulerDiscreteScheduler.
    """

    # every scheduler whose config `from_config` reads; diffusers stands in a placeholder for
    # DPMSolverSDEScheduler without torchsde, which cannot be built, so it is listed only with it
    _compatibles = [
        name for name in (*VP_SOURCES, *VE_SOURCES, *EDM_SOURCES, *FLOW_SOURCES)
        if name != "DPMSolverSDEScheduler" or is_torchsde_available()
    ]

    @register_to_config
    def __init__(
        self,
        solver: str = "heun",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float | None = None,
        s_noise: float = 1.0,
        model_family: str = "discrete_vp",
        timestep_mapping: str = "interpolate",
        sigma_data: float = 0.5,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        model_family = LEGACY_FAMILY_NAMES.get(model_family, model_family)
        if model_family not in MODEL_FAMILIES:
            raise ValueError(f"model_family must be one of {MODEL_FAMILIES}, got {self.config.model_family!r}")
        if timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {timestep_mapping!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        check_churn(s_churn, s_tmin, self._s_tmax, s_noise)
        self._normalize_config(model_family)

        self._family = family_from_scheduler_config(self.config)
        if isinstance(self._family, DiscreteVP):  # what pipelines and user code read off a DDPM-family scheduler
            self.betas = self._family.betas.float()
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = self._family.alphas_cumprod.float()
        self.train_sigmas: torch.Tensor | None = getattr(self._family, "train_sigmas", None)
        self.sigma_range = self._sampling_range()

        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._calls: list[_Call] = []
        hi = self.sigma_range[1]
        self._init_noise_sigma = float(self._family.input_scale(torch.tensor(hi, dtype=torch.float64))) * hi
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._warned_eta = False
        self._reset_state()
        _warn_when_ddim_pipeline_replaces_us()

    def _normalize_config(self, model_family: str) -> None:
        """The config as it will be saved: the family's current name ("vp" -> "discrete_vp"), a
        flow model's prediction_type "flow_prediction", and the model keys never listed as
        defaults (see `_MODEL_KEYS`)."""
        config = dict(self.config)
        defaults = list(config.get("_use_default_values", []))
        updates: dict[str, Any] = {}
        if model_family != config["model_family"]:
            updates["model_family"] = model_family
        if model_family == "flow" and config["prediction_type"] != FLOW_PREDICTION_TYPE:
            if "prediction_type" not in defaults:
                raise ValueError(f"prediction_type must be {FLOW_PREDICTION_TYPE!r} for model_family='flow', got {config['prediction_type']!r}")
            updates["prediction_type"] = FLOW_PREDICTION_TYPE
        if defaults:
            updates["_use_default_values"] = sorted(key for key in defaults if key not in _MODEL_KEYS)
        if updates:
            self._internal_dict = FrozenDict({**config, **updates})

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' from_config, after reading the model family of any scheduler config
        (`families.read_scheduler_config`: DDPM family, ScoreSdeVe, EDMEuler, flow matching, ours).

        Foreign settings that EDMScheduler does not use stay in its config (so a pipeline can
        still read them and a swap back restores them); a warning names those that were changed
        from their scheduler's default, and any keyword argument EDMScheduler does not accept.
        """
        if isinstance(config, Mapping):
            reading = read_scheduler_config(config)
            ignored = _ignored_settings(config, reading, kwargs)
            if reading.source != EDM_SCHEDULER:
                own = set(cls._get_init_keys(cls))
                config = {
                    **{k: v for k, v in config.items() if k not in own and k != "_use_default_values"},
                    **reading.scheduler_keys,
                }
            if ignored:
                warnings.warn(
                    f"EDMScheduler.from_config ignores {ignored}: EDMScheduler samples with its own solver, grid "
                    "and churn (its own keys are listed in EDMScheduler's docstring)",
                    UserWarning,
                    stacklevel=2,
                )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --- properties of the diffusers protocol ---------------------------------------------------

    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    @property
    def init_noise_sigma(self) -> float:
        """Std of the pipeline's start noise: initial_noise_std(sigma_0, sigma_hat_0) in the state's scale."""
        return self._init_noise_sigma

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def family(self) -> Family:
        """The model family (network-free): coefficients, time input, range."""
        return self._family

    @property
    def _s_tmax(self) -> float:
        return math.inf if self.config.s_tmax is None else float(self.config.s_tmax)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- family-specific maps ------------------------------------------------------------------------

    def _sampling_range(self) -> tuple[float, float]:
        """The grid's range: config sigma_min .. sigma_max clamped to the family's range (VE and
        EDM configs do not state the model's range)."""
        return clamp_sigma_range(self.config.sigma_min, self.config.sigma_max, self._family.sigma_min, self._family.sigma_max)

    def _flow_times(self, num_steps: int, mu: float | None) -> torch.Tensor:
        """A flow model's default grid in flow times before the shift: Flux's time-uniform
        linspace(1, 1/N, N) scaled into [0, t_top], t_top the time whose shifted level is
        sigma_max, so that pure noise (t = 1, sigma = inf) becomes sigma_max and N steps stay N."""
        t_top = float(flow_time(torch.tensor(self.sigma_range[1] / self._family.shift_factor(mu), dtype=torch.float64)))
        return t_top * torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)

    def _flow_grid(self, times: Sequence[float] | torch.Tensor, mu: float | None) -> torch.Tensor:
        """A flow model's grid from flow times: shifted as the model's scheduler shifts them
        (`FlowMatching.sigmas_of_flow_times`), each level clamped to `sigma_range` (t = 1, pure
        noise, becomes sigma_max) and levels that the clamp makes equal merged."""
        sigmas = self._family.sigmas_of_flow_times(times, mu)
        positive = sigmas[sigmas > 0].clamp(*self.sigma_range)
        return torch.cat([torch.unique_consecutive(positive), sigmas[sigmas <= 0]])

    def _coefficients(self, sigmas: Sequence[float]) -> list[Coefficients]:
        c = self._family.coefficients(torch.tensor(list(sigmas), dtype=torch.float64))
        return [Coefficients(*values) for values in zip(c.c_skip.tolist(), c.c_out.tolist(), c.c_in.tolist())]

    def _network_timesteps(self, sigmas: Sequence[float]) -> torch.Tensor:
        t = self._family.net_time(torch.tensor(list(sigmas), dtype=torch.float64))
        return t.long() if self._family.integer_timesteps else t.float()

    def _slope(self, call: _Call, x_state: Any, output: Any) -> Any:
        """dx/dsigma at `call` from the pipeline's state and the network output (core rules)."""
        x = x_state / call.state_scale
        denoised = denoised_from_output(x, self._family.net_output(output, call.sigma), call.coefficients)
        return ode_slope(x, denoised, call.sigma)

    def _with_update(self, calls: list[_Call], k: int) -> _Call:
        """Call k with the coefficients of its update, from the core's rules on unit inputs.

        Predictor: x_mid = euler_step to sigma_{i+1}; its share of the corrector's result is
        heun_step with the second slope set to 0 (heun_step is linear in each slope). Corrector:
        heun_step with x and the first slope set to 0. Euler: euler_step. Each result is put in
        the state scale of the call that receives it (1 after the last call: data space)."""
        call = calls[k]

        def scale_of(index: int) -> float:
            return calls[index].state_scale if index < len(calls) else 1.0

        def denoised(x: float, out: float) -> float:
            return denoised_from_output(x / call.state_scale, self._family.net_output(out, call.sigma), call.coefficients)

        def euler(x: float, out: float) -> float:
            return scale_of(k + 1) * euler_step(x / call.state_scale, self._slope(call, x, out), call.sigma, call.sigma_next)

        def heun_first(x: float, out: float) -> float:
            slope = self._slope(call, x, out)
            return scale_of(k + 2) * heun_step(x / call.state_scale, slope, 0.0, call.sigma_from, call.sigma_next)

        def heun_second(x: float, out: float) -> float:
            return scale_of(k + 1) * heun_step(0.0, 0.0, self._slope(call, x, out), call.sigma_from, call.sigma_next)

        fields: dict[str, Any] = {"denoised": _linear_coefficients(denoised, 2)}
        if call.kind == _PREDICTOR:
            fields["update"] = _linear_coefficients(euler, 2)
            fields["partial"] = _linear_coefficients(heun_first, 2)
        else:
            fields["update"] = _linear_coefficients(heun_second if call.kind == _CORRECTOR else euler, 2)
            fields["noise_scale"] = call.churn_std * scale_of(k + 1)
        return replace(call, **fields)

    # --- set_timesteps ----------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid, the churn levels and one `_Call` per model call.

        `num_inference_steps`: N steps on the family's default grid: the rho grid on
        `sigma_range`; for flow models the model's own grid, time-uniform flow times shifted
        as its scheduler shifts them (`_flow_times`, `_flow_grid`).
        `sigmas`: a custom decreasing grid (a final 0 is appended when missing), in sigma units;
        for flow models, flow times in [0, 1] before the model's shift, as diffusers' flow
        schedulers take them (SD3 / Flux pipelines pass these), mapped by `_flow_grid`.
        `timesteps`: the network timesteps themselves (discrete VP train timesteps, VE sigmas,
        flow t * M), decreasing.
        `mu`: the dynamic time shift SD3 / Flux pipelines pass (flow models with
        use_dynamic_shifting; ignored otherwise).
        """
        given = sum(v is not None for v in (num_inference_steps, sigmas, timesteps))
        if given != 1:
            raise ValueError("pass exactly one of num_inference_steps, sigmas or timesteps")
        if num_inference_steps is not None:
            check_num_steps(num_inference_steps, "num_inference_steps")
        flow = isinstance(self._family, FlowMatching)
        mu = mu if flow and self.config.use_dynamic_shifting else None
        if flow and timesteps is None:
            times = _as_grid(sigmas) if sigmas is not None else self._flow_times(num_inference_steps, mu)
            sigmas = self._flow_grid(times, mu)
        elif timesteps is not None:
            sigmas = self._sigmas_of_timesteps(timesteps)
        if sigmas is not None:
            grid = _as_grid(sigmas)
            if grid.numel() > 0 and float(grid[-1]) != 0.0:
                grid = torch.cat([grid, grid.new_zeros(1)])
            check_sigmas(grid)
            check_sigmas_in_range(grid, self._family.sigma_min, self._family.sigma_max, "sigmas" if timesteps is None else "timesteps")
        else:
            grid = karras_sigmas(num_inference_steps, *self.sigma_range, self.config.rho)
        grid, hats = churned_grid(
            grid, self._family.round_sigma, self.config.s_churn, self.config.s_tmin, self._s_tmax, self._family.sigma_max
        )
        levels = grid.tolist()
        n = len(levels) - 1

        heun = self.config.solver == "heun"
        plan: list[tuple[int, int, float, float]] = []  # (kind, i, sigma, level)
        for i in range(n):
            if heun and levels[i + 1] > 0:
                plan.append((_PREDICTOR, i, hats[i], levels[i]))
                plan.append((_CORRECTOR, i, levels[i + 1], levels[i + 1]))
            else:
                plan.append((_EULER, i, hats[i], levels[i]))
        coefficients = self._coefficients([sigma for _, _, sigma, _ in plan])
        calls = []
        for (kind, i, sigma, level), c in zip(plan, coefficients):
            finishes_step = kind != _PREDICTOR
            churn = churn_noise_std(levels[i + 1], hats[i + 1], self.config.s_noise) if finishes_step and i + 1 < n else 0.0
            state_scale = c.c_in  # the state is kept in the model's input scale
            calls.append(
                _Call(
                    kind=kind,
                    step=i,
                    sigma=sigma,
                    level=level,
                    sigma_from=hats[i],
                    sigma_next=levels[i + 1],
                    coefficients=c,
                    state_scale=state_scale,
                    churn_std=churn,
                )
            )
        calls = [self._with_update(calls, k) for k in range(len(calls))]
        self._calls = calls
        self.num_inference_steps = n
        self.sigmas = grid.float()
        self.sigma_hats = hats
        self.timesteps = self._network_timesteps([call.sigma for call in calls]).to(device)
        self._init_noise_sigma = self._start_std(0)
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _sigmas_of_timesteps(self, timesteps: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Noise levels of network timesteps (the inverse of `family.net_time`)."""
        t = _as_grid(timesteps)
        family = self._family
        if isinstance(family, DiscreteVP):
            last = len(family.train_sigmas) - 1
            if not bool(((t >= 0) & (t <= last)).all()):
                raise ValueError(f"timesteps must lie in [0, {last}] (the model's train timesteps), got {t.tolist()}")
            return family.sigma_of_time(t)
        if isinstance(family, FlowMatching):
            m = family.num_train_timesteps
            if not bool(((t >= 0) & (t < m)).all()):
                raise ValueError(f"timesteps of a flow-matching model must lie in [0, {m}) (flow t * {m}), got {t.tolist()}")
            return flow_sigma(t / m)
        if self.config.model_family == "ve":
            return t
        raise ValueError(f"timesteps cannot be given for model_family={self.config.model_family!r}; pass sigmas instead")

    def _start_std(self, index: int) -> float:
        """Std of pure noise at call `index`, in the state's scale (churn folded in for first calls)."""
        call = self._calls[index]
        return initial_noise_std(call.level, call.sigma, self.config.s_noise) * call.state_scale

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at model call `begin_index` (img2img: t_start * order); it must start a step."""
        if self._calls and not (0 <= begin_index < len(self._calls)):
            raise ValueError(
                f"begin_index must be in [0, {len(self._calls) - 1}], got {begin_index}: no sampling step is left "
                "(for img2img, strength * num_inference_steps must be >= 1)"
            )
        if self._calls and self._calls[begin_index].kind == _CORRECTOR:
            raise ValueError(f"begin_index={begin_index} falls on Heun's second model call; it must be a multiple of order=2")
        self._begin_index = begin_index

    def _reset_state(self) -> None:
        self._state: torch.Tensor | None = None  # x_edm after the last step, in float32 or better
        self._returned: torch.Tensor | None = None  # the prev_sample object handed to the pipeline
        self._partial: torch.Tensor | None = None  # Heun: the predictor's share of the corrector's result

    def _current_index(self, timestep: Any = None) -> int:
        """The model call this `step` / `scale_model_input` belongs to. On the first call: the
        begin index if set, else the call of `timestep` (a pipeline that starts mid-schedule
        without set_begin_index, as some img2img pipelines do), else 0."""
        if self._step_index is None:
            if not self._calls:
                raise ValueError("call set_timesteps before sampling")
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif timestep is not None:
                self._step_index = self._index_for_timestep(float(timestep))
            else:
                self._step_index = 0
        return self._step_index

    # --- the per-call protocol --------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input is the state itself: the state is kept in the model's input scale
        (state_scale = c_in for every family), so this is the identity, before set_timesteps too."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance by one model call: D from the output, then the Euler predictor, the Heun
        corrector or the final Euler step; churn noise for the next step is added here.

        Returns prev_sample (in the pipeline's scale and dtype) and pred_original_sample (D, in
        data space). Extra keyword arguments (DDIMPipeline's eta, use_clipped_model_output, ...)
        are ignored; a nonzero eta is named in a warning, once.
        """
        if kwargs.get("eta") and not self._warned_eta:
            self._warned_eta = True
            warnings.warn(
                f"EDMScheduler ignores eta={kwargs['eta']!r} (DDIM's noise): its only noise is Algorithm 2's churn "
                "(s_churn, s_tmin, s_tmax, s_noise in the config)",
                UserWarning,
                stacklevel=2,
            )
        index = self._current_index(timestep)
        if index >= len(self._calls):
            raise IndexError(f"step was called {index + 1} times, but set_timesteps planned {len(self._calls)} model calls")
        call = self._calls[index]
        dtype = sample.dtype if sample.dtype in _STATE_DTYPES else torch.promote_types(sample.dtype, torch.float32)
        x = self._state if sample is self._returned and self._state is not None else sample
        model_output = mean_output(model_output, sample)
        terms = (x, model_output)
        if call.kind == _PREDICTOR:
            x_next = _combine(call.update, terms, dtype)
            self._partial = _combine(call.partial, terms, dtype)
        elif call.kind == _CORRECTOR:
            x_next = self._partial
            self._partial = None
            for coefficient, term in zip(call.update, terms):
                x_next.add_(term, alpha=coefficient)
        else:
            x_next = _combine(call.update, terms, dtype)
        if call.noise_scale > 0:
            x_next.add_(randn(x_next.shape, generator, x_next.device, dtype), alpha=call.noise_scale)
        pred_original_sample = _combine(call.denoised, terms, dtype)
        prev_sample = x_next
        if sample.dtype != dtype:
            pred_original_sample, prev_sample = pred_original_sample.to(sample.dtype), x_next.to(sample.dtype)
        self._state, self._returned = x_next, prev_sample
        self._step_index = index + 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return EDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = y + std * noise at the noise level of `timesteps`, in the state's scale (img2img).

        The level is the current call's (inpainting, mid-loop), else `begin_index`'s (img2img
        start), else each timestep is looked up in `self.timesteps`. At the first call of a
        step the churn is folded in (initial_noise_std), as at the start of sampling.
        """
        if not self._calls:
            raise ValueError("call set_timesteps before add_noise")
        if self._step_index is not None:
            indices = [self._step_index]
        elif self._begin_index is not None:
            indices = [self._begin_index]
        else:
            indices = [self._index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        dtype = torch.promote_types(original_samples.dtype, torch.float32)
        stds = [self._start_std(k) for k in indices]
        scales = [self._calls[k].state_scale for k in indices]
        if len(set(indices)) == 1:
            std, scale = stds[0], scales[0]
        else:
            shape = (-1,) + (1,) * (original_samples.ndim - 1)
            std = torch.tensor(stds, dtype=dtype, device=original_samples.device).reshape(shape)
            scale = torch.tensor(scales, dtype=dtype, device=original_samples.device).reshape(shape)
        noisy = original_samples.to(dtype) * scale + noise.to(dtype) * std
        return noisy.to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow pipelines' img2img start (FlowMatchEulerDiscreteScheduler's name for `add_noise`):
        (1 - t) y + t n in the flow state is x_edm = y + sigma n in the state's scale."""
        if noise is None:
            raise ValueError("noise must be given to scale_noise")
        return self.add_noise(sample, noise, torch.as_tensor(timestep))

    def _index_for_timestep(self, timestep: float) -> int:
        values = self.timesteps.cpu().double().tolist()
        for k, value in enumerate(values):
            if abs(value - timestep) <= 1e-6 * max(1.0, abs(value)) and self._calls[k].kind != _CORRECTOR:
                return k
        raise ValueError(f"timesteps value {timestep} is not one of this scheduler's timesteps")


@dataclass
class EDMSchedulerOutput(SchedulerOutput):
    """prev_sample: the state for the next model call; pred_original_sample: D(x; sigma)."""

    pred_original_sample: torch.Tensor | None = None


_DDIM_PIPELINE_MODULE = "diffusers.pipelines.ddim.pipeline_ddim"


def _warn_when_ddim_pipeline_replaces_us() -> None:
    """Make DDIMPipeline say so when it drops an EDMScheduler.

    `DDIMPipeline.__init__` turns any scheduler into a DDIMScheduler, both when it is built and
    when it is loaded. Its __init__ is wrapped (once, and only when its module is already
    imported, so importing this module stays light) to warn; its behaviour and signature are
    unchanged. A pipeline's class is imported before its components are built, so the wrapper
    is in place whenever an EDMScheduler can reach a DDIMPipeline.
    """
    pipeline_cls = getattr(sys.modules.get(_DDIM_PIPELINE_MODULE), "DDIMPipeline", None)
    if pipeline_cls is None or getattr(pipeline_cls.__init__, "_warns_for_edm_scheduler", False):
        return
    original = pipeline_cls.__init__

    @functools.wraps(original)
    def __init__(self, unet: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(scheduler, EDMScheduler):
            warnings.warn(
                "DDIMPipeline replaces its scheduler by a DDIMScheduler when it is built or loaded, so this "
                "EDMScheduler is not used; assign it afterwards: pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config)",
                UserWarning,
                stacklevel=2,
            )
        original(self, unet, scheduler, *args, **kwargs)

    __init__._warns_for_edm_scheduler = True  # type: ignore[attr-defined]
    pipeline_cls.__init__ = __init__


_warn_when_ddim_pipeline_replaces_us()
