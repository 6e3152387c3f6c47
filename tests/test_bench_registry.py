"""The sampler registry and the sweep's metrics: diffusers' anchors configured over the full
trained range, our EDMScheduler run through the same plain loop as diffusers' schedulers, a
new row as one entry, model calls per step, the mode mismatch that tells samplers apart on
the digits, the default mixture model, and the progress bar."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from edm_sampling.evaluation.samplers_registry import (
    DIFFUSERS,
    MULTISTEP_SOLVERS,
    NO_AFS_SOLVERS,
    OURS,
    SAMPLERS,
    SamplerSpec,
    _start_of,
    build_scheduler,
    run_sampler,
)
from edm_sampling.evaluation.sweep import SweepConfig, run_sweep
from edm_sampling.solvers import SOLVERS


@pytest.fixture(scope="module")
def gaussian_model():
    from edm_sampling.evaluation.models import load_model

    return load_model("gaussian")


@pytest.mark.parametrize("steps", [5, 25])
@pytest.mark.parametrize("name", [n for n, s in SAMPLERS.items() if s.family == DIFFUSERS])
def test_diffusers_anchors_start_at_the_largest_trained_sigma_and_end_at_the_smallest(gaussian_model, name, steps):
    spec = SAMPLERS[name]
    scheduler = build_scheduler(spec, gaussian_model.scheduler_config)
    scheduler.set_timesteps(steps)
    sigma, _ = _start_of(scheduler, spec)
    assert sigma == pytest.approx(157.407, rel=1e-4)  # t = 999 of the DDPM betas, not t = 800 ("leading")
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        positive = sigmas[sigmas > 0]
        assert float(positive.min()) == pytest.approx(0.01, rel=0.1) or name == "ddim"  # full range down to t = 0
    if name == "deis-karras":
        assert float(sigmas[-1]) == pytest.approx(0.01, rel=0.01)  # diffusers' DEIS has no final_sigmas_type
    elif sigmas is not None:
        assert float(sigmas[-1]) == 0.0


def test_edm_scheduler_in_the_plain_loop_equals_the_core_sampler(gaussian_model):
    """The scheduler runner executes our EDMScheduler exactly like diffusers' schedulers; on the
    oracle's epsilon UNet it matches the core Heun sampler over the same network and grid."""
    from edm_sampling.denoisers import DiscreteVPDenoiser
    from edm_sampling.samplers import sample
    from edm_sampling.schedulers import EDMScheduler

    spec = SAMPLERS["edm-heun-scheduler"]
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = run_sampler(spec, gaussian_model, latents, 5, [torch.Generator().manual_seed(i) for i in range(4)])
    assert out.nfe == 9 == spec.nfe_for_steps(5)
    scheduler = EDMScheduler.from_config(gaussian_model.scheduler_config)
    scheduler.set_timesteps(5)
    denoiser = DiscreteVPDenoiser.from_scheduler_config(gaussian_model.unet, gaussian_model.scheduler_config)
    core = sample(denoiser, latents, scheduler.sigmas.double())
    torch.testing.assert_close(out.sample, core.sample, rtol=1e-5, atol=1e-5)
    assert (out.start_sigma, out.start_scale) == pytest.approx((80.0, 80.0))


def test_a_new_sampler_is_one_registry_entry(gaussian_model, monkeypatch):
    """A solver option reaches `samplers.sample` from the entry alone (here the paper's alpha of
    the generalized second-order step), and the entry runs through the sweep by name."""
    from edm_sampling.samplers import sample
    from edm_sampling.schedules import karras_sigmas

    spec = SamplerSpec("edm-heun-alpha-half", OURS, "Heun with alpha = 1/2 (midpoint)", calls_per_step=2, saved_calls=1,
                       solver_options={"alpha": 0.5})
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = run_sampler(spec, gaussian_model, latents, 4, [torch.Generator() for _ in range(3)])
    expected = sample(gaussian_model.denoiser, latents, karras_sigmas(4, 0.002, 80.0), alpha=0.5)
    torch.testing.assert_close(out.sample, expected.sample)
    assert out.nfe == 7
    monkeypatch.setitem(SAMPLERS, spec.name, spec)
    rows = run_sweep(SweepConfig(model="gaussian", samplers=[spec.name, "edm-heun"], nfe=[7], num_samples=4,
                                 progress=False, quiet=True))["rows"]
    assert [r["sampler"] for r in rows] == [spec.name, "edm-heun"] and rows[0]["error_median"] != rows[1]["error_median"]


