"""Low-NFE accuracy of the core solvers against the exact ODE solution from the same noise.

    PYTHONPATH=. python benchmarks/low_nfe_core.py [--samples 128] [--nfe 5 7 ...] [--all] [--truth zero|denoised]

Core only (`samplers.sample` over an exact D(x; sigma)), no diffusers schedulers. Every run
starts at sigma_max = 80 from x = 80 z and solves down a grid ending [..., sigma_min = 0.01, 0]
(0.01 is the smallest sigma of a DDPM model with 1000 linear betas), at a budget of NFE model
calls (Heun: N steps cost 2N - 1; multistep: N steps N calls, N + 1 steps under afs).

Truth (--truth): "zero" (default) is the exact ODE solution at sigma = 0 from the same noise,
x*(0). Solvers whose last step is the final denoise x = D(x; sigma_min) share a floor there,
|D(x*(0.01); 0.01) - x*(0)|, printed per oracle: Euler, Heun and the diffusers peer below
(final_step "denoise"). Every multistep solver here (DPM-Solver++ 2M / 3M, UniPC, iPNDM,
iPNDM-v, DEIS) by default ends on the denoised trajectory extrapolated to sigma = 0 (final_step
"extrapolate", `solvers.final_denoised`: D at its last two calls, which cancels the floor's
O(sigma_min^2) term; iPNDM, iPNDM-v and DEIS since commit 02da21b, before which they took their
Adams-Bashforth step to 0), so they can beat the floor. "denoised" is D(x*(0.01); 0.01): the
error of the ODE solve on [0.01, 80] alone, no floor.

Oracles (64 dimensions, shape 1x8x8):
  gaussian  `oracles.builtin_gaussian`: closed-form x*(sigma).
  mixture   5 anisotropic Gaussian components (std 0.03..0.5 per dimension, unequal weights).
  clusters  16 tight components (std 0.02..0.1) with spread means: close to a smoothed dataset.
For the mixtures D is the posterior-weighted mix of the components' Gaussian denoisers, and x*
comes from classic RK4 in u = log sigma (dx/du = x - D) in float64, 2048 steps from 80 to 0.01
and 2048 more to 1e-6 (x*(0) = x*(1e-6) to ~1e-12), checked against half the steps (the printed
difference bounds its error).

Reported: the median over samples of the per-sample RMSE; per oracle and NFE the best
configuration is starred and its error printed as a ratio to two named peers run here on the
same noise: "dpmpp_2m(diffusers)", DPM-Solver++(2M) on the Karras rho = 7 grid with its last
step x = D (final_step "denoise": what diffusers' DPMSolverMultistepScheduler(use_karras_sigmas=True)
computes; tests/test_solvers.py checks the parity), and EDM Heun on the same grid (the paper's
sampler). With --all, a last table scores
each solver's grids by the geometric mean, over oracles and NFEs, of its error / the best error
of any configuration there (1 = always best): the measurement behind each solver's default grid.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch

from edm_sampling.oracles import builtin_gaussian
from edm_sampling.samplers import sample
from edm_sampling.schedules import GITS_SIGMAS, sigma_grid
from edm_sampling.solvers import SOLVERS, solver_info

SIGMA_MIN, SIGMA_MAX = 0.01, 80.0
SHAPE = (1, 8, 8)
DEFAULT_NFE = (5, 7, 9, 13, 17, 25, 35, 63)


class MixtureOracle:
    """The exact denoiser of a mixture of axis-aligned Gaussians sum_k w_k N(mu_k, diag(lam_k)):
    D(x; sigma) = sum_k gamma_k(x) (mu_k + lam_k / (lam_k + sigma^2) (x - mu_k)), gamma_k the
    posterior of component k given x ~ N(mu_k, lam_k + sigma^2)."""

    sigma_min, sigma_max = 0.0, math.inf

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        self.log_weights = torch.log(weights / weights.sum()).double()
        self.means, self.variances = means.double(), variances.double()

    def __call__(self, x: torch.Tensor, sigma: Any, **unused: Any) -> torch.Tensor:
        flat = x.double().reshape(x.shape[0], 1, -1)
        sigma2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2
        total = self.variances + sigma2  # [B, K, dims]
        log_p = self.log_weights - 0.5 * (((flat - self.means) ** 2 / total) + torch.log(total)).sum(-1)
        gamma = torch.softmax(log_p, dim=1).unsqueeze(-1)
        component = self.means + self.variances / total * (flat - self.means)
        return (gamma * component).sum(1).reshape(x.shape).to(x.dtype)


def mixture(num_components: int, mean_scale: float, std_range: tuple[float, float], seed: int) -> MixtureOracle:
    """A fixed random mixture: means mean_scale * N(0, I), per-dimension std log-uniform in
    std_range, weights proportional to 1, 2, ..., K shuffled."""
    generator = torch.Generator().manual_seed(seed)
    dims = math.prod(SHAPE)
    means = mean_scale * torch.randn(num_components, dims, generator=generator, dtype=torch.float64)
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    stds = torch.exp(lo + (hi - lo) * torch.rand(num_components, dims, generator=generator, dtype=torch.float64))
    weights = torch.arange(1, num_components + 1, dtype=torch.float64)[torch.randperm(num_components, generator=generator)]
    return MixtureOracle(weights, means, stds**2)


def rk4_log_sigma(denoiser: Any, x: torch.Tensor, sigma_from: float, sigma_to: float, steps: int) -> torch.Tensor:
    """Classic RK4 on dx/du = x - D(x; e^u), u = log sigma, from sigma_from to sigma_to."""
    u, du = math.log(sigma_from), (math.log(sigma_to) - math.log(sigma_from)) / steps

    def f(x_: torch.Tensor, u_: float) -> torch.Tensor:
        return x_ - denoiser(x_, torch.full((x_.shape[0],), math.exp(u_), dtype=torch.float64))

    for _ in range(steps):
        k1 = f(x, u)
        k2 = f(x + 0.5 * du * k1, u + 0.5 * du)
        k3 = f(x + 0.5 * du * k2, u + 0.5 * du)
        k4 = f(x + du * k3, u + du)
        x = x + du / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        u += du
    return x


def median_rmse(x: torch.Tensor, truth: torch.Tensor) -> float:
    return statistics.median(((x - truth) ** 2).flatten(1).mean(1).sqrt().tolist())


def exact_solutions(name: str, denoiser: Any, x0: torch.Tensor, steps: int = 2048) -> tuple[torch.Tensor, torch.Tensor, str]:
    """x*(0.01) and x*(0) from x0 at sigma = 80, and a line on how they were obtained."""
    if name == "gaussian":
        return denoiser.ode_solution(x0, SIGMA_MAX, SIGMA_MIN), denoiser.ode_solution(x0, SIGMA_MAX, 0.0), "closed form"

    def solve(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        at_min = rk4_log_sigma(denoiser, x0, SIGMA_MAX, SIGMA_MIN, n)
        return at_min, rk4_log_sigma(denoiser, at_min, SIGMA_MIN, 1e-6, n)

    at_min, at_zero = solve(steps)
    check = max((a - b).abs().max().item() for a, b in zip(solve(steps // 2), (at_min, at_zero)))
    return at_min, at_zero, f"RK4 in log sigma, max |x*(half the steps) - x*| = {check:.1e}"


PEERS = (("dpmpp_2m(diffusers)", "dpmpp_2m", "karras", {"solver_options": {"final_step": "denoise"}}),
         ("heun", "heun", "karras", {}))
"""The named peers (label, solver, grid, solver options): DPM-Solver++(2M) as diffusers computes
it, and the paper's Heun."""
GRIDS = {"karras": {"rho": 7.0}, "logsnr": {}, "time_quadratic": {}, "time_uniform": {}, "ays": {}, "gits": {}}
"""ays: the SD1.5 list mapped log-affinely onto [0.01, 80]; gits: the published 6-step list (NFE 6, or 5 with afs)."""
VARIANTS = (("euler", {}), ("heun", {}), ("ipndm", {"order": 3}), ("ipndm", {"order": 4}), ("ipndm_v", {"order": 3}),
            ("ipndm_v", {"order": 4}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 2}),
            ("unipc", {"order": 3}), ("deis", {"order": 3}))


