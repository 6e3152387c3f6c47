"""Every solver through EDMScheduler: the scheduler executes the same plan as the core loop.

For each model family (discrete VP epsilon, EDM, flow matching) an exact network of a Gaussian
oracle is run in the plain diffusers denoising loop with EDMScheduler, and in the core sampler
(`samplers.sample` over the family's D) on the scheduler's grid with the same noise: the samples
agree to 1e-6 and the model calls match `num_inference_steps` (N for every multistep solver, with
afs too; 2N - 1 for Heun). Plus the new options' config round trips, and their bad input.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from edm_sampling import samplers
from edm_sampling.denoisers import PreconditionedDenoiser
from edm_sampling.oracles import GaussianOracle
from edm_sampling.schedulers import EDMScheduler
from tiny_models import FirstCallSeesUnitNoise
from edm_sampling.schedules import SCHEDULES, schedule_file_json
from edm_sampling.solvers import SOLVERS


def _oracle() -> GaussianOracle:
    g = torch.Generator().manual_seed(0)
    mean = 0.3 * torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    variance = 0.01 + torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    return GaussianOracle(mean, variance)


ORACLE = _oracle()


class ExactNet(torch.nn.Module):
    """The network F of `family` whose D is the Gaussian oracle's: F = (D(x) - c_skip x) / c_out,
    reading sigma back from the network's time input (by the family's own inverse tables)."""

    def __init__(self, family, sigma_of_net_time):
        super().__init__()
        self.family, self.sigma_of_net_time = family, sigma_of_net_time

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, **unused) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(x_in.shape[0])
        sigma = self.sigma_of_net_time(t)
        c = self.family.coefficients(sigma.reshape(-1, 1, 1, 1))
        x = x_in.double() / c.c_in
        # at sigma = inf (a flow model's t = 1) the ideal denoiser is the data mean
        denoised = torch.where(torch.isinf(sigma).reshape(-1, 1, 1, 1), ORACLE.mean, ORACLE(x, sigma))
        output = (denoised - c.c_skip * x) / c.c_out
        if type(self.family).__name__ == "VE":  # pragma: no cover (not parametrized)
            raise NotImplementedError
        if getattr(self.family, "prediction_type", None) == "v_prediction" and type(self.family).__name__ == "EDM":
            output = -output
        return output.to(x_in.dtype)


def _discrete_vp():
    scheduler_config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    family = EDMScheduler.from_config(scheduler_config).family
    return scheduler_config, ExactNet(family, family.sigma_of_time)


def _edm():
    config = {"model_family": "edm", "sigma_data": 0.5}
    family = EDMScheduler(**config).family
    return config, ExactNet(family, lambda t: torch.exp(4 * t))


def _flow():
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    family = EDMScheduler.from_config(config).family
    return config, ExactNet(family, lambda t: (t / 1000) / (1 - t / 1000))


FAMILIES = {"discrete_vp": _discrete_vp, "edm": _edm, "flow": _flow}
CASES = [
    {"solver": "heun"},
    {"solver": "euler"},
    {"solver": "ipndm"},
    {"solver": "ipndm", "afs": True},
    {"solver": "ipndm_v", "solver_order": 3},
    {"solver": "dpmpp_2m"},
    {"solver": "dpmpp_2m", "afs": True},
    {"solver": "dpmpp_3m"},
    {"solver": "unipc", "solver_order": 3},
    {"solver": "unipc", "afs": True},
    {"solver": "deis"},
    {"solver": "adams_alpha"},
    {"solver": "adams_alpha", "solver_order": 2},
    {"solver": "adams_alpha_adaptive"},
    {"solver": "heun", "schedule": "logsnr"},
    {"solver": "unipc", "schedule": "time_uniform"},
]


def _loop(scheduler: EDMScheduler, net, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain diffusers loop (as DDPMPipeline / SD run it), counting model calls."""
    x, calls = noise * scheduler.init_noise_sigma, 0
    for t in scheduler.timesteps:
        output = net(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        calls += 1
        x = scheduler.step(output, t, x, return_dict=False)[0]
    return x, calls


def _case_id(case: dict) -> str:
    return "-".join(f"{v}" if k == "solver" else f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_scheduler_equals_core_for_every_solver(family_name, case):
    config, net = FAMILIES[family_name]()
    scheduler = EDMScheduler.from_config(config, **case)
    n = 7
    scheduler.set_timesteps(n)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, calls = _loop(scheduler, net, noise)
    assert calls == len(scheduler.timesteps) == (2 * n - 1 if case["solver"] == "heun" else n)
    assert scheduler.order == SOLVERS[case["solver"]].calls_per_step

    reference_class = FirstCallSeesUnitNoise if family_name == "flow" else PreconditionedDenoiser
    denoiser = reference_class(net, scheduler.family)
    ref = samplers.sample(denoiser, noise, scheduler.sigmas.double(), solver=case["solver"],
                          order=case.get("solver_order"), afs=case.get("afs", False))
    assert ref.nfe == calls
    torch.testing.assert_close(out, ref.sample, rtol=1e-6, atol=1e-6)


def test_default_grids_are_the_solvers_own():
    """num_inference_steps = N: the solver's default schedule over the sampling range, N calls
    (N + 1 grid steps under afs); heun keeps EDM's rho = 7 grid."""
    from edm_sampling.schedules import sigma_grid

    config = DDPMScheduler().config
    for solver, info in SOLVERS.items():
        scheduler = EDMScheduler.from_config(config, solver=solver)
        scheduler.set_timesteps(6)
        lo, hi = scheduler.sigma_range
        options = dict(info.schedule_options)
        if info.schedule.startswith("time_"):
            options.update(sigma_to_t=scheduler.family.time_of_sigma, t_to_sigma=scheduler.family.sigma_of_time)
        expected = sigma_grid(info.schedule, 6, lo, hi, **options)
        torch.testing.assert_close(scheduler.sigmas.double(), expected.float().double(), rtol=1e-6, atol=0)
    afs = EDMScheduler.from_config(config, solver="dpmpp_2m", afs=True)
    afs.set_timesteps(6)
    assert len(afs.sigmas) == 8 and len(afs.timesteps) == 6
    assert afs.init_noise_sigma == pytest.approx(float(afs.sigmas[1]) / math.sqrt(float(afs.sigmas[1]) ** 2 + 1), rel=1e-6)


def test_afs_scheduler_is_exact_when_the_data_mean_is_zero():
    """With D = 0 everywhere (data = one point at 0) every solver's result is 0; afs too."""
    scheduler = EDMScheduler(solver="ipndm", afs=True, model_family="edm")
    scheduler.set_timesteps(4)
    x = torch.randn(2, 2, 4, 4) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        # EDM: D = c_skip x + c_out F = 0  <=>  F = -c_skip x / c_out
        sigma = math.exp(4 * float(t))
        x_edm = x * math.sqrt(sigma**2 + 0.25)
        output = -(0.25 / (sigma**2 + 0.25)) * x_edm / (sigma * 0.5 / math.sqrt(sigma**2 + 0.25))
        x = scheduler.step(output, t, x).prev_sample
    torch.testing.assert_close(x, torch.zeros_like(x), atol=1e-5, rtol=0)


def test_schedule_file_round_trip(tmp_path):
    grid = [80.0, 9.0, 1.5, 0.2, 0.01, 0.0]
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(schedule_file_json([grid, [80.0, 1.0, 0.01, 0.0]], solver="unipc", model="test")))
    scheduler = EDMScheduler(solver="unipc", schedule_file=str(path))
    scheduler.set_timesteps(5)
    assert scheduler.sigmas.tolist() == pytest.approx(grid)
    scheduler.set_timesteps(3)
    assert len(scheduler.sigmas) == 4
    with pytest.raises(ValueError, match="schedule_file: holds grids of \\[3, 5\\] steps"):
        scheduler.set_timesteps(4)
    scheduler.save_config(tmp_path / "saved")
    loaded = EDMScheduler.from_pretrained(tmp_path / "saved")
    assert loaded.config.schedule_file == str(path)
    loaded.set_timesteps(5)
    assert loaded.sigmas.tolist() == pytest.approx(grid)


def test_schedule_file_of_another_model_or_solver(tmp_path):
    """A grid searched on a model with another noise range is refused at construction, naming the
    file; one searched for another solver is used, with a warning."""
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(schedule_file_json([[80.0, 6.0, 0.5, 0.03, 0.0]], solver="ipndm", model="mixture")))
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config  # sigma 0.029 .. 14.6
    with pytest.raises(ValueError, match=r"schedule_file: .*schedule\.json \(searched on 'mixture'\) has a grid "
                                         r"spanning \[0\.03, 80\], but this model supports \[0\.0291672, 14\.6146\]"):
        EDMScheduler.from_config(sd, solver="ipndm", schedule_file=str(path))
    with pytest.warns(UserWarning, match="searched for solver='ipndm', afs=False; it is used with solver='unipc'"):
        scheduler = EDMScheduler.from_config(DDPMScheduler().config, solver="unipc", schedule_file=str(path))
    scheduler.set_timesteps(4)
    assert scheduler.sigmas.tolist() == pytest.approx([80.0, 6.0, 0.5, 0.03, 0.0])