def test_steps_for_nfe_is_the_largest_step_count_within_the_target():
    heun, multistep = SAMPLERS["edm-heun"], SAMPLERS["dpmpp-2m-karras"]
    first_step_saved = replace(multistep, saved_calls=1)  # e.g. an analytical first step
    for spec in (heun, multistep, first_step_saved):
        for nfe in range(2, 40):
            steps = spec.steps_for_nfe(nfe)
            assert spec.nfe_for_steps(steps) <= nfe < spec.nfe_for_steps(steps + 1)
    assert heun.steps_for_nfe(35) == 18 and first_step_saved.steps_for_nfe(5) == 6


def test_on_the_digits_the_mode_mismatch_tells_samplers_apart():
    result = run_sweep(SweepConfig(model="digits", samplers=["edm-heun", "dpmpp-2m-karras"], nfe=[5, 35], num_samples=24,
                                   batch_size=24, progress=False, quiet=True))
    rows = {(r["sampler"], r["nfe_target"]): r for r in result["rows"]}
    assert result["meta"]["ode_reference"].startswith("Dormand-Prince")
    for name in ("edm-heun", "dpmpp-2m-karras"):
        assert rows[(name, 5)]["mode_mismatch"] > rows[(name, 35)]["mode_mismatch"]
        assert rows[(name, 35)]["error_median"] == pytest.approx(0.0, abs=1e-6)  # snapped onto the reference's image
    assert rows[("edm-heun", 5)]["mode_mismatch"] > 0.5  # Heun's coarse last step at 5 calls


def test_the_default_model_is_the_mixture_with_exact_references_and_modes():
    assert SweepConfig().model == "mixture"
    result = run_sweep(SweepConfig(samplers=["edm-euler", "unipc-bh2-karras"], nfe=[9], num_samples=8, progress=False,
                                   quiet=True))
    meta = result["meta"]
    assert meta["ode_reference"].startswith("Dormand-Prince") and meta["has_modes"]
    assert all(math.isfinite(r["error_median"]) and 0 <= r["mode_mismatch"] <= 1 for r in result["rows"])
    floor = meta["fd_floor"]
    assert floor["draws"] == 5 and floor["fd_std"] > 0 and len(floor["fd_values"]) == 5
    assert result["samples"][("edm-euler", 9)].shape == (8, 3, 16, 16)  # images, decoded from the DCT coordinates


def test_progress_bar_counts_samples_and_moves_per_batch(monkeypatch):
    bars = []

    class Recorder:
        def __init__(self, total=None, **kwargs):
            self.total, self.updates = total, []
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def set_postfix_str(self, text):
            pass

        def close(self):
            pass

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    run_sweep(SweepConfig(model="gaussian", samplers=["edm-euler", "ddim"], nfe=[3, 4], num_samples=5, batch_size=2,
                          quiet=True))
    assert bars[0].total == 2 * 2 * 5 and bars[0].updates == [2, 2, 1] * 4


