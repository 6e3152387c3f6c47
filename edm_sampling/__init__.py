"""EDM sampling and training (Karras et al. 2022) for the diffusers ecosystem.

`import edm_sampling` is light: the names below load their module on first use. The core
(`schedules`, `samplers`, `families`, `denoisers`, `oracles`) needs torch only; `schedulers`, `pipelines`
and `oracle_unet` use diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "karras_sigmas": "schedules",
    "vp_sigmas": "schedules",
    "ve_sigmas": "schedules",
    "iddpm_sigmas": "schedules",
    "logsnr_sigmas": "schedules",
    "sigma_grid": "schedules",
    "SOLVERS": "solvers",
    "make_plan": "solvers",
    "solver_sigmas": "solvers",
    "execute_plan": "samplers",
    "sample": "samplers",
    "sample_heun": "samplers",
    "sample_euler": "samplers",
    "sample_stochastic": "samplers",
    "sample_ablation": "samplers",
    "denoiser_sigmas": "samplers",
    "SamplerOutput": "samplers",
    "Denoiser": "denoisers",
    "DiscreteVPDenoiser": "denoisers",
    "ContinuousVPDenoiser": "denoisers",
    "VEDenoiser": "denoisers",
    "EDMDenoiser": "denoisers",
    "FlowDenoiser": "denoisers",
    "PreconditionedDenoiser": "denoisers",
    "family_from_scheduler_config": "families",
    "GaussianOracle": "oracles",
    "GaussianMixtureOracle": "oracles",
    "solve_probability_flow_ode": "oracles",
    "FiniteDataOracle": "oracles",
    "builtin_oracle": "oracles",
    "OracleUNet2DModel": "oracle_unet",
    "EDMScheduler": "schedulers",
    "EDMPipeline": "pipelines",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