def test_gits_is_resampled_to_any_step_count_in_the_scheduler():
    for n in (4, 6, 9, 20):
        scheduler = EDMScheduler.from_config(DDPMScheduler().config, schedule="gits", solver="unipc")
        scheduler.set_timesteps(n)
        assert len(scheduler.sigmas) == n + 1 and bool((scheduler.sigmas[1:] < scheduler.sigmas[:-1]).all())


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no such file"),
        ("{not json", "not a readable JSON"),
        ('{"format": "other"}', "not an edm_sampling schedule file"),
        ('{"format": "edm_sampling.schedule/1", "grids": []}', "holds no grids"),
        ('{"format": "edm_sampling.schedule/1", "grids": [[1.0, 2.0, 0.0]]}', "bad grid"),
        ('{"format": "edm_sampling.schedule/1", "grids": [[2.0, 1.0]]}', "bad grid"),
    ],
)
def test_bad_schedule_file_is_refused_naming_it(tmp_path, content, match):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"schedule_file.*{match}"):
        EDMScheduler(schedule_file=str(path))


def test_new_options_survive_save_load_and_swaps(tmp_path):
    options = dict(solver="unipc", solver_order=3, afs=True, schedule="logsnr")
    scheduler = EDMScheduler.from_config(DDPMScheduler(beta_schedule="scaled_linear").config, **options)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMScheduler.from_pretrained(tmp_path)
    assert {k: loaded.config[k] for k in options} == options
    for other in (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DDPMScheduler):
        back = EDMScheduler.from_config(other.from_config(scheduler.config).config)
        assert {k: back.config[k] for k in options} == options
        assert back.config.beta_schedule == "scaled_linear"
    for solver in SOLVERS:
        EDMScheduler.from_config(DPMSolverMultistepScheduler(solver_order=3).config, solver=solver)  # its solver_order is not ours


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"solver": "rk45"}, "solver"),
        ({"solver": "unipc", "solver_order": 5}, "solver_order"),
        ({"solver": "dpmpp_2m", "solver_order": 2}, "solver_order"),
        ({"solver": "ipndm", "solver_order": 1.5}, "solver_order"),
        ({"solver": "heun", "afs": True}, "afs"),
        ({"afs": "yes"}, "afs"),
        ({"solver": "unipc", "s_churn": 10.0}, "s_churn"),
        ({"schedule": "cosine"}, "schedule"),
        ({"schedule": "logsnr", "schedule_file": "x.json"}, "schedule_file"),
        ({"rho": 0.0}, "rho"),
        ({"sigma_data": math.inf}, "sigma_data"),
        ({"sigma_min": 80.0, "sigma_max": 1.0}, "sigma_max"),
    ],
)
def test_bad_options_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDMScheduler(**kwargs)


