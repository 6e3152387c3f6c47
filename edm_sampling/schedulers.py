"""EDM sampling (Karras et al. 2022, Algorithms 1 and 2) as a drop-in diffusers scheduler.

    pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config)

turns any diffusers pipeline of a DDPM-family model into an EDM Heun (or Euler) sampler on the
rho = 7 grid, with optional churn. The step math is the core's (`samplers`, `denoisers`,
`schedules`); this module only maps the pipeline protocol onto it:

- the ODE is solved in sigma space (sigma(t) = t, s(t) = 1) on x_edm;
- the state handed back to the pipeline is in the model's own input scale, c_in(sigma) x_edm:
  for VP models x_vp = x_edm / sqrt(sigma^2 + 1), for EDM models x_edm / sqrt(sigma^2 +
  sigma_data^2), for VE (c_in = 1) x_edm itself. So `scale_model_input` is the identity, and
  VP and EDM models start from noise of std ~1 and work in DDPMPipeline / DDIMPipeline, which
  never scale; after the last call the state is the sample itself, in data space;
- `timesteps` are what the network receives at each model call (VP: the fractional or nearest
  train timestep of the noise level; VE fourier UNet: sigma itself; EDM: ln(sigma)/4);
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

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .denoisers import (
    TIMESTEP_MAPPINGS,
    Coefficients,
    DiscreteVPDenoiser,
    EDMDenoiser,
    PreconditionedDenoiser,
    VEDenoiser,
    check_prediction_type,
    denoised_from_output,
    mean_output,
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
from .schedules import (
    alphas_cumprod_from_betas,
    betas_from_config,
    check_num_steps,
    clamp_sigma_range,
    karras_sigmas,
    timestep_to_sigma,
)

MODEL_FAMILIES = ("vp", "ve", "edm")

_PREDICTOR, _CORRECTOR, _EULER = 0, 1, 2
_STATE_DTYPES = (torch.float32, torch.float64)

# diffusers schedulers of discrete VP (DDPM-family) models: their configs carry the betas.
_VP_COMPATIBLES = [
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
]
_EDM_SOURCES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
_VE_SOURCES = ("ScoreSdeVeScheduler",)
_FOREIGN_DROP = ("num_train_timesteps",)


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
    input_scale: float  # scale_model_input multiplies the state by this
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


def translate_scheduler_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map another scheduler's config onto EDMScheduler's keys.

    - EDMScheduler configs pass through.
    - DDPM-family (VP) configs keep every value they hold, defaults included (diffusers'
      `_use_default_values` would otherwise replace, e.g., HeunDiscreteScheduler's default
      betas by ours); sigma_min / sigma_max set to None are dropped.
    - ScoreSdeVeScheduler -> model_family "ve" with its sigma range.
    - EDMEulerScheduler / EDMDPMSolverMultistepScheduler -> model_family "edm" with its sigma
      range, sigma_data, rho and prediction_type.
    Configs that cannot be mapped raise a ValueError naming the key.
    """
    cfg = dict(config)
    own_keys = set(EDMScheduler._get_init_keys(EDMScheduler)) - {"self"}
    source = cfg.get("_class_name")  # in-memory configs have none: recognise them by their keys
    public = {key for key in cfg if not key.startswith("_")}
    if source == EDMScheduler.__name__ or "model_family" in cfg or (source is None and public <= own_keys):
        return cfg
    source = source or "the given scheduler"
    cfg.pop("_use_default_values", None)
    if source in _VE_SOURCES or {"snr", "sampling_eps"} <= public:
        for key in _FOREIGN_DROP:
            cfg.pop(key, None)
        cfg["model_family"] = "ve"
        return cfg
    if source in _EDM_SOURCES or "sigma_data" in cfg:
        if cfg.get("sigma_schedule", "karras") != "karras":
            raise ValueError(
                f"sigma_schedule={cfg['sigma_schedule']!r} of {source} cannot be mapped: EDMScheduler uses the "
                "rho grid (sigma_schedule='karras')"
            )
        if cfg.get("final_sigmas_type", "zero") != "zero":
            raise ValueError(
                f"final_sigmas_type={cfg['final_sigmas_type']!r} of {source} cannot be mapped: EDMScheduler "
                "always ends at sigma = 0 (final_sigmas_type='zero')"
            )
        for key in _FOREIGN_DROP:
            cfg.pop(key, None)
        cfg["model_family"] = "edm"
        return cfg
    if "beta_schedule" not in cfg and "trained_betas" not in cfg:
        raise ValueError(
            f"_class_name={source!r}: the config has no betas and is not a known VE or EDM scheduler, so it "
            "cannot be mapped to model_family 'vp', 've' or 'edm'"
        )
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(
            "rescale_betas_zero_snr=True cannot be mapped: its last noise level is infinite, outside the EDM "
            "sigma range"
        )
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type={cfg['timestep_type']!r} cannot be mapped: only 'discrete' VP timesteps")
    if cfg.get("use_flow_sigmas"):
        raise ValueError("use_flow_sigmas=True (a flow-matching model) cannot be mapped to a VP/VE/EDM family")
    for key in ("sigma_min", "sigma_max", "rho"):
        if key in cfg and cfg[key] is None:
            del cfg[key]
    cfg["model_family"] = "vp"
    return cfg


