"""Quality metrics for the NFE sweep: Frechet distance, per-sample ODE error, summaries.

The Frechet distance between N(mu1, S1) and N(mu2, S2) is

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

(Dowson & Landau 1982; FID of Heusel et al. 2017 evaluates it on Inception-v3 pool features).
The trace term is computed from the eigenvalues of the symmetric positive semi-definite
matrix S1^1/2 S2 S1^1/2, which equal those of S1 S2, so no non-symmetric matrix square root
(and no complex round-off) is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 sum_i sqrt(lambda_i), with lambda_i the
    eigenvalues of sigma1^1/2 sigma2 sigma1^1/2. Computed in float64; never negative.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"sigma1 and sigma2 must be ({d}, {d}) covariance matrices, got {sigma1.shape} and {sigma2.shape}"
        )
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, n-1) covariance of an [n, d] feature matrix, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be an [n >= 2, d] matrix, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


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
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"description": np.array(json.dumps(description or {}, sort_keys=True))}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, **extra)
        tmp.replace(path)
    return mu, sigma, False
