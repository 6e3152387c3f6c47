"""Quality metrics for the NFE sweep: Frechet distance, per-sample ODE error, summaries.

The Frechet distance between N(mu1, S1) and N(mu2, S2) is

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

(Dowson & Landau 1982; FID of Heusel et al. 2017 evaluates it on Inception-v3 pool features).
The trace term is computed from the eigenvalues of the symmetric positive semi-definite
matrix S1^1/2 S2 S1^1/2, which equal those of S1 S2, so no non-symmetric matrix square root
(and no complex round-off) is needed. The linear algebra runs in torch (float64), which keeps
to torch's thread setting: numpy's multi-threaded BLAS ran the benchmark's 192-d Frechet
distances 30x slower on a shared 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0.0).sqrt()) @ vectors.T


def _f64(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 sum_i sqrt(lambda_i), with lambda_i the
    eigenvalues of sigma2^1/2 sigma1 sigma2^1/2 (those of sigma1^1/2 sigma2 sigma1^1/2 too).
    Computed in float64; never negative. See `FrechetReference` for many sets against one.
    """
    return FrechetReference(mu2, sigma2).distance(mu1, sigma1)


class FrechetReference:
    """A reference Gaussian N(mu, sigma) whose covariance square root is computed once, for the
    Frechet distance of many sample sets to it (one symmetric eigenvalue problem per set)."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        self.sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        d = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}) covariance matrices of {d}-vectors mu1, mu2; the reference "
                             f"(mu2, sigma2) has shapes {self.mu.shape} and {self.sigma.shape}")
        self.root = _sqrtm_psd(_f64(self.sigma))
        self.trace = float(np.trace(self.sigma))

    def distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FD of N(mu, sigma) to the reference (see `frechet_distance`)."""
        mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        d = self.mu.shape[0]
        if mu.shape != self.mu.shape:
            raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu.shape} and {self.mu.shape}")
        if sigma.shape != (d, d):
            raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}) covariance matrices, got {sigma.shape} and {self.sigma.shape}")
        middle = self.root @ _f64(sigma) @ self.root
        eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
        trace_sqrt = float(eigenvalues.clamp(min=0.0).sqrt().sum())
        diff = mu - self.mu
        return max(float(diff @ diff + np.trace(sigma) + self.trace - 2.0 * trace_sqrt), 0.0)

    def distance_of_features(self, features: np.ndarray) -> float:
        """FD of the Gaussian fit of an [n, d] feature set to the reference."""
        return self.distance(*feature_statistics(features))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, n-1) covariance of an [n, d] feature matrix, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be an [n >= 2, d] matrix, got shape {features.shape}")
    centred = _f64(features - features.mean(axis=0))
    return features.mean(axis=0), (centred.T @ centred / (features.shape[0] - 1)).numpy()


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets (FID when the features are Inception's)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def per_sample_rmse(samples, reference):
    """Root-mean-square difference of each sample to its reference, over all but the batch axis.

    Works on torch tensors or numpy arrays; returns a float64 numpy vector of length B.
    """
    a = np.asarray(_to_numpy(samples), dtype=np.float64)
    b = np.asarray(_to_numpy(reference), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"samples and reference must have one shape, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1))


def summarize_errors(errors: np.ndarray) -> dict[str, float]:
    """Mean, median and 90th percentile of per-sample errors.

    The median is reported beside the mean because one sample that lands in another mode of
    the data (a different digit) can dominate a mean.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return {"error_mean": math.nan, "error_median": math.nan, "error_p90": math.nan}
    return {
        "error_mean": float(errors.mean()),
        "error_median": float(np.median(errors)),
        "error_p90": float(np.quantile(errors, 0.9)),
    }


def loglog_slope(x, y) -> float:
    """Least-squares slope of log(y) against log(x): the empirical order of convergence (negated)."""
    x = np.log(np.asarray(x, dtype=np.float64))
    y = np.log(np.asarray(y, dtype=np.float64))
    return float(np.polyfit(x, y, 1)[0])


def _to_numpy(value):
    if hasattr(value, "detach"):
        return value.detach().cpu().double().numpy()
    return value


def files_fingerprint(paths: Sequence[str | Path]) -> str:
    """A short hash of each file's name, size and modification time (ns): what keys a cache on
    files that may change (the --reference images, the --inception weights) without reading them."""
    stats = []
    for path in map(Path, paths):
        status = path.stat()
        stats.append((path.name, status.st_size, status.st_mtime_ns))
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def stats_cache_key(**parts) -> str:
    """A short stable hash of the JSON-serialisable description of a reference set and its features."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_compute_statistics(
    path: str | Path | None, compute: Callable[[], np.ndarray], description: dict | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Reference statistics (mu, sigma) cached in an .npz file.

    If `path` exists, its `mu` and `sigma` are returned (and `description`, when given, must
    match the one stored, so a cache made with other features is never reused silently).
    Otherwise `compute()` returns the [n, d] reference features, whose statistics are written
    to `path` (when not None). Returns (mu, sigma, loaded_from_cache).
    """
    if path is not None:
        path = Path(path)
        if path.exists():
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise ValueError(f"reference statistics file {path} must hold arrays 'mu' and 'sigma'")
                stored = str(data["description"]) if "description" in data else None
                if description is not None and stored is not None and stored != json.dumps(description, sort_keys=True):
                    raise ValueError(
                        f"reference statistics file {path} was made for {stored}, not {json.dumps(description, sort_keys=True)}"
                    )
                return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), True
    mu, sigma = feature_statistics(compute())
    if path is not None:
        from ..safety import atomic_write

        extra = {"description": np.array(json.dumps(description or {}, sort_keys=True))}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
                np.savez(handle, mu=mu, sigma=sigma, **extra)

        atomic_write(path, write)
    return mu, sigma, False
