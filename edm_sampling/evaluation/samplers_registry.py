"""The samplers a sweep compares, each run at a target number of model calls (NFE).

Ours (`edm_sampling.samplers.sample` over D(x; sigma)): Heun and Euler on the EDM (Karras,
rho = 7) grid, Heun with churn (Algorithm 2), and Heun on the paper's original VP, VE and
iDDPM discretizations of the same sigma range (the Figure 2 ablation).

diffusers' own, driven by a plain denoising loop over the scheduler with the model's
epsilon network: DDIM, DPM-Solver++ 2M (Karras sigmas), Euler (Karras), Heun (Karras), UniPC.
Each is built with `from_config` from the model's scheduler config and
`timestep_spacing="trailing"`, so that every one starts from the model's largest noise level:
a DDPM config's "leading" spacing would start Euler / Heun / UniPC well below it at low step
counts (e.g. sigma 0.01 for one Euler step), which measures the spacing, not the solver.

The step count for a target NFE is chosen per sampler (Heun-type: N steps cost 2N - 1 calls,
so N = (NFE + 1) // 2; the others one call per step), and the NFE reported is the number of
calls counted by wrapping the model, never a formula.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported when a sampler runs, so `edm-sampling --help` stays fast
    import torch

DEFAULT_NFE = (5, 9, 17, 35, 63, 99)
OURS = "edm_sampling"
DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler configuration. `calls_per_step` 2 means N steps cost 2N - 1 calls."""

    name: str
    family: str
    description: str
    calls_per_step: int = 1
    stochastic: bool = False
    solver: str = "heun"
    discretization: str = "karras"
    churn: dict = field(default_factory=dict)
    scheduler_class: str = ""
    scheduler_kwargs: dict = field(default_factory=dict)
    state_space: str = "vp"

    def steps_for_nfe(self, nfe: int) -> int:
        """The step count whose call count is the largest not above `nfe` (at least 1 step)."""
        if self.calls_per_step == 2:
            return max(1, (nfe + 1) // 2)
        return max(1, nfe)


PAPER_CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
"""The paper's Table 5 setting for an EDM-trained ImageNet-64 model, our default churn row."""

SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("edm-heun", OURS, "EDM Heun (Algorithm 1), Karras rho=7 grid", 2),
        SamplerSpec("edm-euler", OURS, "EDM Euler, Karras rho=7 grid", 1, solver="euler"),
        SamplerSpec("edm-heun-churn", OURS, "EDM stochastic Heun (Algorithm 2), S_churn=40 S_tmin=0.05 S_tmax=50 S_noise=1.003",
                    2, stochastic=True, churn=PAPER_CHURN),
        SamplerSpec("edm-heun-vp", OURS, "Heun on the original VP discretization (ablation)", 2, discretization="vp"),
        SamplerSpec("edm-heun-ve", OURS, "Heun on the original VE discretization (ablation)", 2, discretization="ve"),
        SamplerSpec("edm-heun-iddpm", OURS, "Heun on the iDDPM discretization (ablation)", 2, discretization="iddpm"),
        SamplerSpec("ddim", DIFFUSERS, "diffusers DDIMScheduler (eta=0, trailing timesteps)", 1,
                    scheduler_class="DDIMScheduler"),
        SamplerSpec("dpmpp-2m-karras", DIFFUSERS, "diffusers DPMSolverMultistepScheduler (dpmsolver++, order 2, Karras sigmas)", 1,
                    scheduler_class="DPMSolverMultistepScheduler",
                    scheduler_kwargs={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
        SamplerSpec("euler-karras", DIFFUSERS, "diffusers EulerDiscreteScheduler (Karras sigmas)", 1,
                    scheduler_class="EulerDiscreteScheduler", scheduler_kwargs={"use_karras_sigmas": True}, state_space="edm"),
        SamplerSpec("heun-karras", DIFFUSERS, "diffusers HeunDiscreteScheduler (Karras sigmas)", 2,
                    scheduler_class="HeunDiscreteScheduler", scheduler_kwargs={"use_karras_sigmas": True}, state_space="edm"),
        SamplerSpec("unipc", DIFFUSERS, "diffusers UniPCMultistepScheduler (bh2, order 2)", 1,
                    scheduler_class="UniPCMultistepScheduler"),
    )
}
DEFAULT_SAMPLERS = tuple(SAMPLERS)


def resolve_samplers(names: list[str] | tuple[str, ...] | None) -> list[SamplerSpec]:
    """Specs for the given names (all when None); a ValueError lists the known names."""
    names = list(names) if names else list(DEFAULT_SAMPLERS)
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise ValueError(f"--samplers: unknown sampler(s) {unknown}; choose from {sorted(SAMPLERS)}")
    return [SAMPLERS[n] for n in dict.fromkeys(names)]


def with_churn(spec: SamplerSpec, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> SamplerSpec:
    """A copy of one of our samplers with the given churn setting (used by `tune`)."""
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    name = f"{spec.name}[churn={s_churn:g},tmin={s_tmin:g},tmax={s_tmax:g},noise={s_noise:g}]"
    return SamplerSpec(name, spec.family, spec.description, spec.calls_per_step, stochastic=s_churn > 0,
                       solver=spec.solver, discretization=spec.discretization, churn=churn)


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
    if spec.family == OURS:
        return _run_ours(spec, model, latents, steps, generators, model_kwargs or {})
    return _run_diffusers(spec, model, latents, steps, model_kwargs or {})


def _run_ours(spec, model, latents, steps, generators, model_kwargs) -> RunOutput:
    import torch

    from ..samplers import initial_noise_std, sample
    from ..schedules import discretization

    sigmas = discretization(spec.discretization, steps, model.sigma_min, model.sigma_max)
    counter = CountingModel(model.denoiser)
    round_sigma = getattr(model.denoiser, "round_sigma", None)
    start = time.perf_counter()
    with torch.no_grad():
        out = sample(counter, latents, sigmas, solver=spec.solver, generator=generators,
                     model_kwargs=model_kwargs, round_sigma=round_sigma, **spec.churn)
    seconds = time.perf_counter() - start
    if counter.calls != out.nfe:
        raise RuntimeError(f"{spec.name}: counted {counter.calls} model calls but the sampler reported {out.nfe}")
    sigma0, hat0 = float(out.sigmas[0]), float(out.sigma_hats[0])
    scale = initial_noise_std(sigma0, hat0, spec.churn.get("s_noise", 1.0))
    return RunOutput(out.sample, counter.calls, steps, seconds, hat0, scale)


def build_scheduler(spec: SamplerSpec, scheduler_config: dict):
    """diffusers scheduler `spec.scheduler_class` from the model's scheduler config plus the spec's options."""
    import diffusers

    cls = getattr(diffusers, spec.scheduler_class)
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"
    config.update(spec.scheduler_kwargs)
    return cls.from_config(config)


def _start_of(scheduler, spec: SamplerSpec) -> tuple[float, float]:
    """(sigma, scale) of the loop's first state in EDM space: x_edm = scale * latents."""
    init = float(scheduler.init_noise_sigma)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > 0:
        sigma = float(sigmas[0])
    else:
        from ..schedules import alphas_cumprod_to_sigmas

        sigma = float(alphas_cumprod_to_sigmas(scheduler.alphas_cumprod[int(scheduler.timesteps[0])]))
    if spec.state_space == "edm":
        return sigma, init
    return sigma, init * math.sqrt(sigma**2 + 1)


def _run_diffusers(spec, model, latents, steps, model_kwargs) -> RunOutput:
    import torch

    from ..denoisers import network_output

    if model.unet is None or model.scheduler_config is None:
        raise ValueError(f"--samplers: {spec.name} needs a discrete VP (DDPM-family) model; {model.name} is not one")
    scheduler = build_scheduler(spec, model.scheduler_config)
    scheduler.set_timesteps(steps, device=latents.device)
    counter = CountingModel(model.unet)
    start_sigma, start_scale = _start_of(scheduler, spec)
    start = time.perf_counter()
    with torch.no_grad():
        x = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            output = network_output(counter(model_input, t, **model_kwargs))
            x = scheduler.step(output.to(x.dtype), t, x, return_dict=False)[0]
    seconds = time.perf_counter() - start
    return RunOutput(x, counter.calls, steps, seconds, start_sigma, start_scale)