def test_every_schedule_runs_in_the_scheduler():
    config = DDPMScheduler().config
    for schedule in SCHEDULES:
        if schedule == "gits":  # published for 6 steps only
            scheduler = EDMScheduler.from_config(config, solver="ipndm", schedule=schedule)
            scheduler.set_timesteps(6)
        else:
            scheduler = EDMScheduler.from_config(config, solver="unipc", schedule=schedule)
            scheduler.set_timesteps(5)
        assert bool((scheduler.sigmas[1:] < scheduler.sigmas[:-1]).all()) and float(scheduler.sigmas[-1]) == 0.0
        lo, hi = scheduler.family.sigma_min, scheduler.family.sigma_max
        positive = scheduler.sigmas[:-1].double()
        assert float(positive.min()) >= lo * (1 - 1e-3) and float(positive.max()) <= hi * (1 + 1e-3)


def test_generator_list_of_the_wrong_length_fails_at_the_first_step():
    scheduler = EDMScheduler(s_churn=20.0)
    scheduler.set_timesteps(4)
    sample = torch.randn(3, 1, 2, 2)
    with pytest.raises(ValueError, match="generator"):
        scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample, generator=[torch.Generator()] * 2)


def test_non_finite_model_output_is_reported_once():
    scheduler = EDMScheduler(solver="dpmpp_2m")
    scheduler.set_timesteps(5)
    x = torch.randn(2, 1, 2, 2)
    with pytest.warns(RuntimeWarning, match="samples are not finite") as record:
        for k, t in enumerate(scheduler.timesteps):
            output = torch.full_like(x, math.nan) if k == 2 else torch.zeros_like(x)
            x = scheduler.step(output, t, x).prev_sample
    assert len(record) == 1
    assert not bool(torch.isfinite(x).all())
