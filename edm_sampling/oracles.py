"""Exact denoisers that need no download: the ideal D(x; sigma) of known data.

- `GaussianOracle`: data N(mu, diag(lam)). The ideal denoiser and the probability-flow ODE
  are closed form (EDM_SPEC section 6), so samplers are checked against an exact answer.
- `GaussianMixtureOracle`: a mixture of K such Gaussians, diagonal in the pixel basis or in
  an orthonormal 2-D DCT basis (image-like data: variance falling with spatial frequency). Its
  ideal denoiser is closed form; its ODE is not, and `solve_probability_flow_ode` integrates
  it to about 1e-9 in float64. `builtin_mixture()` is the default model of `edm-sampling bench`.
- `FiniteDataOracle`: the ideal denoiser of a finite dataset {y_k}, a softmax-weighted mean
  of the data points; the built-in dataset is scikit-learn's 8x8 digits, which ships offline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .denoisers import Denoiser, sigma_column

DIGITS_SHAPE = (1, 8, 8)
MIXTURE_SHAPE = (3, 16, 16)
BUILTIN_ORACLES = ("mixture", "gaussian", "digits")
BASES = ("pixel", "dct")


def posterior_weights(variance: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam / (lam + sigma^2), sigma^2 / (lam + sigma^2)): the weights of the noisy observation
    and of the prior mean in the Gaussian posterior mean, each computed without cancellation."""
    total = variance + sigma**2
    return variance / total, sigma**2 / total


def gaussian_posterior_mean(x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor, sigma: Any) -> torch.Tensor:
    """E[y | y + n = x] for y ~ N(mean, diag(variance)), n ~ N(0, sigma^2 I):
    mu + lam / (lam + sigma^2) (x - mu) = (lam x + sigma^2 mu) / (lam + sigma^2)."""
    observation, prior = posterior_weights(variance, sigma)
    return observation * x + prior * mean