class EDMScheduler(SchedulerMixin, ConfigMixin):
    """The EDM sampler (Heun or Euler, optional churn) for VP, VE and EDM models.

    Args:
        solver: "heun" (2N - 1 model calls, `order` = 2) or "euler" (N calls).
        sigma_min, sigma_max, rho: the sampling grid (EDM eq. 5); for VP models the range is
            clamped to the noise levels of the model's alphas_cumprod.
        s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's churn; s_tmax None means infinity.
        model_family: "vp" (DDPM-family nets on discrete timesteps), "ve" (NCSN++ fourier
            UNet2DModel: timestep = sigma, output a score) or "edm" (EDM-preconditioned net,
            timestep = ln(sigma)/4).
        timestep_mapping: VP only; "interpolate" (fractional timesteps) or "round" (nearest
            trained level, the grid snapped to trained levels: the paper's iDDPM rule).
        sigma_data: EDM preconditioning's data std.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        prediction_type: the VP model's training schedule and output, DDPMScheduler's defaults.
    """

    _compatibles = list(_VP_COMPATIBLES)

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
        model_family: str = "vp",
        timestep_mapping: str = "interpolate",
        sigma_data: float = 0.5,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if model_family not in MODEL_FAMILIES:
            raise ValueError(f"model_family must be one of {MODEL_FAMILIES}, got {model_family!r}")
        if timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {timestep_mapping!r}")
        check_prediction_type(prediction_type)
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        check_churn(s_churn, s_tmin, self._s_tmax, s_noise)

        self._family = self._family_maps()
        self.train_sigmas: torch.Tensor | None = getattr(self._family, "train_sigmas", None)
        self.sigma_range = clamp_sigma_range(sigma_min, sigma_max, self._family.sigma_min, self._family.sigma_max)

        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._calls: list[_Call] = []
        hi = self.sigma_range[1]
        self._init_noise_sigma = self._coefficients([hi])[0].c_in * hi
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._reset_state()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' from_config, after mapping a DDPM-family, ScoreSdeVe or EDMEuler config
        onto this scheduler's keys (see `translate_scheduler_config`)."""
        if isinstance(config, Mapping):
            config = translate_scheduler_config(config)
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
    def _s_tmax(self) -> float:
        return math.inf if self.config.s_tmax is None else float(self.config.s_tmax)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- family-specific maps: the core's denoiser adapter of the family, without a network -------

    def _family_maps(self) -> PreconditionedDenoiser:
        """The family's D(x; sigma) adapter (no network): its coefficients, network timestep,
        output convention, round_sigma and supported range are the scheduler's too. VE and EDM
        configs do not state the model's range, so only VP ranges are clamped."""
        config = self.config
        if config.model_family == "vp":
            betas = betas_from_config(
                config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule, config.trained_betas
            )
            return DiscreteVPDenoiser(None, alphas_cumprod_from_betas(betas), config.prediction_type, config.timestep_mapping)
        if config.model_family == "ve":
            return VEDenoiser(None, sigma_min=0.0, sigma_max=math.inf)
        return EDMDenoiser(None, config.sigma_data, prediction_type=config.prediction_type)

    def _coefficients(self, sigmas: Sequence[float]) -> list[Coefficients]:
        c = self._family.coefficients(torch.tensor(list(sigmas), dtype=torch.float64))
        return [Coefficients(*values) for values in zip(c.c_skip.tolist(), c.c_out.tolist(), c.c_in.tolist())]

    def _network_timesteps(self, sigmas: Sequence[float]) -> torch.Tensor:
        t = self._family.net_timestep(torch.tensor(list(sigmas), dtype=torch.float64))
        return t.long() if getattr(self._family, "timestep_mapping", None) == "round" else t.float()

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
    ) -> None:
        """Build the grid, the churn levels and one `_Call` per model call.

        `sigmas`: a custom decreasing grid in sigma units (a final 0 is appended when missing).
        `timesteps`: custom VP train timesteps (decreasing; converted to sigmas) or VE sigmas.
        """
        given = sum(v is not None for v in (num_inference_steps, sigmas, timesteps))
        if given != 1:
            raise ValueError("pass exactly one of num_inference_steps, sigmas or timesteps")
        if sigmas is None and timesteps is not None:
            sigmas = self._sigmas_of_timesteps(timesteps)
        if sigmas is not None:
            grid = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
            if grid.numel() > 0 and float(grid[-1]) != 0.0:
                grid = torch.cat([grid, grid.new_zeros(1)])
            check_sigmas(grid)
        else:
            check_num_steps(num_inference_steps, "num_inference_steps")
            grid = karras_sigmas(num_inference_steps, *self.sigma_range, self.config.rho)
        if sigmas is not None:
            check_sigmas_in_range(grid, self._family.sigma_min, self._family.sigma_max, "sigmas" if timesteps is None else "timesteps")
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
                    input_scale=c.c_in / state_scale,
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
        t = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().flatten()
        if self.config.model_family == "vp":
            last = len(self.train_sigmas) - 1
            if not bool(((t >= 0) & (t <= last)).all()):
                raise ValueError(f"timesteps must lie in [0, {last}] (the model's train timesteps), got {t.tolist()}")
            return timestep_to_sigma(t, self.train_sigmas)
        if self.config.model_family == "ve":
            return t
        raise ValueError("timesteps cannot be given for model_family='edm'; pass sigmas instead")

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
        """The network's input: the state itself, which is kept in the model's input scale."""
        scale = self._calls[self._current_index(timestep)].input_scale
        return sample if scale == 1.0 else sample * scale

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
        data space). Extra keyword arguments (eta, use_clipped_model_output, ...) are ignored.
        """
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
