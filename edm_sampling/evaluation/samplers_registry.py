"""The samplers a sweep compares, each run at a target number of model calls (NFE).

Every sampler is one `SamplerSpec` entry of `SAMPLERS`; adding "our solver X on grid G" (with
options such as an analytical first step) is one entry: `SamplerSpec("name", OURS, "...",
solver="X", discretization="G", solver_options={"afs": True}, saved_calls=1)`. Two runners
execute the entries:

- "core": `edm_sampling.samplers.sample(denoiser, latents, sigmas, solver=..., **options)` over
  the model's D(x; sigma), on the named grid (`schedules.sigma_grid`; None: the solver's own
  default, `solvers.SOLVERS[solver].schedule`) of the model's sampling range (EDM's 0.002..80
  clamped to the model's support).
- "scheduler": a plain diffusers denoising loop (`scale_model_input`, the model's epsilon
  network, `step`) over a scheduler built with `from_config` from the model's own scheduler
  config. It runs diffusers' schedulers and our `EDMScheduler` alike, so both are measured
  through the interface a pipeline uses, on the same discrete-time VP network.

Ours: Heun and Euler on the EDM (Karras, rho = 7) grid, Heun with churn (Algorithm 2), Heun on
the paper's VP, VE and iDDPM discretizations (the Figure 2 ablation), Heun through
`EDMScheduler` in the scheduler loop, every multistep solver of `solvers.SOLVERS` (iPNDM,
variable-step iPNDM, DPM-Solver++ 2M / 3M, UniPC, DEIS) on its default grid, each also with
the analytical first step (AFS: the first model call replaced by the data-mean estimate), and
the recommended configurations through `EDMScheduler` in the scheduler loop (what a pipeline
user gets): iPNDM (order 3, logsnr grid) and UniPC of order 3, each with and without AFS (the
best of ours per NFE range in benchmarks/low_nfe_accuracy.py); DPM-Solver++(3M) through
`EDMScheduler` is outside the default set (group "scheduler").

Groups (`SAMPLER_GROUPS`, usable in `--samplers` beside names): "default", the first screen
(the paper's Heun, the recommended EDMScheduler rows, diffusers' seven anchors); "paper", the
paper's samplers and ablations; "core", every row of the core runner; "scheduler", every
EDMScheduler row; "diffusers"; "all".

diffusers' anchors, each configured the way that gives it its full range and its documented
best low-step behaviour (read from the diffusers 0.42 sources):

- ddim: DDIMScheduler, eta = 0, `timestep_spacing="trailing"` (the first step at t = 999; the
  DDPM config's "leading" would start at t = 800 for 5 steps), `set_alpha_to_one=True` (the
  last step returns the clean estimate), no clipping.
- euler-karras / heun-karras: Euler / HeunDiscreteScheduler with `use_karras_sigmas=True`
  and `timestep_spacing="linspace"`. These two build the Karras grid between the sigmas of
  their spaced timesteps: "linspace" includes t = 999 and t = 0, so the grid spans the full
  0.01..157; "leading" would start at t = 800 (sigma 26) and "trailing" stop at sigma 0.72 at
  5 steps. `final_sigmas_type="zero"` (Euler; Heun always ends at 0). At one step "linspace"
  gives the single timestep t = 0: they start at sigma 0.01, not from the prior, and the report
  leaves such runs out of the best marks and the ratio lines (`report.PRIOR_START_FRACTION`).
- dpmpp-2m-karras / dpmpp-3m-karras: DPMSolverMultistepScheduler, dpmsolver++, order 2 / 3,
  midpoint solver type, Karras sigmas over the full trained range, `lower_order_final=True`
  (diffusers' advice for < 15 steps), `final_sigmas_type="zero"`.
- unipc-bh2-karras: UniPCMultistepScheduler, bh2, order 2 (diffusers' recommended for
  guided and unconditional sampling alike), Karras sigmas, `lower_order_final=True`,
  `final_sigmas_type="zero"`.
- deis-karras: DEISMultistepScheduler (logrho), order 3 (diffusers' advice for unconditional
  sampling), Karras sigmas, `lower_order_final=True`. It has no `final_sigmas_type`: it stops
  at the smallest trained sigma (0.01) and returns that state, and with Karras sigmas its
  last step has zero length (it repeats sigma 0.01), so one model call is wasted. It is still
  the best DEIS setting measured here: on the mixture and the Gaussian (64 samples, NFE 5 to
  35) its median error is 1.2x to 9x below DEIS with "trailing" or "linspace" timesteps, and
  order 3 beats order 2 from NFE 9 on.

The step count for a target NFE is the largest whose call count (`SamplerSpec.nfe_for_steps`)
is not above it; the NFE reported is the number of calls counted by wrapping the model, never
a formula.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

from ..safety import InvalidArgument

if TYPE_CHECKING:  # torch is imported when a sampler runs, so `edm-sampling --help` stays fast
    import torch

DEFAULT_NFE = (5, 9, 17, 35, 63)
OURS = "edm_sampling"
DIFFUSERS = "diffusers"
RUNNERS = ("core", "scheduler")


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler configuration (see the module docstring).

    N steps cost `calls_per_step * N - saved_calls` model calls: Heun-type samplers have
    calls_per_step 2 and save the second call of their last step (2N - 1); an analytical first
    step saves one call more.
    """

    name: str
    family: str
    description: str
    runner: str = "core"
    calls_per_step: int = 1
    saved_calls: int = 0
    stochastic: bool = False
    solver: str = "heun"
    discretization: str | None = "karras"
    solver_options: dict = field(default_factory=dict)
    churn: dict = field(default_factory=dict)
    scheduler_class: str = ""
    scheduler_kwargs: dict = field(default_factory=dict)
    state_space: str = "vp"
    schedule_file: str | None = None

    def nfe_for_steps(self, steps: int) -> int:
        """Model calls of `steps` steps."""
        return self.calls_per_step * steps - self.saved_calls

    def steps_for_nfe(self, nfe: int) -> int:
        """The step count whose call count is the largest not above `nfe` (at least 1 step)."""
        return max(1, (nfe + self.saved_calls) // self.calls_per_step)


PAPER_CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
"""The paper's Table 5 setting for an EDM-trained ImageNet-64 model, our default churn row."""

_HEUN = {"calls_per_step": 2, "saved_calls": 1}
MULTISTEP_SOLVERS = ("ipndm", "ipndm_v", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "adams_alpha", "adams_alpha_adaptive")
NO_AFS_SOLVERS = ("adams_alpha", "adams_alpha_adaptive")  # solvers.SolverInfo.afs is False (kept here: listing rows needs no torch)


def _multistep_rows() -> list[SamplerSpec]:
    """Each multistep solver on its default grid, then with the analytical first step (one call
    saved: N steps cost N - 1 calls). The solver's own description and grid name are added to
    the results' metadata when it runs (`describe`), so that listing the names needs no torch."""
    rows = []
    for solver in MULTISTEP_SOLVERS:
        name = "edm-" + solver.replace("_", "-")
        rows.append(SamplerSpec(name, OURS, f"solver {solver!r} on its default grid", solver=solver, discretization=None))
        if solver in NO_AFS_SOLVERS:
            continue
        rows.append(SamplerSpec(name + "-afs", OURS, f"solver {solver!r} on its default grid, analytical first step",
                                solver=solver, discretization=None, solver_options={"afs": True}, saved_calls=1))
    return rows


def edm_scheduler_row(name: str, description: str, solver: str, **options: Any) -> SamplerSpec:
    """`EDMScheduler(solver=solver, **options)` in the plain diffusers loop; `num_inference_steps`
    = N is N model calls for the multistep solvers (also under afs), N steps for heun (2N - 1)."""
    heun = solver == "heun"
    return SamplerSpec(name, OURS, description, runner="scheduler", scheduler_class="EDMScheduler",
                       scheduler_kwargs={"solver": solver, **options}, calls_per_step=2 if heun else 1,
                       saved_calls=1 if heun else 0)


def _recommended_rows() -> list[SamplerSpec]:
    """The configurations benchmarks/low_nfe_accuracy.py finds best per NFE range (the README's
    recommendation table), each on its solver's default grid through EDMScheduler."""
    return [
        edm_scheduler_row("edm-ipndm-scheduler", "EDMScheduler(solver='ipndm'): iPNDM order 3, logsnr grid", "ipndm"),
        edm_scheduler_row("edm-ipndm-afs-scheduler", "EDMScheduler(solver='ipndm', afs=True): iPNDM order 3, logsnr grid, "
                          "analytical first step", "ipndm", afs=True),
        edm_scheduler_row("edm-unipc3-scheduler", "EDMScheduler(solver='unipc', solver_order=3): UniPC bh2 order 3, logsnr grid",
                          "unipc", solver_order=3),
        edm_scheduler_row("edm-unipc3-afs-scheduler", "EDMScheduler(solver='unipc', solver_order=3, afs=True): UniPC bh2 "
                          "order 3, logsnr grid, analytical first step", "unipc", solver_order=3, afs=True),
        edm_scheduler_row("edm-adams-alpha-adaptive-scheduler", "EDMScheduler(solver='adams_alpha_adaptive'): adams_alpha "
                          "with the interpolation scale fitted per sample at every call, order 3, logsnr grid",
                          "adams_alpha_adaptive"),
    ]


def _other_scheduler_rows() -> list[SamplerSpec]:
    """EDMScheduler configurations outside the default set (groups "scheduler" and "all")."""
    return [edm_scheduler_row("edm-dpmpp-3m-scheduler", "EDMScheduler(solver='dpmpp_3m'): DPM-Solver++(3M), logsnr grid",
                              "dpmpp_3m"),
            edm_scheduler_row("edm-adams-alpha-scheduler", "EDMScheduler(solver='adams_alpha'): Adams predictor-corrector "
                              "in alpha, order 3, logsnr grid", "adams_alpha")]


_KARRAS_ZERO = {"use_karras_sigmas": True, "final_sigmas_type": "zero", "lower_order_final": True}

SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("edm-heun", OURS, "EDM Heun (Algorithm 1), Karras rho=7 grid", **_HEUN),
        SamplerSpec("edm-euler", OURS, "EDM Euler, Karras rho=7 grid", solver="euler"),
        SamplerSpec("edm-heun-churn", OURS, "EDM stochastic Heun (Algorithm 2), S_churn=40 S_tmin=0.05 S_tmax=50 S_noise=1.003",
                    stochastic=True, churn=PAPER_CHURN, **_HEUN),
        SamplerSpec("edm-heun-vp", OURS, "Heun on the original VP discretization (ablation)", discretization="vp", **_HEUN),
        SamplerSpec("edm-heun-ve", OURS, "Heun on the original VE discretization (ablation)", discretization="ve", **_HEUN),
        SamplerSpec("edm-heun-iddpm", OURS, "Heun on the iDDPM discretization (ablation)", discretization="iddpm", **_HEUN),
        *_multistep_rows(),
        edm_scheduler_row("edm-heun-scheduler", "EDMScheduler (Heun, rho=7) in the plain diffusers loop on the epsilon network",
                          "heun"),
        *_recommended_rows(),
        *_other_scheduler_rows(),
        SamplerSpec("ddim", DIFFUSERS, "DDIMScheduler (eta=0, trailing timesteps)", runner="scheduler",
                    scheduler_class="DDIMScheduler",
                    scheduler_kwargs={"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False}),
        SamplerSpec("euler-karras", DIFFUSERS, "EulerDiscreteScheduler (Karras sigmas, linspace timesteps)", runner="scheduler",
                    scheduler_class="EulerDiscreteScheduler", state_space="edm",
                    scheduler_kwargs={"use_karras_sigmas": True, "timestep_spacing": "linspace", "final_sigmas_type": "zero"}),
        SamplerSpec("heun-karras", DIFFUSERS, "HeunDiscreteScheduler (Karras sigmas, linspace timesteps)", runner="scheduler",
                    scheduler_class="HeunDiscreteScheduler", state_space="edm",
                    scheduler_kwargs={"use_karras_sigmas": True, "timestep_spacing": "linspace"}, **_HEUN),
        SamplerSpec("dpmpp-2m-karras", DIFFUSERS, "DPMSolverMultistepScheduler (dpmsolver++, order 2, Karras sigmas)",
                    runner="scheduler", scheduler_class="DPMSolverMultistepScheduler",
                    scheduler_kwargs={"algorithm_type": "dpmsolver++", "solver_order": 2, **_KARRAS_ZERO}),
        SamplerSpec("dpmpp-3m-karras", DIFFUSERS, "DPMSolverMultistepScheduler (dpmsolver++, order 3, Karras sigmas)",
                    runner="scheduler", scheduler_class="DPMSolverMultistepScheduler",
                    scheduler_kwargs={"algorithm_type": "dpmsolver++", "solver_order": 3, **_KARRAS_ZERO}),
        SamplerSpec("unipc-bh2-karras", DIFFUSERS, "UniPCMultistepScheduler (bh2, order 2, Karras sigmas)", runner="scheduler",
                    scheduler_class="UniPCMultistepScheduler", scheduler_kwargs={"solver_type": "bh2", "solver_order": 2, **_KARRAS_ZERO}),
        SamplerSpec("deis-karras", DIFFUSERS, "DEISMultistepScheduler (logrho, order 3, Karras sigmas; stops at sigma 0.01)",
                    runner="scheduler", scheduler_class="DEISMultistepScheduler",
                    scheduler_kwargs={"solver_order": 3, "use_karras_sigmas": True, "lower_order_final": True}),
    )
}


def ours_names() -> list[str]:
    """Names of our samplers that run on any D(x; sigma) (the core runner): what `tune` accepts."""
    return [n for n, s in SAMPLERS.items() if s.family == OURS and s.runner == "core"]


SAMPLER_GROUPS: dict[str, tuple[str, ...]] = {
    "default": ("edm-heun", *(s.name for s in _recommended_rows()), *(n for n, s in SAMPLERS.items() if s.family == DIFFUSERS)),
    "paper": ("edm-heun", "edm-euler", "edm-heun-churn", "edm-heun-vp", "edm-heun-ve", "edm-heun-iddpm", "edm-heun-scheduler"),
    "core": tuple(ours_names()),
    "scheduler": tuple(n for n, s in SAMPLERS.items() if s.family == OURS and s.runner == "scheduler"),
    "diffusers": tuple(n for n, s in SAMPLERS.items() if s.family == DIFFUSERS),
    "all": tuple(SAMPLERS),
}
"""Named sets for `--samplers` (see the module docstring)."""
DEFAULT_SAMPLERS = SAMPLER_GROUPS["default"]


def expand_sampler_names(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Group names replaced by their members, in order, without repeats (the default group when
    None or empty); a ValueError lists the groups and names for an unknown one."""
    expanded = []
    for name in names or ["default"]:
        if name not in SAMPLER_GROUPS and name not in SAMPLERS:
            raise InvalidArgument("samplers", f"unknown sampler or group {name!r}; groups: {', '.join(SAMPLER_GROUPS)}; "
                                              f"samplers: {', '.join(sorted(SAMPLERS))}")
        expanded += SAMPLER_GROUPS.get(name, (name,))
    return list(dict.fromkeys(expanded))


def resolve_samplers(names: list[str] | tuple[str, ...] | None) -> list[SamplerSpec]:
    """Specs for the given names and groups (the default group when None)."""
    return [SAMPLERS[n] for n in expand_sampler_names(names)]


def sampler_set_line(names: list[str] | tuple[str, ...] | None, ran: list[str], added: list[str] = (),
                     schedule_file: str | None = None) -> str:
    """The first line of bench's report: which set ran (`ran`: the rows' names, `added` among
    them from `schedule_file`) and how to see the others."""
    asked = list(names or ["default"])
    groups = [n for n in asked if n in SAMPLER_GROUPS]
    label = f"the {' + '.join(groups)} set" if len(groups) == len(asked) else "the samplers named with --samplers"
    if asked == ["default"]:
        label += ", the paper's Heun (edm-heun), our recommended EDMScheduler configurations and diffusers' seven anchors"
    own = [n for n in ran if n not in added]
    line = f"samplers: {label} ({len(own)} row{'' if len(own) == 1 else 's'})"
    if added:
        line += f", plus {', '.join(added)} for --schedule-file {schedule_file}"
    others = " | ".join(g for g in SAMPLER_GROUPS if g not in groups)
    return line + f". Others: --samplers {others} | NAME,... (edm-sampling bench --help lists every name)"


def core_rows(specs: list[SamplerSpec], explicit: list[str]) -> tuple[list[SamplerSpec], list[str]]:
    """For a model without the diffusers loop: scheduler rows not named in `explicit` replaced
    by their core equivalent (kept once) or, for diffusers' schedulers, dropped. Returns (rows,
    names dropped)."""
    kept, skipped = [], []
    for spec in specs:
        if spec.runner == "scheduler" and spec.name not in explicit:
            twin = core_equivalent(spec)
            if twin is None:
                skipped.append(spec.name)
                continue
            spec = twin
        if spec.name not in {k.name for k in kept}:
            kept.append(spec)
    return kept, skipped


def core_equivalent(spec: SamplerSpec) -> SamplerSpec | None:
    """For an EDMScheduler row, the core-runner row with the same solver, options and grid (the
    registry's own where one exists): what runs on models without the diffusers loop (VE, EDM).
    None for diffusers' schedulers."""
    if spec.scheduler_class != "EDMScheduler":
        return None
    options = dict(spec.scheduler_kwargs)
    solver = options.pop("solver", "heun")
    order = options.pop("solver_order", None)
    solver_options = {**({"order": order} if order is not None else {}), **options}
    schedule_file = solver_options.pop("schedule_file", None)
    name = spec.name.removesuffix("-scheduler")
    twin = replace(spec, name=name, runner="core", scheduler_class="", scheduler_kwargs={}, solver=solver,
                   discretization="karras" if solver == "heun" else None, solver_options=solver_options,
                   schedule_file=schedule_file, saved_calls=spec.calls_per_step - 1 + (1 if options.get("afs") else 0))
    known = SAMPLERS.get(name)
    same = known is not None and (known.solver, known.discretization, known.solver_options, known.schedule_file) == (
        twin.solver, twin.discretization, twin.solver_options, twin.schedule_file)
    return known if same else twin


def with_churn(spec: SamplerSpec, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> SamplerSpec:
    """A copy of one of our core samplers with the given churn setting (used by `tune`)."""
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    name = f"{spec.name}[churn={s_churn:g},tmin={s_tmin:g},tmax={s_tmax:g},noise={s_noise:g}]"
    return replace(spec, name=name, stochastic=s_churn > 0, churn=churn)


class CountingModel:
    """Wraps a model and counts its calls: the NFE a sampler actually spent."""

    def __init__(self, model: Callable[..., Any]):
        self.model = model
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """The model's own attributes (sigma_min, sigma_max, round_sigma, config, ...)."""
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


@dataclass
class RunOutput:
    """A sampler's samples, its counted NFE, its step count, and its start (x_0 = start_scale *
    latents at noise level start_sigma, in the model's EDM space) for the reference solution."""

    sample: torch.Tensor
    nfe: int
    steps: int
    seconds: float
    start_sigma: float | None
    start_scale: float | None


def run_sampler(
    spec: SamplerSpec,
    model,
    latents: torch.Tensor,
    steps: int,
    generators: list[torch.Generator],
    model_kwargs: dict[str, Any] | None = None,
) -> RunOutput:
    """Sample `latents` (one row per seed, N(0, I)) with `spec` in `steps` steps."""
    if spec.runner == "core":
        return _run_core(spec, model, latents, steps, generators, model_kwargs or {})
    return _run_scheduler(spec, model, latents, steps, generators, model_kwargs or {})


def _run_core(spec, model, latents, steps, generators, model_kwargs) -> RunOutput:
    import torch

    from ..samplers import initial_noise_std, sample

    sigmas = core_sigmas(spec, steps, model.sigma_min, model.sigma_max)
    counter = CountingModel(model.denoiser)
    round_sigma = getattr(model.denoiser, "round_sigma", None)
    start = time.perf_counter()
    with torch.no_grad():
        out = sample(counter, latents, sigmas, solver=spec.solver, generator=generators,
                     model_kwargs=model_kwargs, round_sigma=round_sigma, **spec.solver_options, **spec.churn)
    seconds = time.perf_counter() - start
    if counter.calls != out.nfe:
        raise RuntimeError(f"{spec.name}: counted {counter.calls} model calls but the sampler reported {out.nfe}")
    sigma0, hat0 = float(out.sigmas[0]), float(out.sigma_hats[0])
    scale = initial_noise_std(sigma0, hat0, spec.churn.get("s_noise", 1.0))
    return RunOutput(out.sample, counter.calls, steps, seconds, hat0, scale)


def describe(spec: SamplerSpec) -> str:
    """The spec's description, with the solver's own and its grid's name for core runs on the
    solver's default grid."""
    if spec.runner != "core" or spec.discretization is not None or spec.schedule_file is not None:
        return spec.description
    from ..solvers import solver_info

    info = solver_info(spec.solver)
    return f"{spec.description}: {info.description}; {info.schedule} grid"


def core_sigmas(spec: SamplerSpec, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The core runner's grid: the spec's schedule file's grid of `steps` steps, else
    `spec.discretization` (rho 7 for "karras"), or the solver's own default schedule with its
    options when that is None, over [sigma_min, sigma_max]."""
    from ..schedules import discretization, sigma_grid
    from ..solvers import solver_info

    if spec.schedule_file is not None:
        from ..schedules import read_schedule_file

        return read_schedule_file(spec.schedule_file, "--schedule-file").grid_for_steps(steps, "--schedule-file")
    if spec.discretization is not None:
        return discretization(spec.discretization, steps, sigma_min, sigma_max)
    info = solver_info(spec.solver)
    return sigma_grid(info.schedule, steps, sigma_min, sigma_max, **info.schedule_options)


def scheduler_class(name: str):
    """A scheduler class by name: ours (`EDMScheduler`) or diffusers'."""
    if name == "EDMScheduler":
        from ..schedulers import EDMScheduler

        return EDMScheduler
    import diffusers

    return getattr(diffusers, name)


def build_scheduler(spec: SamplerSpec, scheduler_config: dict):
    """`spec.scheduler_class` from the model's scheduler config plus the spec's options, as a
    user swaps schedulers: `Class.from_config(config, **options)`. EDMScheduler's warning
    that it ignores the DDPM config's own sampling options (timestep spacing, clipping) is
    silenced here: the bench knows, and it would repeat for every run."""
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    with warnings.catch_warnings():
        if spec.scheduler_class == "EDMScheduler":
            warnings.simplefilter("ignore", UserWarning)
        return scheduler_class(spec.scheduler_class).from_config(config, **spec.scheduler_kwargs)


def _start_of(scheduler, spec: SamplerSpec) -> tuple[float, float]:
    """(sigma, scale) of the loop's first state in EDM space: x_edm = scale * latents.

    EDMScheduler states it exactly: its plan starts at sigma_hats[0] from init_std * latents
    (under afs the first call is one step later, at a state the plan derives from that start)."""
    plan = getattr(scheduler, "plan", None)
    if plan is not None:
        return float(plan.sigma_hats[0]), float(plan.init_std)
    init = float(scheduler.init_noise_sigma)
    hats = getattr(scheduler, "sigma_hats", None)  # EDMScheduler: the first call's (churned) level
    sigmas = hats if hats is not None else getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > 0:
        sigma = float(sigmas[0])
    else:
        from ..schedules import alphas_cumprod_to_sigmas

        sigma = float(alphas_cumprod_to_sigmas(scheduler.alphas_cumprod[int(scheduler.timesteps[0])]))
    if spec.state_space == "edm":
        return sigma, init
    return sigma, init * math.sqrt(sigma**2 + 1)


def _run_scheduler(spec, model, latents, steps, generators, model_kwargs) -> RunOutput:
    import torch

    from ..denoisers import network_output

    if model.unet is None or model.scheduler_config is None:
        raise InvalidArgument("samplers", f"{spec.name} needs a discrete VP (DDPM-family) model; {model.name} is not one")
    scheduler = build_scheduler(spec, model.scheduler_config)
    scheduler.set_timesteps(steps, device=latents.device)
    # as pipelines do: pass the per-sample generators only to a `step` that takes them
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    counter = CountingModel(model.unet)
    start_sigma, start_scale = _start_of(scheduler, spec)
    start = time.perf_counter()
    with torch.no_grad():
        x = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            output = network_output(counter(model_input, t, **model_kwargs))
            x = scheduler.step(output.to(x.dtype), t, x, return_dict=False, **extra)[0]
    seconds = time.perf_counter() - start
    return RunOutput(x, counter.calls, steps, seconds, start_sigma, start_scale)