class GaussianOracle(Denoiser):
    """The ideal denoiser of N(mean, diag(variance)): D(x; sigma) = mu + lam/(lam + sigma^2) (x - mu)."""

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        variance = torch.as_tensor(variance, dtype=torch.float64).expand_as(mean).clone()
        if not bool((variance > 0).all()):
            raise ValueError("variance must be > 0 everywhere")
        self.register_buffer("mean", mean)
        self.register_buffer("variance", variance)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:
        mu, lam = self.mean.to(x.device, torch.float64), self.variance.to(x.device, torch.float64)
        sigma = sigma_column(sigma, x, torch.float64)
        return gaussian_posterior_mean(x.double(), mu, lam, sigma).to(x.dtype)

    def ode_solution(self, x: torch.Tensor, sigma_a: Any, sigma_b: Any) -> torch.Tensor:
        """The exact probability-flow ODE map from x at sigma_a to sigma_b:
        mu + sqrt((lam + sigma_b^2) / (lam + sigma_a^2)) (x - mu)."""
        mu, lam = self.mean.to(x.device, torch.float64), self.variance.to(x.device, torch.float64)
        sigma_a = sigma_column(sigma_a, x, torch.float64)
        sigma_b = sigma_column(sigma_b, x, torch.float64)
        return (mu + torch.sqrt((lam + sigma_b**2) / (lam + sigma_a**2)) * (x.double() - mu)).to(x.dtype)

    def sample_data(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """num_samples draws of the data distribution, float64, on the oracle's device (drawn
        on the CPU when `generator` is a CPU generator)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn((num_samples, *self.mean.shape), generator=generator, dtype=torch.float64, device=device)
        return self.mean + self.variance.sqrt() * noise.to(self.mean.device)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix, float64 [n, n]: C[k, j] = a_k cos(pi (j + 1/2) k / n),
    a_0 = sqrt(1/n), a_k = sqrt(2/n); C C^T = I, so C is a rotation of R^n."""
    k = torch.arange(n, dtype=torch.float64).reshape(-1, 1)
    j = torch.arange(n, dtype=torch.float64).reshape(1, -1)
    matrix = math.sqrt(2.0 / n) * torch.cos(math.pi * (j + 0.5) * k / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


class GaussianMixtureOracle(Denoiser):
    """The ideal denoiser of a mixture of K Gaussians sum_k pi_k N(mu_k, R^T diag(lam_k) R),
    with R the identity ("pixel" basis) or the orthonormal 2-D DCT of each channel ("dct").

    In basis coordinates z = R x, with sigma^2 added to each component's variance,

        D(x; sigma) = R^T sum_k w_k(x) [m_k + lam_k / (lam_k + sigma^2) (z - m_k)],
        log w_k = log pi_k - 1/2 sum_j [(z_j - m_kj)^2 / (lam_kj + sigma^2) + log(lam_kj + sigma^2)] + const,

    the posterior-weighted mix of the per-component Gaussian denoisers, with the weights
    normalised by log-sum-exp in float64 (they are one-hot to machine precision at small
    sigma). With K = 1 and the pixel basis it is `GaussianOracle` exactly.

    `means`: [K, C, H, W] in pixel space; `variances`: [K, C, H, W] along the basis's axes
    (for "dct": of the DCT coefficient (c, u, v)); `weights`: [K] positive (normalised here).
    """

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor | None = None,
                 basis: str = "pixel"):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if means.ndim < 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape [K, ...] with K >= 1, got {tuple(means.shape)}")
        variances = variances.expand_as(means).clone()
        if not bool((variances > 0).all()):
            raise ValueError("variances must be > 0 everywhere")
        weights = torch.ones(means.shape[0], dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (means.shape[0],) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {means.shape[0]} positive numbers, got {weights.tolist()}")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        if basis == "dct" and means.ndim != 4:
            raise ValueError(f"basis 'dct' needs image components [K, C, H, W], got {tuple(means.shape)}")
        self.basis = basis
        if basis == "dct":
            self.register_buffer("dct_h", dct_matrix(means.shape[-2]))
            self.register_buffer("dct_w", dct_matrix(means.shape[-1]))
        self.register_buffer("means", means)
        self.register_buffer("variances", variances)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("basis_means", self.to_basis(means))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def to_basis(self, x: torch.Tensor) -> torch.Tensor:
        """z = R x (float64)."""
        x = x.to(torch.float64)
        if self.basis == "pixel":
            return x
        return torch.einsum("uh,...hw,vw->...uv", self._f64(self.dct_h, x), x, self._f64(self.dct_w, x))

    def from_basis(self, z: torch.Tensor) -> torch.Tensor:
        """x = R^T z (float64)."""
        z = z.to(torch.float64)
        if self.basis == "pixel":
            return z
        return torch.einsum("uh,...uv,vw->...hw", self._f64(self.dct_h, z), z, self._f64(self.dct_w, z))

    def in_basis_coordinates(self) -> "GaussianMixtureOracle":
        """The same mixture in the coordinates z = R x, where every covariance is diagonal
        (basis "pixel", means R mu_k). Every sampler's update is a linear combination of x and
        D with scalar coefficients, so it commutes with the rotation R: sampling z and mapping
        back with `from_basis` gives the same samples and errors as sampling x (the RMSE is
        rotation invariant), without the two transforms per call."""
        return GaussianMixtureOracle(self.basis_means, self.variances, self.log_weights.exp(), basis="pixel")

    @staticmethod
    def _f64(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return buffer.to(like.device, torch.float64)

    def _posterior(self, x: torch.Tensor, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(z = R x flattened [B, D], log w [B, K]) in float64.

        log w_k = log pi_k - 1/2 (z^2 . P_k - 2 z . (P_k m_k) + m_k^2 . P_k + sum_j log t_kj) with
        t_k = lam_k + sigma^2 and P_k = 1 / t_k: the quadratic form as matrix products. A batch
        at one noise level (the usual case) shares t, so it is formed once, [1, K, D]."""
        z = self.to_basis(x).reshape(x.shape[0], -1)
        sigma = self._sigma_rows(sigma, z)
        means, variances = self._flat_components(z.device)
        precision = 1.0 / (variances + sigma.unsqueeze(2) ** 2)
        quadratic = (_rows_times(z**2, precision) - 2 * _rows_times(z, precision * means)
                     + (means**2 * precision).sum(dim=2) - torch.log(precision).sum(dim=2))
        return z, torch.log_softmax(self.log_weights.to(z.device, torch.float64) - 0.5 * quadratic, dim=1)

    def _sigma_rows(self, sigma: Any, z: torch.Tensor) -> torch.Tensor:
        """sigma as [B, 1], or [1, 1] when the whole batch is at one noise level."""
        sigma = sigma_column(sigma, z, torch.float64)
        return sigma[:1] if bool((sigma == sigma[:1]).all()) else sigma

    def _flat_components(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and variances in basis coordinates, [1, K, D]."""
        k = self.basis_means.shape[0]
        return (self.basis_means.to(device, torch.float64).reshape(1, k, -1),
                self.variances.to(device, torch.float64).reshape(1, k, -1))

    def log_responsibilities(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        """log w_k(x; sigma), the normalised log posterior weights of the components, [B, K]."""
        return self._posterior(x, sigma)[1]

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:
        z, log_w = self._posterior(x, sigma)
        means, variances = self._flat_components(z.device)
        observation, prior = posterior_weights(variances, self._sigma_rows(sigma, z).unsqueeze(2))
        weights = log_w.exp()
        # sum_k w_k (lam_k z + sigma^2 m_k) / t_k = z * (w @ g) + w @ (h m): gaussian_posterior_mean, mixed
        mixed = _rows_times(weights, observation, transpose=False) * z + _rows_times(weights, prior * means, transpose=False)
        return self.from_basis(mixed.reshape(x.shape)).to(x.dtype)

    def assign(self, x: torch.Tensor, sigma: float = 0.2) -> torch.Tensor:
        """The component each sample most likely came from, seen through noise of std `sigma`
        (argmax_k w_k(x; sigma)), int64 [B]: a sample's mode, used to count samples that land
        in another mode than their reference. At sigma = 0 a small error in a coefficient of
        variance 1e-4 would decide the answer; at 0.2 only errors of that size do, and on
        true draws the answer is the component that drew them (tests/test_oracles.py)."""
        return self.log_responsibilities(x, sigma).argmax(dim=1)

    def sample_data(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """num_samples draws of the mixture, float64 [n, ...], on the oracle's device."""
        device = generator.device if generator is not None else self.means.device
        probabilities = self.log_weights.exp().to(device)
        labels = torch.multinomial(probabilities, num_samples, replacement=True, generator=generator)
        noise = torch.randn((num_samples, *self.sample_shape), generator=generator, dtype=torch.float64, device=device)
        labels, noise = labels.to(self.means.device), noise.to(self.means.device)
        z = self.basis_means[labels] + self.variances[labels].sqrt() * noise
        return self.from_basis(z)

    def ode_solution(self, x: torch.Tensor, sigma_a: float, sigma_b: float = 0.0, rtol: float | None = None) -> torch.Tensor:
        """The probability-flow ODE solution at sigma_b from x at sigma_a, by
        `solve_probability_flow_ode` (float64, relative tolerance `rtol`, default
        REFERENCE_RTOL), in x's dtype."""
        rtol = REFERENCE_RTOL if rtol is None else rtol
        return solve_probability_flow_ode(self, x, sigma_a, sigma_b, rtol=rtol).solution.to(x.dtype)


def _rows_times(rows: torch.Tensor, tables: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """Per batch row b: rows[b] @ tables[b]^T (transpose, [B, D] x [S, K, D] -> [B, K]) or
    rows[b] @ tables[b] ([B, K] x [S, K, D] -> [B, D]); S = 1 shares one table (one matmul)."""
    if tables.shape[0] == 1:
        table = tables[0]
        return rows @ (table.T if transpose else table)
    return torch.einsum("bd,bkd->bk" if transpose else "bk,bkd->bd", rows, tables)


# --- the reference ODE solver ---------------------------------------------------------------------

# Dormand & Prince (1980), RK5(4)7FM: nodes, stages, 5th-order weights and their difference from
# the embedded 4th-order ones (the local error estimate).
_DP_NODES = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_STAGES = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_WEIGHTS = _DP_STAGES[6] + (0.0,)
_DP_ERROR = tuple(
    b - b_star for b, b_star in zip(_DP_WEIGHTS, (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40))
)
REFERENCE_RTOL = 1e-6
"""The reference solver's default tolerance. On the built-in mixture (256 samples from sigma
80, ~400 denoiser calls) its solution differs by at most 7e-8 RMSE per sample from one with
rtol 1e-10, and by as much from the same steps halved; on the stiffer built-in Gaussian it
is within 5.3e-7 of the closed form, about rtol |x| (tests/test_oracles.py)."""
REFERENCE_SIGMA_END = 1e-9
"""Where the reference solver stops when asked for sigma = 0: the remaining change of x is
O(sigma^2 / lam) for Gaussian components and O(sigma) for finite data, far below 1e-8."""


@dataclass
class ODESolution:
    """The solution, the accepted grid in u = ln(sigma) (for step-halving checks) and the
    number of denoiser calls spent."""

    solution: torch.Tensor
    log_sigmas: list[float]
    calls: int


def _log_sigma_slope(denoiser: Callable[..., torch.Tensor], model_kwargs: dict) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """dx/du at u = ln(sigma): sigma dx/dsigma = x - D(x; sigma)."""

    def slope(u: float, x: torch.Tensor) -> torch.Tensor:
        return x - denoiser(x, torch.full((x.shape[0],), math.exp(u), dtype=x.dtype, device=x.device), **model_kwargs)

    return slope


def _dopri_step(slope, u: float, x: torch.Tensor, h: float, k1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dormand-Prince step of size h from (u, x) with k1 = slope(u, x): (x_next, local
    error estimate, slope at x_next), 6 new slope evaluations."""
    ks = [k1]
    for node, row in zip(_DP_NODES[1:], _DP_STAGES[1:]):
        stage = x + h * sum(a * k for a, k in zip(row, ks) if a != 0.0)
        ks.append(slope(u + node * h, stage))
    x_next = x + h * sum(b * k for b, k in zip(_DP_WEIGHTS, ks) if b != 0.0)
    error = h * sum(e * k for e, k in zip(_DP_ERROR, ks) if e != 0.0)
    return x_next, error, ks[-1]


def solve_probability_flow_ode(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float = 0.0,
    rtol: float = REFERENCE_RTOL,
    atol: float | None = None,
    log_sigmas: list[float] | None = None,
    model_kwargs: dict | None = None,
    max_steps: int = 100_000,
) -> ODESolution:
    """A high-accuracy solution of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    from x at sigma_from to sigma_to, for reference errors.

    Solved in u = ln(sigma), where dx/du = x - D(x; e^u): for Gaussian data the rate is
    sigma^2 / (lam + sigma^2) <= 1, so the problem is not stiff however small lam is, and the
    step size grows as sigma falls. Dormand-Prince 5(4) in float64 with adaptive steps shared
    by the batch: a step is accepted when every sample's RMS local error is at most
    atol + rtol * |x| (atol defaults to rtol * 1e-2). sigma_to = 0 stops at
    REFERENCE_SIGMA_END. With `log_sigmas` (a decreasing grid in u from ln(sigma_from) to the
    end) the steps are those, fixed: halving them checks the accuracy.
    """
    if not (math.isfinite(sigma_from) and sigma_from > 0):
        raise ValueError(f"sigma_from must be a finite number > 0, got {sigma_from!r}")
    if not 0 <= sigma_to < sigma_from:
        raise ValueError(f"sigma_to must be in [0, sigma_from={sigma_from}), got {sigma_to!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol!r}")
    atol = rtol * 1e-2 if atol is None else atol
    slope = _log_sigma_slope(denoiser, dict(model_kwargs or {}))
    u, u_end = math.log(sigma_from), math.log(max(sigma_to, REFERENCE_SIGMA_END))
    x = x.to(torch.float64)
    k1 = slope(u, x)
    calls = 1
    if log_sigmas is not None:
        for u_next in log_sigmas[1:]:
            x, _, k1 = _dopri_step(slope, u, x, u_next - u, k1)
            u, calls = u_next, calls + 6
        return ODESolution(x, list(log_sigmas), calls)
    grid = [u]
    h = (u_end - u) / 64
    for _ in range(max_steps):
        if u <= u_end:
            return ODESolution(x, grid, calls)
        h = max(h, u_end - u)  # h < 0: do not step past the end
        x_next, error, k_next = _dopri_step(slope, u, x, h, k1)
        calls += 6
        scale = atol + rtol * torch.maximum(x.abs(), x_next.abs())
        ratio = float((error / scale).pow(2).reshape(x.shape[0], -1).mean(dim=1).sqrt().max())
        if ratio <= 1.0:
            u = u + h if u + h > u_end + 1e-12 else u_end
            x, k1 = x_next, k_next
            grid.append(u)
        h *= min(5.0, max(0.2, 0.9 * (ratio + 1e-16) ** -0.2))
    raise RuntimeError(f"the reference ODE solver did not reach sigma = {sigma_to} in {max_steps} steps")


def halved_grid(log_sigmas: list[float]) -> list[float]:
    """The grid with every step split in two (the midpoint in u inserted)."""
    out = [log_sigmas[0]]
    for a, b in zip(log_sigmas[:-1], log_sigmas[1:]):
        out += [(a + b) / 2, b]
    return out


class FiniteDataOracle(Denoiser):
    """The ideal denoiser of a finite dataset {y_k}:
    D(x; sigma) = sum_k softmax_k(-||x - y_k||^2 / (2 sigma^2)) y_k, computed in float64 in
    batches of `chunk_size` samples."""

    def __init__(self, points: torch.Tensor, chunk_size: int = 256):
        super().__init__()
        points = torch.as_tensor(points, dtype=torch.float64)
        if points.ndim < 2 or points.shape[0] < 1:
            raise ValueError(f"points must have shape [K, ...] with K >= 1, got {tuple(points.shape)}")
        self.register_buffer("points", points)
        self.chunk_size = chunk_size

    def _squared_distances(self, flat_x: torch.Tensor, flat_points: torch.Tensor, point_norms: torch.Tensor) -> torch.Tensor:
        """||x - y_k||^2 as ||x||^2 - 2 x.y + ||y||^2 in float64: cancellation stays far below sigma_min^2."""
        return (flat_x**2).sum(1, keepdim=True) - 2 * flat_x @ flat_points.T + point_norms

    def _chunks(self, x: torch.Tensor):
        """(flat x chunk, start, flat points, their squared norms) in float64 on x's device."""
        flat_points = self.points.to(x.device, torch.float64).reshape(self.points.shape[0], -1)
        point_norms = (flat_points**2).sum(1)
        flat_x = x.double().reshape(x.shape[0], -1)
        for start in range(0, x.shape[0], self.chunk_size):
            yield flat_x[start : start + self.chunk_size], start, flat_points, point_norms

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:
        sigma = sigma_column(sigma, x, torch.float64).reshape(-1, 1)
        out = []
        for xs, start, flat_points, point_norms in self._chunks(x):
            squared = self._squared_distances(xs, flat_points, point_norms)
            weights = torch.softmax(-squared / (2 * sigma[start : start + self.chunk_size] ** 2), dim=1)
            out.append(weights @ flat_points)
        return torch.cat(out).reshape(x.shape).to(x.dtype)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The index of the nearest data point (where D(x; sigma -> 0) snaps), int64 [B]: a
        sample's mode, used to count samples that land on another point than their reference."""
        return torch.cat([self._squared_distances(xs, p, n).argmin(dim=1) for xs, _, p, n in self._chunks(x)])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.points.shape[1:])


def load_digits_with_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1797 images, values 0..16) as float64 [1797, 1, 8, 8] in
    [-1, 1], and their labels 0..9 (int64 [1797]).

    Needs the `data` extra (scikit-learn), which ships the dataset offline.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:  # pragma: no cover
        raise ImportError("the built-in digits need scikit-learn: pip install 'edm_sampling[data]'") from error
    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64)
    return (images / 8.0 - 1.0).unsqueeze(1), torch.as_tensor(bunch.target, dtype=torch.long)


def load_digits() -> torch.Tensor:
    """The built-in digits' images, float64 [1797, 1, 8, 8] in [-1, 1]."""
    return load_digits_with_labels()[0]


def builtin_gaussian(shape: tuple[int, ...] = DIGITS_SHAPE) -> GaussianOracle:
    """A fixed anisotropic Gaussian: per-pixel std log-spaced from 0.03 to 1 (a stiff ODE at
    small sigma, like real data) around a smooth mean in [-0.5, 0.5]."""
    n = math.prod(shape)
    std = torch.logspace(math.log10(0.03), 0.0, n, dtype=torch.float64)
    mean = 0.5 * torch.sin(torch.arange(n, dtype=torch.float64) * 0.7)
    return GaussianOracle(mean.reshape(shape), (std**2).reshape(shape))


def _mixture_means(shape: tuple[int, int, int]) -> torch.Tensor:
    """Six smooth, image-like component means in [-0.8, 0.8], [6, C, H, W]: a colour ramp, a
    disk, stripes, a square, a diagonal ramp and a ring, each with its own colour."""
    c, h, w = shape
    y, x = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64),
                          indexing="ij")
    radius = torch.sqrt(x**2 + y**2)
    soft = lambda t: torch.sigmoid(6.0 * t)  # noqa: E731
    shapes = [
        (x + 1) / 2,                                      # left-right ramp
        soft(0.6 - radius),                               # disk
        (torch.cos(2.5 * math.pi * x) + 1) / 2,           # vertical stripes
        soft(0.5 - torch.maximum((x + 0.3).abs(), (y + 0.3).abs())),  # square, upper left
        (x + y + 2) / 4,                                  # diagonal ramp
        soft(0.25 - (radius - 0.6).abs()),                # ring
    ]
    # foreground / background colours per component (RGB in [-1, 1]); fewer channels take the first ones
    colours = [
        ((0.8, -0.6, -0.4), (-0.6, -0.2, 0.8)),
        ((0.8, 0.7, -0.5), (-0.5, -0.6, -0.4)),
        ((0.2, 0.6, 0.3), (-0.7, -0.4, -0.6)),
        ((0.7, 0.7, 0.7), (-0.2, -0.3, 0.1)),
        ((-0.6, 0.7, -0.3), (0.3, -0.5, 0.6)),
        ((0.1, -0.7, 0.8), (0.6, 0.5, -0.3)),
    ]
    means = []
    for pattern, (front, back) in zip(shapes, colours):
        front_t = torch.tensor((front * c)[:c], dtype=torch.float64).reshape(c, 1, 1)
        back_t = torch.tensor((back * c)[:c], dtype=torch.float64).reshape(c, 1, 1)
        means.append(back_t + (front_t - back_t) * pattern)
    return torch.stack(means)


def dct_variance_spectrum(shape: tuple[int, int, int], std_max: float, std_min: float, corner: float) -> torch.Tensor:
    """Variances of the DCT coefficients (c, u, v), [C, H, W]: lam(f) = std_max^2 / (1 +
    (f / corner)^2), f = sqrt(u^2 + v^2), floored at std_min^2 (natural images' 1/f^2 power
    spectrum, with a knee at `corner`)."""
    c, h, w = shape
    u = torch.arange(h, dtype=torch.float64).reshape(-1, 1)
    v = torch.arange(w, dtype=torch.float64).reshape(1, -1)
    variance = std_max**2 / (1 + (u**2 + v**2) / corner**2)
    return variance.clamp(min=std_min**2).expand(c, h, w).clone()


def builtin_mixture(shape: tuple[int, int, int] = MIXTURE_SHAPE) -> GaussianMixtureOracle:
    """The default model of `edm-sampling bench`: six Gaussian components with image-like means
    (`_mixture_means`) and DCT-diagonal covariances whose std falls from 0.3 - 0.5 at the
    lowest frequency to 0.01 - 0.02 at the highest (`dct_variance_spectrum`; a stiff ODE at
    small sigma, like real data), unequal weights. Fixed: no randomness."""
    means = _mixture_means(shape)
    spectra = [(0.5, 0.01, 1.5), (0.4, 0.015, 2.0), (0.3, 0.01, 1.0), (0.45, 0.02, 2.5), (0.35, 0.01, 1.5), (0.4, 0.015, 3.0)]
    variances = torch.stack([dct_variance_spectrum(shape, *spectrum) for spectrum in spectra])
    weights = torch.tensor([0.25, 0.2, 0.17, 0.15, 0.13, 0.1], dtype=torch.float64)
    return GaussianMixtureOracle(means, variances, weights, basis="dct")


def builtin_oracle(name: str = "mixture") -> Denoiser:
    """The built-in exact model by name: "mixture" (GaussianMixtureOracle, 3x16x16), "gaussian"
    (GaussianOracle, 1x8x8) or "digits" (FiniteDataOracle of scikit-learn's 8x8 digits)."""
    if name == "mixture":
        return builtin_mixture()
    if name == "gaussian":
        return builtin_gaussian()
    if name == "digits":
        return FiniteDataOracle(load_digits())
    raise ValueError(f"builtin model must be one of {BUILTIN_ORACLES}, got {name!r}")
