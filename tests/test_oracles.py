"""The exact oracles: the Gaussian-mixture denoiser against the single Gaussian and a dense
brute-force posterior, the DCT basis against scipy, mode assignment, the reference ODE solver
against the closed form and by step halving, and the oracle UNet's rotation equivariance."""

from __future__ import annotations

import math

import pytest
import torch

from edm_sampling.oracles import (
    GaussianMixtureOracle,
    GaussianOracle,
    builtin_gaussian,
    builtin_mixture,
    dct_matrix,
    halved_grid,
    solve_probability_flow_ode,
)


def _rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


def _small_mixture(basis: str = "dct") -> GaussianMixtureOracle:
    """Three components of 2x4x4 images with unequal weights and spectra."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.6
    variances = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 0.3 + 1e-3
    return GaussianMixtureOracle(means, variances, torch.tensor([0.5, 0.3, 0.2]), basis=basis)


def test_one_component_in_the_pixel_basis_is_the_gaussian_oracle_exactly():
    gaussian = builtin_gaussian((3, 4, 4))
    mixture = GaussianMixtureOracle(gaussian.mean[None], gaussian.variance[None])
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for sigma in (80.0, 1.0, 0.01, 1e-9, torch.rand(16, dtype=torch.float64) * 5):
        assert torch.equal(mixture(x, sigma), gaussian(x, sigma))
    assert torch.equal(mixture(x.float(), 0.5), gaussian(x.float(), 0.5))


def test_mixture_denoiser_equals_the_dense_posterior_mean():
    """Brute force, independent of the basis trick: each component as a dense N(mu_k, Sigma_k)
    in pixel space, Sigma_k = R^T diag(lam_k) R; posterior weights from the full log-densities
    of N(mu_k, Sigma_k + sigma^2 I), means by Gaussian conditioning with a linear solve."""
    oracle = _small_mixture("dct")
    d = 2 * 4 * 4
    rotation = torch.zeros(d, d, dtype=torch.float64)
    for j in range(d):  # columns of R^T: the images of the basis vectors
        unit = torch.zeros(1, d, dtype=torch.float64)
        unit[0, j] = 1
        rotation[:, j] = oracle.from_basis(unit.reshape(1, 2, 4, 4)).flatten()
    means = oracle.means.reshape(3, d)
    covariances = [rotation @ torch.diag(oracle.variances[k].flatten()) @ rotation.T for k in range(3)]
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for sigma in (3.0, 0.7, 0.2, 0.03):
        noisy = [c + sigma**2 * torch.eye(d, dtype=torch.float64) for c in covariances]
        log_w = torch.stack([
            torch.distributions.MultivariateNormal(means[k], noisy[k]).log_prob(x.reshape(8, d)) + oracle.log_weights[k]
            for k in range(3)
        ], dim=1)
        w = torch.softmax(log_w, dim=1)
        posterior = [means[k] + (covariances[k] @ torch.linalg.solve(noisy[k], (x.reshape(8, d) - means[k]).T)).T
                     for k in range(3)]
        expected = sum(w[:, k : k + 1] * posterior[k] for k in range(3)).reshape(x.shape)
        torch.testing.assert_close(oracle(x, sigma), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(oracle.log_responsibilities(x, sigma).exp(), w, rtol=1e-9, atol=1e-12)


def test_dct_is_the_orthonormal_dct_ii():
    from scipy.fft import dctn

    matrix = dct_matrix(16)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-14)
    oracle = builtin_mixture()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = torch.from_numpy(dctn(x.numpy(), axes=(-2, -1), norm="ortho"))
    torch.testing.assert_close(oracle.to_basis(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(oracle.from_basis(oracle.to_basis(x)), x, rtol=0, atol=1e-12)


def test_builtin_mixture_draws_have_its_moments_and_are_assigned_to_their_component():
    oracle = builtin_mixture()
    weights = oracle.log_weights.exp()
    draws = oracle.sample_data(4000, torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 3, 16, 16) and draws.dtype == torch.float64
    expected_mean = (weights.reshape(-1, 1, 1, 1) * oracle.means).sum(0)
    assert float((draws.mean(0) - expected_mean).abs().max()) < 0.06  # 4 std of a 4000-draw mean
    # draws of known components: `assign` recovers the component, also under errors of std 0.1
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (600,), generator=g)
    z = oracle.basis_means[labels] + oracle.variances[labels].sqrt() * torch.randn(600, 3, 16, 16, generator=g, dtype=torch.float64)
    x = oracle.from_basis(z)
    assert torch.equal(oracle.assign(x), labels)
    assert torch.equal(oracle.assign(x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)), labels)


def test_reference_solver_matches_the_closed_form_gaussian_solution():
    """The Gaussian's ODE solution is exact: the log-sigma integrator reproduces it on the
    stiff built-in Gaussian (pixel stds 0.03..1) from sigma 80 to 0 and to 0.5, to 1e-6 at the
    default tolerance (measured 3.1e-7 and 5.3e-7: about rtol |x|), converging as the tolerance
    is tightened."""
    oracle = builtin_gaussian()
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 80
    for sigma_to in (0.0, 0.5):
        exact = oracle.ode_solution(x, 80.0, sigma_to)
        solved = solve_probability_flow_ode(oracle, x, 80.0, sigma_to)
        assert float(_rmse(solved.solution, exact).max()) < 1e-6 and solved.calls < 1000
        tight = solve_probability_flow_ode(oracle, x, 80.0, sigma_to, rtol=1e-9)
        assert float(_rmse(tight.solution, exact).max()) < 1e-9


def test_reference_solver_on_the_mixture_is_accurate_to_1e_7_by_step_halving():
    oracle = builtin_mixture().in_basis_coordinates()
    x = torch.randn(32, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80
    solved = solve_probability_flow_ode(oracle, x, 80.0)
    halved = solve_probability_flow_ode(oracle, x, 80.0, log_sigmas=halved_grid(solved.log_sigmas))
    tight = solve_probability_flow_ode(oracle, x, 80.0, rtol=1e-9)
    # fifth order: halving cuts the error 32x, so the difference is the error of `solved`
    assert float(_rmse(solved.solution, halved.solution).max()) < 2e-7
    assert float(_rmse(solved.solution, tight.solution).max()) < 2e-7
    assert float(_rmse(halved.solution, tight.solution).max()) < 2e-8
    assert solved.log_sigmas[0] == math.log(80.0) and solved.log_sigmas[-1] == pytest.approx(math.log(1e-9))


def test_reference_solver_on_the_digits_agrees_with_heun_at_511_model_calls():
    from edm_sampling.oracles import FiniteDataOracle, load_digits
    from edm_sampling.samplers import sample
    from edm_sampling.schedules import karras_sigmas

    oracle = FiniteDataOracle(load_digits())
    z = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    solved = solve_probability_flow_ode(oracle, z * 80, 80.0)
    heun = sample(oracle, z, karras_sigmas(256, 0.002, 80.0), state_dtype=torch.float64)
    assert heun.nfe == 511
    assert float(_rmse(solved.solution, heun.sample).max()) < 1e-7
    assert torch.equal(oracle.assign(solved.solution), oracle.assign(heun.sample))


def test_samplers_commute_with_the_mixture_basis_rotation():
    """Sampling the mixture in its DCT coordinates (what the benchmark does) and rotating back
    gives the samples of sampling it in pixel space from the rotated noise."""
    from edm_sampling.samplers import sample
    from edm_sampling.schedules import karras_sigmas

    pixel = builtin_mixture()
    basis = pixel.in_basis_coordinates()
    z = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sigmas = karras_sigmas(6, 0.002, 80.0)
    in_basis = sample(basis, z, sigmas, state_dtype=torch.float64).sample
    in_pixels = sample(pixel, pixel.from_basis(z), sigmas, state_dtype=torch.float64).sample
    torch.testing.assert_close(pixel.from_basis(in_basis), in_pixels, rtol=0, atol=1e-10)


def test_oracle_unet_of_the_mixture_in_both_coordinates():
    from edm_sampling.oracle_unet import OracleUNet2DModel

    pixel_unet, basis_unet = OracleUNet2DModel(dataset="mixture"), OracleUNet2DModel(dataset="mixture", coordinates="basis")
    assert (pixel_unet.config.in_channels, pixel_unet.config.sample_size, pixel_unet.dtype) == (3, 16, torch.float32)
    oracle = builtin_mixture()
    z = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([900.0, 500.5, 100.0, 3.0])
    torch.testing.assert_close(oracle.to_basis(pixel_unet(oracle.from_basis(z), t).sample), basis_unet(z, t).sample,
                               rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="coordinates"):
        OracleUNet2DModel(dataset="digits", coordinates="basis")
    with pytest.raises(ValueError, match="sample shape"):
        OracleUNet2DModel(dataset="mixture", sample_size=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variances": torch.zeros(2, 1, 2, 2)}, "variances must be > 0"),
        ({"weights": torch.tensor([1.0, -1.0])}, "weights must be 2 positive"),
        ({"weights": torch.tensor([1.0])}, "weights must be 2 positive"),
        ({"basis": "wavelet"}, "basis must be one of"),
        ({"means": torch.zeros(2, 4)}, "basis 'dct' needs image components"),
    ],
)
def test_bad_mixture_arguments_are_rejected(kwargs, message):
    arguments = {"means": torch.zeros(2, 1, 2, 2), "variances": torch.ones(2, 1, 2, 2), "basis": "dct", **kwargs}
    if "means" in kwargs:
        arguments["variances"] = torch.ones(2, 4)
    with pytest.raises(ValueError, match=message):
        GaussianMixtureOracle(**arguments)


def test_bad_reference_solver_arguments_are_rejected():
    oracle = GaussianOracle(torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    x = torch.zeros(1, 1, 2, 2)
    for kwargs, message in (({"sigma_from": 0.0}, "sigma_from"), ({"sigma_from": 1.0, "sigma_to": 2.0}, "sigma_to"),
                            ({"sigma_from": 1.0, "rtol": 0.0}, "rtol")):
        with pytest.raises(ValueError, match=message):
            solve_probability_flow_ode(oracle, x, **kwargs)