def configurations(everything: bool) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """(label, solver, schedule, schedule options, solver options): every solver with its
    defaults, the peers, and (with --all) every solver on every grid with and without afs."""
    configs = []
    for solver, options in VARIANTS:
        info = solver_info(solver)
        for grid, grid_options in GRIDS.items():
            default = grid == info.schedule and grid_options == info.schedule_options
            if not (everything or default):
                continue
            for afs in (False, True) if info.afs and solver != "euler" else (False,):
                label = solver + "".join(f"{v}" for v in options.values()) + ("+afs" if afs else "")
                configs.append((label, solver, grid, grid_options, {**options, **({"afs": True} if afs else {})}))
    present = {(label, grid) for label, _, grid, _, _ in configs}
    configs += [(label, solver, grid, GRIDS[grid], options) for label, solver, grid, options in PEERS
                if (label, grid) not in present]
    return configs


def run(solver: str, grid: str, grid_options: dict, solver_options: dict[str, Any], nfe: int, denoiser: Any,
        z: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(model calls, sample) of one configuration at a budget of `nfe` calls, from x = 80 z;
    (0, None) where the grid has no list of that many steps (gits)."""
    steps = SOLVERS[solver].steps_for_nfe(nfe, solver_options.get("afs", False))
    if grid == "gits" and (steps, "cifar10") not in {(n, d) for d, n in GITS_SIGMAS}:
        return 0, None
    sigmas = sigma_grid(grid, steps, SIGMA_MIN, SIGMA_MAX, **grid_options)
    out = sample(denoiser, z, sigmas, solver=solver, state_dtype=torch.float64, **solver_options)
    return out.nfe, out.sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFE))
    parser.add_argument("--all", action="store_true", help="every solver on every grid, with and without afs")
    parser.add_argument("--oracles", nargs="+", default=["gaussian", "mixture", "clusters"])
    parser.add_argument("--truth", choices=("zero", "denoised"), default="zero")
    args = parser.parse_args()
    torch.set_num_threads(1)
    oracles = {
        "gaussian": builtin_gaussian(),
        "mixture": mixture(5, 0.5, (0.03, 0.5), seed=1),
        "clusters": mixture(16, 0.6, (0.02, 0.1), seed=2),
    }
    z = torch.randn(args.samples, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    configs = configurations(args.all)
    scores: dict[tuple[str, str], list[float]] = {}
    for name in args.oracles:
        denoiser = oracles[name]
        start = time.perf_counter()
        at_min, at_zero, how = exact_solutions(name, denoiser, z * SIGMA_MAX)
        denoised = denoiser(at_min, torch.full((z.shape[0],), SIGMA_MIN, dtype=torch.float64))
        truth = at_zero if args.truth == "zero" else denoised
        label = "x*(0)" if args.truth == "zero" else "D(x*(0.01); 0.01)"
        print(f"\n=== {name}: median per-sample RMSE vs {label}, lower is better; x*: {how} "
              f"({time.perf_counter() - start:.0f} s); final-denoise floor |D(x*(0.01); 0.01) - x*(0)| = "
              f"{median_rmse(denoised, at_zero):.2e}")
        errors: dict[tuple[str, str], dict[int, float]] = {}
        for label, solver, grid, grid_options, options in configs:
            row = errors.setdefault((label, grid), {})
            for nfe in args.nfe:
                calls, x = run(solver, grid, grid_options, options, nfe, denoiser, z)
                row[nfe] = median_rmse(x, truth) if x is not None and calls <= nfe else math.nan
        best = {nfe: min((k for k in errors if not math.isnan(errors[k][nfe])), key=lambda k: errors[k][nfe]) for nfe in args.nfe}
        print(f"{'solver':20s} {'grid':15s}" + "".join(f"{n:>10d}" for n in args.nfe))
        for key, row in errors.items():
            cells = "".join(f"{row[n]:9.2e}{'*' if best[n] == key else ' '}" for n in args.nfe)
            print(f"{key[0]:20s} {key[1]:15s}{cells}")
            if key[1] in ("karras", "logsnr", "time_quadratic", "time_uniform"):
                scores.setdefault(key, []).extend(math.log(row[n] / errors[best[n]][n]) for n in args.nfe)
        for label, _, grid, _ in PEERS:
            ratios = "".join(f"{errors[best[n]][n] / errors[(label, grid)][n]:10.3f}" for n in args.nfe)
            print(f"{'best / ' + label + ' ' + grid:36s}{ratios}")
        print("best per NFE: " + ", ".join(f"{n}: {best[n][0]} {best[n][1]}" for n in args.nfe))
    if args.all:
        grids = ["karras", "logsnr", "time_quadratic", "time_uniform"]
        print(f"\n=== geometric mean of error / best error over {args.oracles} x NFE {args.nfe} (1 = always best)")
        print(f"{'solver':14s}" + "".join(f"{g:>16s}" for g in grids))
        for label in dict.fromkeys(key[0] for key in scores):
            cells = "".join(f"{math.exp(statistics.fmean(scores[(label, g)])):16.2f}" if (label, g) in scores else f"{'':16s}"
                            for g in grids)
            print(f"{label:14s}{cells}")


if __name__ == "__main__":
    main()