def test_the_first_screen_is_curated_and_every_other_row_stays_selectable():
    from edm_sampling.evaluation.samplers_registry import DEFAULT_SAMPLERS, SAMPLER_GROUPS, expand_sampler_names

    anchors = ["ddim", "euler-karras", "heun-karras", "dpmpp-2m-karras", "dpmpp-3m-karras", "unipc-bh2-karras", "deis-karras"]
    assert list(DEFAULT_SAMPLERS) == ["edm-heun", "edm-ipndm-scheduler", "edm-ipndm-afs-scheduler", "edm-unipc3-scheduler",
                                      "edm-unipc3-afs-scheduler", "edm-adams-alpha-adaptive-scheduler", *anchors]
    assert expand_sampler_names(None) == expand_sampler_names([]) == list(DEFAULT_SAMPLERS)
    assert expand_sampler_names(["all"]) == list(SAMPLERS)
    assert set().union(*(SAMPLER_GROUPS[g] for g in ("default", "paper", "core", "scheduler", "diffusers"))) == set(SAMPLERS)
    assert "edm-dpmpp-3m-scheduler" in SAMPLER_GROUPS["scheduler"] and "edm-heun-scheduler" in SAMPLER_GROUPS["scheduler"]
    assert expand_sampler_names(["paper", "ddim", "edm-heun"]) == [*SAMPLER_GROUPS["paper"], "ddim"]  # in order, once
    assert {"edm-euler", "edm-heun-churn", "edm-heun-vp", "edm-heun-ve", "edm-heun-iddpm"} <= set(SAMPLER_GROUPS["paper"])
    assert all(SAMPLERS[n].runner == "core" for n in SAMPLER_GROUPS["core"]) and "edm-unipc-afs" in SAMPLER_GROUPS["core"]
    with pytest.raises(ValueError, match="unknown sampler or group 'fast'; groups: default, paper, core, scheduler, diffusers, all"):
        expand_sampler_names(["fast"])


@pytest.mark.parametrize("name", ["edm-ipndm-afs-scheduler", "edm-unipc3-scheduler", "edm-unipc3-afs-scheduler",
                                  "edm-dpmpp-3m-scheduler", "edm-heun-scheduler", "edm-adams-alpha-adaptive-scheduler"])
def test_each_edm_scheduler_row_equals_its_core_equivalent(gaussian_model, name):
    """What VE / EDM models run instead of an EDMScheduler row: the same solver, options and
    grid on the core runner, with the same model calls and samples."""
    from edm_sampling.evaluation.samplers_registry import core_equivalent

    spec = SAMPLERS[name]
    twin = core_equivalent(spec)
    assert twin.runner == "core" and twin.name == name.removesuffix("-scheduler")
    if twin.name in SAMPLERS:
        assert twin is SAMPLERS[twin.name]
    # on the range EDMScheduler takes from the DDPM config (sigma 0.01 .. 80), as a VE / EDM folder's config gives both
    scheduler_range = build_scheduler(spec, gaussian_model.scheduler_config).sigma_range
    model = replace(gaussian_model, sigma_min=scheduler_range[0], sigma_max=scheduler_range[1])
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    generators = [torch.Generator() for _ in range(4)]
    ours = run_sampler(spec, model, latents, spec.steps_for_nfe(9), generators)
    core = run_sampler(twin, model, latents, twin.steps_for_nfe(9), generators)
    assert ours.nfe == core.nfe == 9
    torch.testing.assert_close(ours.sample, core.sample, rtol=1e-5, atol=1e-5)
    assert core_equivalent(SAMPLERS["ddim"]) is None


def test_multistep_rows_follow_the_solver_registry():
    """The registry lists rows without importing torch, so it keeps its own solver names and
    the ones without afs: both must match `solvers.SOLVERS`."""
    assert set(MULTISTEP_SOLVERS) == set(SOLVERS) - {"heun", "euler"}
    assert set(NO_AFS_SOLVERS) == {name for name, info in SOLVERS.items() if not info.afs} - {"heun"}
    for solver in MULTISTEP_SOLVERS:
        name = "edm-" + solver.replace("_", "-")
        assert name in SAMPLERS and ((name + "-afs") in SAMPLERS) == (solver not in NO_AFS_SOLVERS)
