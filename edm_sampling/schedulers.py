"""EDM sampling and the low-NFE solvers as a drop-in diffusers scheduler.

    pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config)                     # EDM Heun
    pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config, solver="unipc")     # N calls

turns any diffusers pipeline into any of the core's solvers (`solvers.SOLVERS`: EDM's Heun and
Euler with churn, iPNDM, DPM-Solver++ 2M / 3M, UniPC, DEIS, with the analytical first step) on
any of the core's grids (`schedules.SCHEDULES`), for every model family: DDPM-family (discrete
VP), continuous VP, VE, EDM-trained and flow-matching (SD3, Flux) models. Which family a config
describes, and every formula of it, is the family object's (`families`); every update rule is
the solver plan's (`solvers`), the one the core loop `samplers.execute_plan` runs too. This
module only maps the pipeline protocol onto them:

- the ODE is solved in sigma space (sigma(t) = t, s(t) = 1) on x_edm, with the plan's history
  of states X and denoiser outputs D kept in float32 or wider;
- the state handed back to the pipeline is in the model's own input scale, s(sigma) x_edm =
  c_in(sigma) x_edm: VP x_edm / sqrt(sigma^2 + 1), EDM x_edm / sqrt(sigma^2 + sigma_data^2),
  flow x_edm / (1 + sigma) = x_t, VE x_edm itself. So `scale_model_input` is the identity, and
  VP, EDM and flow models start from noise of std ~1 and work in pipelines that never scale
  (DDPM, DDIM, SD3, Flux); after the last call the state is the sample, in data space;
- flow models with the solvers that can start from pure noise (euler, dpmpp_2m / 3m, unipc,
  adams_alpha, adams_alpha_adaptive)
  start at t = 1 (sigma = inf), where SD3 / Flux start: the state there is x_t = n, held as
  x_edm / sigma (`solvers`); heun, ipndm, ipndm_v and deis start at sigma_max;
- one `step` per model call: the plan's Step of that call (D from the network output, then
  its updates); `timesteps` are what the network receives at each call (`family.net_time`),
  and `order` is the calls per grid step (2 for Heun, whose timesteps may repeat; a call index,
  not a timestep lookup, tracks progress). `num_inference_steps = N` is N grid steps for Heun
  (2N - 1 calls) and exactly N model calls for every other solver (with afs the grid has N + 1
  steps, the first one free);
- churn (Heun, Euler): gamma_i is known at `set_timesteps`, the model is called at sigma_hat_i,
  the churn noise of step i + 1 is added at the end of step i, and step 0's churn is folded into
  the start noise (`init_noise_sigma`);
- img2img (`set_begin_index`, or a pipeline that starts at a later timestep): the plan of the
  remaining grid is built afresh, with a fresh history;
- speed: every coefficient is a Python float computed at `set_timesteps`, so `step` is a few
  fused multiply-adds with no host-device sync (the one exception is the first call's timestep
  lookup when no begin index is set). Non-finite samples are detected once, after the last
  call (one sync per generation).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils import is_torchsde_available

from .denoisers import mean_output
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
    DiscreteVP,
    Family,
    FlowMatching,
    family_from_scheduler_config,
    flow_sigma,
    flow_time,
    read_scheduler_config,
)
from .safety.inputs import InvalidArgument, check_kinds
from .samplers import check_generator, churned_grid, contributes, randn, weighted_sum
from .schedules import (
    SCHEDULES,
    check_num_steps,
    check_sigmas,
    check_sigmas_in_range,
    clamp_sigma_range,
    noise_start_sigmas,
    read_schedule_file,
    sigma_grid,
)
from .solvers import (
    ADAPTIVE_LOOKBACK,
    FINAL_STEPS,
    SOLVERS,
    Combination,
    SolverPlan,
    Step,
    check_churn,
    family_options,
    initial_noise_std,
    linear_coefficients,
    make_plan,
    motion_gram,
    solver_info,
)

_STATE_DTYPES = (torch.float32, torch.float64)
FLOW_GRID_BOTTOM_EXPONENT = 1.5
"""A flow model's default grid from pure noise ends at s / (N - 1)^1.5 (see `_flow_noise_grid`).
Of the exponents 1, 1.25, 1.5, 1.75 and 2, 1.5 missed issue 12's target (0.8 x diffusers' best
flow scheduler) in the fewest cells, 5 of 64, with a geometric-mean ratio of 0.23 (best: 0.22)
over 8 data spectra, shifts 1 and 3, NFE 5 / 9 / 15 / 25 (benchmarks/flow_grids.py)."""
# config keys that describe the model: always stored explicitly, so that another scheduler made
# from this config (`X.from_config(edm.config)`) sees the model's values, not its own defaults
_MODEL_KEYS = ("model_family", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
               "prediction_type")


_Term = tuple[float | np.ndarray, bool, int]  # (coefficient, from D (else from X), look-back k: X[-1-k] / D[-1-k])


@dataclass(frozen=True)
class _Call:
    """One model call of a plan, compiled to Python floats (no host-device sync in `step`; a
    data-adaptive step, `Step.adapt`, is folded in `step` from its outputs, one sync per call).

    The history is kept as the scheduler stores it: a state X[j] that was handed to the
    pipeline is stored in the pipeline's scale (x_edm * state_scale of the call it was handed
    to), the others in x_edm; `updates` are the plan's updates of this call with those scales
    and the next call's state scale folded into the coefficients (dropping the terms of a
    skipped call's D = 0), so each becomes a multiply and fused adds. D = denoised[0] X[-1] +
    denoised[1] F from the network output F (the family's c_skip / state_scale and c_out, with
    its output convention). `start_std` is the std of pure noise at this call in x_edm units,
    churn folded in (where img2img starts); `signal_scale` is the clean data's scale in the
    pipeline's state there: state_scale, but 0 at sigma = inf, where the state is held as
    x_edm / sigma and is the noise itself (start_std 1)."""

    index: int  # the call's position in the plan's calls
    step: Step
    sigma: float
    state_scale: float
    denoised: tuple[float, float]
    start_std: float
    signal_scale: float
    updates: tuple[tuple[tuple[_Term, ...], float], ...]  # per update: its terms, its noise std
    folding: tuple[tuple[float, ...], tuple[bool, ...], tuple[float, ...]] | None = None  # `_fold_updates`'s
    # scales, kept for a data-adaptive step (`Step.adapt`), whose updates are folded at `step`


def _fold_updates(
    updates: Sequence[Combination], state_scales: Sequence[float], has_denoised: Sequence[bool], outs: Sequence[float]
) -> tuple[tuple[tuple[_Term, ...], float], ...]:
    """A call's updates as `_Call.updates`: each update's result stored at scale outs[u], a state
    X[-1-j] read at state_scales[-1-j] (the states of this call's earlier updates included), the
    terms of a missing D (a skipped call's D = 0) dropped."""
    scales, folded = list(state_scales), []
    for update, out in zip(updates, outs):
        terms = [(out * w / scales[-1 - j], False, j) for j, w in enumerate(update.states) if contributes(w)]
        terms += [(out * w, True, j) for j, w in enumerate(update.denoised) if contributes(w) and has_denoised[-1 - j]]
        folded.append((tuple(terms), update.noise_std * out))
        scales.append(out)
    return tuple(folded)


def _prefix_scales(plan: SolverPlan) -> tuple[list[float], int]:
    """The states before the plan's first model call as multiples of the start noise z
    (X[0] = init_std z; a step without a call, the analytical first step, adds D = 0): its
    coefficients c_j with X[j] = c_j z, and the number of such steps."""
    states: deque = deque([plan.init_std])
    count = 0
    for step in plan.steps:
        if step.sigma is not None:
            break
        count += 1
        for update in step.updates:
            if update.noise_std:
                raise ValueError("a step without a model call cannot add churn noise")
            states.append(sum(c * states[-1 - k] for k, c in enumerate(update.states)))
    return list(states), count


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


# a foreign scheduler's own grid and solver settings: EDMScheduler replaces them by its grid and
# solver by design, so a swap says nothing about them (Stable Diffusion's steps_offset = 1, ...)
_REPLACED_SETTINGS = frozenset({
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "solver_order", "algorithm_type", "solver_type",
    "lower_order_final", "euler_at_final", "final_sigmas_type", "interpolation_type", "disable_corrector",
    "predict_x0", "solver_p", "use_lu_lambdas", "lambda_min_clipped", "variance_type", "timestep_type",
    "sigma_schedule", "beta_sigmas", "noise_sampler_seed",
})


def _ignored_settings(config: Mapping[str, Any], reading: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What from_config ignores and a user may expect to act: keyword arguments EDMScheduler does
    not accept, and settings of a foreign scheduler it does not use whose value is not that
    scheduler's default (or is unknown to it), other than False / None ("off") and the source's
    own grid and solver settings, which EDMScheduler replaces by design (`_REPLACED_SETTINGS`)."""
    own = set(EDMScheduler._get_init_keys(EDMScheduler)) - {"self"}
    ignored = {key: value for key, value in kwargs.items() if key not in own}
    if reading.source == EDM_SCHEDULER:
        return ignored
    defaults = _source_defaults(reading.source) or {}
    skipped = set(reading.used) | set(reading.scheduler_keys) | set(config.get("_use_default_values", []))
    for key, value in config.items():
        if key.startswith("_") or key in skipped or key in _REPLACED_SETTINGS or value is None or value is False:
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
    """Every solver of the core (EDM's Heun by default) for every model family, in any pipeline.

    Args:
        solver: one of `solvers.SOLVERS`: "heun" (EDM's sampler, the default: N steps cost
            2N - 1 model calls, `order` = 2), "euler", "ipndm", "ipndm_v", "dpmpp_2m",
            "dpmpp_3m", "unipc", "deis", "adams_alpha", "adams_alpha_adaptive" (N model calls for
            num_inference_steps = N).
        solver_order: the order of ipndm / ipndm_v / unipc / deis / adams_alpha(_adaptive) (None:
            the solver's default).
        afs: the analytical first step (every solver but heun and the adams_alpha ones): the first model call is replaced
            by the data-mean estimate D = 0, so N calls cover a grid of N + 1 steps.
        schedule: the grid, one of `schedules.SCHEDULES` ("karras", "logsnr", "time_uniform",
            "time_quadratic", "vp", "ve", "iddpm", "ays", "gits"); None: the solver's own
            default (heun: karras with `rho`; flow models: from pure noise, equal steps in
            log sigma over the range their own shifted time grid spans (`_flow_noise_grid`),
            or, for solvers that cannot start there, their own grid from sigma_max).
        schedule_file: a JSON grid file written by `edm-sampling tune --schedule` (instead of
            `schedule`); it must hold a grid of the step count asked for.
        final_step: the step to sigma = 0 of dpmpp_2m / dpmpp_3m / unipc / ipndm / ipndm_v / deis:
            "extrapolate" (the default: the denoised trajectory extrapolated to sigma = 0 in
            sigma^2, `solvers.final_denoised`), "denoise" (x = D at the last call, the published
            rule of DPM-Solver++ and UniPC) or "published" (each solver's own published last step:
            the Adams-Bashforth step to 0 for ipndm / ipndm_v / deis).
        sigma_min, sigma_max, rho: the grid's range, clamped to the model's (discrete VP: the
            noise levels of its alphas_cumprod), and the karras grid's rho. Flow models' own
            grids from pure noise are not capped by sigma_max (the model is trained at every t).
        s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's churn (heun and euler only); s_tmax
            None means infinity.
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
        solver_order: int | None = None,
        afs: bool = False,
        schedule: str | None = None,
        schedule_file: str | None = None,
        final_step: str | None = None,
    ):
        check_kinds(sigma_min=(sigma_min, "real"), sigma_max=(sigma_max, "real"), s_tmax=(s_tmax, "real?"),
                    beta_start=(beta_start, "real"), beta_end=(beta_end, "real"), shift=(shift, "real"),
                    use_dynamic_shifting=(use_dynamic_shifting, "bool"), trained_betas=(trained_betas, "numbers?"),
                    schedule_file=(schedule_file, "path?"))
        info = solver_info(solver)
        model_family = LEGACY_FAMILY_NAMES.get(model_family, model_family)
        if model_family not in MODEL_FAMILIES:
            raise ValueError(f"model_family must be one of {MODEL_FAMILIES}, got {self.config.model_family!r}")
        if timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {timestep_mapping!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
        if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        check_churn(s_churn, s_tmin, self._s_tmax, s_noise, solver)
        if solver_order is not None and (info.orders is None or isinstance(solver_order, bool)
                                         or not isinstance(solver_order, int)
                                         or not info.orders[0] <= solver_order <= info.orders[1]):
            allowed = "none (it has no order option)" if info.orders is None else f"an integer in {list(info.orders)}"
            raise ValueError(f"solver_order for solver {solver!r} must be {allowed} or None, got {solver_order!r}")
        if not isinstance(afs, bool) or (afs and not info.afs):
            raise ValueError(f"afs must be True or False, and True only for the solvers "
                             f"{[n for n, i in SOLVERS.items() if i.afs]}; got afs={afs!r} with solver {solver!r}")
        if afs and s_churn > 0:
            raise ValueError("afs=True and s_churn > 0 do not go together in EDMScheduler (the free first step has no "
                             f"model call to add churn before); set s_churn=0 or afs=False, got s_churn={s_churn!r}")
        if final_step is not None and ("final_step" not in (info.plan.__kwdefaults__ or {})
                                       or final_step not in FINAL_STEPS):
            takers = [n for n, i in SOLVERS.items() if "final_step" in (i.plan.__kwdefaults__ or {})]
            raise ValueError(f"final_step must be None or one of {FINAL_STEPS}, and is an option of the solvers "
                             f"{takers} only; got final_step={final_step!r} with solver {solver!r}")
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or None (the solver's default), got {schedule!r}")
        if schedule is not None and schedule_file is not None:
            raise ValueError("give schedule or schedule_file, not both")
        self._schedule_file = read_schedule_file(schedule_file) if schedule_file is not None else None
        self._normalize_config(model_family)

        self._family = family_from_scheduler_config(self.config)
        if isinstance(self._family, DiscreteVP):  # what pipelines and user code read off a DDPM-family scheduler
            self.betas = self._family.betas.float()
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = self._family.alphas_cumprod.float()
        self.train_sigmas: torch.Tensor | None = getattr(self._family, "train_sigmas", None)
        self.sigma_range = self._sampling_range()
        if self._schedule_file is not None:
            self._check_schedule_file()

        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.sigma_hats: list[float] = []
        self._grid: torch.Tensor | None = None
        self._plan: SolverPlan | None = None
        self._calls: list[_Call] = []
        hi = math.inf if self._from_noise else self.sigma_range[1]
        hi_scale = float(self._family.input_scale(torch.tensor(hi, dtype=torch.float64)))
        self._init_noise_sigma = initial_noise_std(hi, hi) * hi_scale
        self._unit_noise_start = False  # a flow pipeline's N(0, I) stands in for pure noise (t = 1)
        self._noised_start = False  # the start state came from add_noise / scale_noise (img2img)
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._warned_eta = False
        self._reset_state()
        _warn_when_ddim_pipeline_replaces_us()

    def _check_schedule_file(self) -> None:
        """At construction: the file's grids must lie in this model's noise levels (a grid searched
        on another model fails here, naming the file, not at the pipeline's first call); a file
        searched for another solver is used, with a warning."""
        path, meta = self.config.schedule_file, self._schedule_file.meta
        for grid in self._schedule_file.grids:
            levels = torch.tensor([s for s in grid if math.isfinite(s)], dtype=torch.float64)
            try:
                check_sigmas_in_range(levels, self._family.sigma_min, self._family.sigma_max, "schedule_file")
            except ValueError:
                positive = levels[levels > 0]
                raise InvalidArgument(
                    "schedule_file", f"{path} (searched on {meta.get('model', 'another model')!r}) has a grid spanning "
                    f"[{float(positive.min()):.6g}, {float(positive.max()):.6g}], but this model supports "
                    f"[{self._family.sigma_min:.6g}, {self._family.sigma_max:.6g}]; search one for this model with "
                    "`edm-sampling tune --schedule --model ...`") from None
        searched_for = meta.get("solver")
        if searched_for is not None and (searched_for != self.config.solver or bool(meta.get("afs")) != self.config.afs):
            warnings.warn(f"schedule_file {path} was searched for solver={searched_for!r}, afs={bool(meta.get('afs'))}; "
                          f"it is used with solver={self.config.solver!r}, afs={self.config.afs}, for which it may not "
                          "be the best grid", UserWarning, stacklevel=3)

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
        """Model calls per grid step: 2 for Heun, 1 for every other solver."""
        return solver_info(self.config.solver).calls_per_step

    @property
    def init_noise_sigma(self) -> float:
        """Std of the pipeline's start noise, in the state's scale: the plan's start noise
        (churn folded in) carried through any steps before the first model call (afs).

        Flow models: 1, as for every diffusers flow scheduler: SD3 / Flux pipelines hand over
        N(0, I) unscaled, which is x_t at the first level, except where that level stands in for
        pure noise (t = 1 on a grid that starts at sigma_max): there `step` scales it itself."""
        return 1.0 if isinstance(self._family, FlowMatching) else self._init_noise_sigma

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
    def plan(self) -> SolverPlan | None:
        """The solver plan `set_timesteps` built (None before)."""
        return self._plan

    @property
    def _s_tmax(self) -> float:
        return math.inf if self.config.s_tmax is None else float(self.config.s_tmax)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- the grid ---------------------------------------------------------------------------------

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

    @property
    def _from_noise(self) -> bool:
        """Flow grids start at pure noise (t = 1, sigma = inf), where SD3 / Flux start: the family
        can be called there and the solver can start there (`SolverInfo.infinite_start`)."""
        return self._family.infinite_sigma and solver_info(self.config.solver).infinite_start

    def _flow_grid(self, times: Sequence[float] | torch.Tensor, mu: float | None) -> torch.Tensor:
        """A flow model's grid from flow times: shifted as the model's scheduler shifts them
        (`FlowMatching.sigmas_of_flow_times`), each level clamped to `sigma_range` and levels that
        the clamp makes equal merged. Solvers that start from pure noise keep t = 1 as
        sigma = inf and every level above sigma_min as given (a flow model is trained at every
        t); for the others t = 1 becomes sigma_max."""
        sigmas = self._family.sigmas_of_flow_times(times, mu)
        lo, hi = self.sigma_range
        positive = sigmas[sigmas > 0].clamp(lo, math.inf if self._from_noise else hi)
        return torch.cat([torch.unique_consecutive(positive), sigmas[sigmas <= 0]])

    def _flow_noise_grid(self, num_steps: int, mu: float | None) -> torch.Tensor:
        """A flow model's default grid for the solvers that start from pure noise
        (`schedules.noise_start_sigmas`): sigma = inf, then equal steps in lambda = -log sigma (the
        variable DPM-Solver++ and UniPC integrate in) from the model's own first level below pure
        noise, s (N - 1) (its time grid's t = 1 - 1/N, s the shift factor), down to
        s / (N - 1)^FLOW_GRID_BOTTOM_EXPONENT (at least sigma_min). The model's own last level,
        s / (N - 1) at t = 1/N, is extended downwards because an error left at the bottom stays in
        the sample, while one made at sigma is damped by a / sqrt(a^2 + sigma^2) for data of std a
        by the rest of the ODE (measured: benchmarks/flow_grids.py). A solver may set its own
        exponent (`SolverInfo.flow_bottom_exponent`: adams_alpha keeps the model's range, b = 1)."""
        s = self._family.shift_factor(mu)
        top = s * max(num_steps - 1, 1)
        exponent = solver_info(self.config.solver).flow_bottom_exponent or FLOW_GRID_BOTTOM_EXPONENT
        bottom = max(s / max(num_steps - 1, 1) ** exponent, self.sigma_range[0])
        if num_steps > 2 and not bottom < top:
            raise ValueError(f"sigma_min={self.config.sigma_min!r} must be below {top:.6g}, the top of the flow grid of "
                             f"{num_steps} steps from pure noise")
        return noise_start_sigmas(num_steps, bottom, top)

    def _grid_steps(self, num_inference_steps: int) -> int:
        """Grid steps for `num_inference_steps`: N for Heun (2N - 1 calls), else N calls (N + 1
        steps under afs, whose first step makes no call)."""
        if solver_info(self.config.solver).calls_per_step == 2:
            return num_inference_steps
        return num_inference_steps + (1 if self.config.afs else 0)

    def _named_grid(self, num_steps: int, mu: float | None) -> torch.Tensor:
        """The default grid of `num_steps` steps: the schedule file's, the configured schedule, a
        flow model's own shifted grid, or the solver's default schedule, on `sigma_range`."""
        if self._schedule_file is not None:
            return self._schedule_file.grid_for_steps(num_steps, "schedule_file")
        name = self.config.schedule
        if name is None and isinstance(self._family, FlowMatching):
            if self._from_noise:
                return self._flow_noise_grid(num_steps, mu)
            grid = self._flow_grid(self._flow_times(num_steps, mu), mu)
            return torch.cat([grid, grid.new_zeros(1)])
        info = solver_info(self.config.solver)
        name = name or info.schedule
        options: dict[str, Any] = {}
        if name == "karras":
            options["rho"] = self.config.rho
        elif name in ("time_uniform", "time_quadratic"):
            options.update(sigma_to_t=self._family.time_of_sigma, t_to_sigma=self._family.sigma_of_time)
        elif name == "gits":
            options["interpolate"] = True  # the published counts, resampled log-linearly to others (as ays)
        return sigma_grid(name, num_steps, *self.sigma_range, **options)

    def _plan_of(self, grid: torch.Tensor, hats: Sequence[float], afs: bool) -> SolverPlan:
        """The configured solver's plan on `grid` (rounded) with churn levels `hats`."""
        info = solver_info(self.config.solver)
        options: dict[str, Any] = {}
        if self.config.solver_order is not None:
            options["order"] = self.config.solver_order
        if afs:
            options["afs"] = True
        if self.config.final_step is not None:
            options["final_step"] = self.config.final_step
        options.update(family_options(self.config.solver, self._family.data_std))
        if info.churn:
            options.update(sigma_hats=list(hats), s_noise=self.config.s_noise)
        return make_plan(self.config.solver, grid, **options)

    def _calls_of(self, plan: SolverPlan) -> list[_Call]:
        """One `_Call` per model call of `plan`: its family coefficients and its updates, compiled
        against the scales the history is stored in (see `_Call`)."""
        steps = [step for step in plan.steps if step.sigma is not None]
        sigma = torch.tensor([step.sigma for step in steps], dtype=torch.float64)
        c = self._family.coefficients(sigma)
        scales = self._family.input_scale(sigma).tolist()
        prefix, skipped = _prefix_scales(plan)
        if any(step.sigma is None for step in plan.steps[skipped:]):  # pragma: no cover (no solver does this)
            raise ValueError(f"solver {plan.solver!r}: a step without a model call after the first call")
        state_scales = [1.0] * (len(prefix) - 1) + [scales[0]]  # the start as `step` stores it
        has_denoised = [False] * skipped
        calls = []
        for k, (step, c_skip, c_out) in enumerate(zip(steps, c.c_skip.tolist(), c.c_out.tolist())):
            def denoised(x: float, out: float, c_skip=c_skip, c_out=c_out, sigma=step.sigma, scale=scales[k]) -> float:
                return c_skip * x / scale + c_out * self._family.net_output(out, sigma)

            has_denoised.append(True)
            outs = tuple((scales[k + 1] if k + 1 < len(steps) else 1.0) if u + 1 == len(step.updates) else 1.0
                         for u in range(len(step.updates)))
            folding = (tuple(state_scales), tuple(has_denoised), outs)
            state_scales.extend(outs)
            start_std = initial_noise_std(step.level, step.sigma, self.config.s_noise)
            signal_scale = 0.0 if step.sigma == math.inf else scales[k]
            calls.append(_Call(k, step, step.sigma, scales[k], linear_coefficients(denoised, 2), start_std, signal_scale,
                               _fold_updates(step.updates, *folding), folding if step.adapt is not None else None))
        return calls

    # --- set_timesteps ----------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid, the churn levels and the solver plan, with one timestep per model call.

        `num_inference_steps`: N grid steps for Heun, N model calls for every other solver, on
        the default grid (`schedule` / `schedule_file` / the solver's own; flow models: see
        `_flow_noise_grid`, or for solvers that cannot start from pure noise their own
        time-uniform flow times shifted as their scheduler shifts them).
        `sigmas`: a custom decreasing grid (a final 0 is appended when missing), in sigma units;
        for flow models, flow times in [0, 1] before the model's shift, as diffusers' flow
        schedulers take them (SD3 / Flux pipelines pass these); t = 1 is pure noise.
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
        # the pipeline's N(0, I) is pure noise (t = 1) on a grid of ours or on flow times from t = 1
        pure_noise_start = flow and (num_inference_steps is not None
                                     or (sigmas is not None and float(_as_grid(sigmas)[0]) >= 1.0))
        if flow and sigmas is not None:
            sigmas = self._flow_grid(_as_grid(sigmas), mu)
        elif timesteps is not None:
            sigmas = self._sigmas_of_timesteps(timesteps)
        if sigmas is not None:
            grid = _as_grid(sigmas)
            if grid.numel() > 0 and float(grid[-1]) != 0.0:
                grid = torch.cat([grid, grid.new_zeros(1)])
            check_sigmas(grid, "sigmas" if timesteps is None else "timesteps", infinite_start=self._from_noise)
        else:
            grid = self._named_grid(self._grid_steps(num_inference_steps), mu)
        check_sigmas_in_range(grid, self._family.sigma_min, self._family.sigma_max, "sigmas" if timesteps is None else "timesteps")
        grid, hats = churned_grid(
            grid, self._family.round_sigma, self.config.s_churn, self.config.s_tmin, self._s_tmax, self._family.sigma_max
        )
        plan = self._plan_of(grid, hats, self.config.afs)
        self._grid, self._plan = grid, plan
        self._calls = self._calls_of(plan)
        self._run_calls, self._run_offset, self._run_plan = self._calls, 0, plan
        self.num_inference_steps = len(grid) - 1
        self.sigmas = grid.float()
        self.sigma_hats = list(plan.sigma_hats)
        self.timesteps = self._network_timesteps([call.sigma for call in self._calls]).to(device)
        scales, _ = _prefix_scales(plan)
        self._init_noise_sigma = scales[-1] * self._calls[0].state_scale
        self._unit_noise_start = pure_noise_start
        self._noised_start = False
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _network_timesteps(self, sigmas: Sequence[float]) -> torch.Tensor:
        t = self._family.net_time(torch.tensor(list(sigmas), dtype=torch.float64))
        return t.long() if self._family.integer_timesteps else t.float()

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
            top = "]" if self._from_noise else ")"  # t = 1: pure noise, for solvers that start there
            if not bool(((t >= 0) & ((t <= m) if self._from_noise else (t < m))).all()):
                raise ValueError(f"timesteps of a flow-matching model must lie in [0, {m}{top} (flow t * {m}) for solver "
                                 f"{self.config.solver!r}, got {t.tolist()}")
            return flow_sigma(t / m)
        if self.config.model_family == "ve":
            return t
        raise ValueError(f"timesteps cannot be given for model_family={self.config.model_family!r}; pass sigmas instead")

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at model call `begin_index` (img2img: t_start * order); it must start a grid step."""
        if self._calls and not (0 <= begin_index < len(self._calls)):
            raise ValueError(
                f"begin_index must be in [0, {len(self._calls) - 1}], got {begin_index}: no sampling step is left "
                "(for img2img, strength * num_inference_steps must be >= 1)"
            )
        if self._calls and not self._starts_grid_step(begin_index):
            raise ValueError(f"begin_index={begin_index} falls on Heun's second model call; it must be a multiple of order=2")
        self._begin_index = begin_index

    def _starts_grid_step(self, index: int) -> bool:
        return index == 0 or self._calls[index].step.index != self._calls[index - 1].step.index

    def _reset_state(self) -> None:
        self._states: deque | None = None  # the plan's X history, float32 or wider, stored as `_Call` says
        self._denoised: deque | None = None  # the plan's D history
        self._returned: torch.Tensor | None = None  # the prev_sample object handed to the pipeline

    def _current_index(self, timestep: Any = None) -> int:
        """The model call this `step` belongs to. On the first call: the begin index if set, else
        the call of `timestep` (a pipeline that starts mid-schedule without set_begin_index, as
        some img2img pipelines do), else 0."""
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

    def _start_run(self, index: int) -> None:
        """The plan that runs from model call `index`: the whole plan from call 0, else (img2img)
        the plan of the remaining grid, with a fresh history (no afs: the start is not pure noise)."""
        if index == 0:
            self._run_calls, self._run_offset, self._run_plan = self._calls, 0, self._plan
            return
        i0 = self._calls[index].step.index
        plan = self._plan_of(self._grid[i0:], self._plan.sigma_hats[i0:], afs=False)
        calls = self._calls_of(plan)
        if len(calls) != len(self._calls) - index:  # pragma: no cover (a plan invariant)
            raise RuntimeError(f"the plan from call {index} makes {len(calls)} calls, not {len(self._calls) - index}")
        self._run_calls, self._run_offset, self._run_plan = calls, index, plan

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
        """Advance by one model call: D from the network output, then the plan's updates of this
        call (churn noise for the next step included).

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
        dtype = sample.dtype if sample.dtype in _STATE_DTYPES else torch.promote_types(sample.dtype, torch.float32)
        if self._states is None:
            check_generator(generator, sample.shape[0])
            self._start_run(index)
        call = self._run_calls[index - self._run_offset]
        seen = None  # the input the model saw, where it is not the solver's state
        if self._states is None:
            prefix, skipped = _prefix_scales(self._run_plan)
            start_scale = call.state_scale * prefix[-1]
            if index == 0 and self._unit_noise_start and not self._noised_start:
                # a flow pipeline's pure noise N(0, I) where the first call is at a finite sigma
                # (a grid from sigma_max, or afs): the state is start_scale * z; D is the model's
                # estimate for the input it saw (the inputs differ by 1 / sigma, D by O(1 / sigma^2))
                seen = sample.to(dtype)
                state = seen * start_scale
                z = seen
            else:
                state = sample.to(dtype)
                z = state / start_scale  # the start noise
            self._states = deque([z * c for c in prefix[:-1]] + [state], maxlen=self._run_plan.state_history)
            self._denoised = deque([None] * skipped, maxlen=self._run_plan.denoised_history)
        elif sample is not self._returned:  # the pipeline changed the state (inpainting): take it
            self._states[-1] = sample.to(dtype)
        states, history = self._states, self._denoised
        output = mean_output(model_output, sample)
        if output.dtype != dtype:
            output = output.to(dtype)
        x_denoised = torch.mul(states[-1] if seen is None else seen, call.denoised[0]).add_(output, alpha=call.denoised[1])
        history.append(x_denoised)
        updates = call.updates
        if call.folding is not None:
            gram = motion_gram([history[-1 - j] for j in range(ADAPTIVE_LOOKBACK)])
            updates = _fold_updates(call.step.adapt(gram), *call.folding)
        for terms, noise_std in updates:
            new = weighted_sum([(w, (history if from_denoised else states)[-1 - k]) for w, from_denoised, k in terms],
                               states[-1])
            if noise_std:
                new.add_(randn(new.shape, generator, new.device, dtype), alpha=noise_std)
            states.append(new)
        prev_sample, pred_original_sample = states[-1], x_denoised
        if sample.dtype != dtype:
            pred_original_sample, prev_sample = x_denoised.to(sample.dtype), prev_sample.to(sample.dtype)
        self._returned = prev_sample
        self._step_index = index + 1
        if self._step_index == len(self._calls):
            self._check_finite(prev_sample)
        if not return_dict:
            return prev_sample, pred_original_sample
        return EDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _check_finite(self, final: torch.Tensor) -> None:
        """After the last call, one reduction and one host-device sync per generation: a warning
        if the samples hold NaN or inf (a model output went non-finite at some call; the core
        sampler, `samplers.sample`, checks every call and names the first)."""
        if not bool(torch.isfinite(final).all()):
            warnings.warn(
                "the samples are not finite (NaN or inf): the model returned non-finite values at some call; "
                "samplers.sample(...) on the same model names the first one",
                RuntimeWarning,
                stacklevel=3,
            )

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x = y + std * noise at the noise level of `timesteps`, in the state's scale (img2img).

        The level is the current call's (inpainting, mid-loop), else `begin_index`'s (img2img
        start), else each timestep is looked up in `self.timesteps`. At the first call of a
        step the churn is folded in (initial_noise_std), as at the start of sampling. At
        sigma = inf (a flow model's t = 1) the result is the noise itself.
        """
        if not self._calls:
            raise ValueError("call set_timesteps before add_noise")
        if self._step_index is not None:
            indices = [min(self._step_index, len(self._calls) - 1)]
        elif self._begin_index is not None:
            indices = [self._begin_index]
        else:
            indices = [self._index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
        dtype = torch.promote_types(original_samples.dtype, torch.float32)
        stds = [self._calls[k].start_std * self._calls[k].state_scale for k in indices]
        scales = [self._calls[k].signal_scale for k in indices]
        if len(set(indices)) == 1:
            std, scale = stds[0], scales[0]
        else:
            shape = (-1,) + (1,) * (original_samples.ndim - 1)
            std = torch.tensor(stds, dtype=dtype, device=original_samples.device).reshape(shape)
            scale = torch.tensor(scales, dtype=dtype, device=original_samples.device).reshape(shape)
        noisy = original_samples.to(dtype) * scale + noise.to(dtype) * std
        self._noised_start = True
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
            if abs(value - timestep) <= 1e-6 * max(1.0, abs(value)) and self._starts_grid_step(k):
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
