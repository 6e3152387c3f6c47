"""Exact denoisers that need no download: the ideal D(x; sigma) of known data.

For Gaussian data N(mu, diag(lam)) the ideal denoiser and the probability-flow ODE are closed
form (EDM_SPEC section 6), so samplers can be checked against an exact answer. For a finite
dataset {y_k} the ideal denoiser is a softmax-weighted mean of the data points; the built-in
dataset is scikit-learn's 8x8 digits, which ships offline.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .denoisers import Denoiser, sigma_column

DIGITS_SHAPE = (1, 8, 8)
BUILTIN_ORACLES = ("digits", "gaussian")


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

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:
        mu, lam = self.mean.to(x.device, torch.float64), self.variance.to(x.device, torch.float64)
        sigma = sigma_column(sigma, x, torch.float64)
        return (mu + lam / (lam + sigma**2) * (x.double() - mu)).to(x.dtype)

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

    def forward(self, x: torch.Tensor, sigma: Any, **model_kwargs: Any) -> torch.Tensor:
        flat_points = self.points.to(x.device, torch.float64).reshape(self.points.shape[0], -1)
        sigma = sigma_column(sigma, x, torch.float64).reshape(-1, 1)
        flat_x = x.double().reshape(x.shape[0], -1)
        point_norms = (flat_points**2).sum(1)
        out = []
        for start in range(0, x.shape[0], self.chunk_size):
            xs, ss = flat_x[start : start + self.chunk_size], sigma[start : start + self.chunk_size]
            # ||x||^2 - 2 x.y + ||y||^2 in float64: cancellation stays far below sigma_min^2
            squared = (xs**2).sum(1, keepdim=True) - 2 * xs @ flat_points.T + point_norms
            weights = torch.softmax(-squared / (2 * ss**2), dim=1)
            out.append(weights @ flat_points)
        return torch.cat(out).reshape(x.shape).to(x.dtype)

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


def builtin_oracle(name: str = "digits") -> Denoiser:
    """The built-in exact model by name: "digits" (FiniteDataOracle) or "gaussian"."""
    if name == "digits":
        return FiniteDataOracle(load_digits())
    if name == "gaussian":
        return builtin_gaussian()
    raise ValueError(f"builtin model must be one of {BUILTIN_ORACLES}, got {name!r}")
