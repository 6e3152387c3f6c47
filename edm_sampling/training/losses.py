"""Training losses of Table 1 (lower half, EDM_SPEC.md section 3), per sample.

Each loss draws sigma from its training distribution, noises the clean images
y -> y + n, n ~ N(0, sigma^2 I), and returns

    loss_i = lambda(sigma_i) * mean_pixels (D(y_i + n_i; sigma_i) - y_i)^2

with the denoiser D of the matching preconditioning (`preconditioning.precondition`).
The pixel mean (not sum) keeps the EDM loss at 1 for a network that outputs zeros on data
of std sigma_data, whatever the image size: lambda c_out^2 = 1 for every family.

| loss | sigma                              | lambda(sigma)                    |
| edm  | ln sigma ~ N(P_mean, P_std^2)      | (sigma^2 + sigma_d^2)/(sigma sigma_d)^2 |
| vp   | t ~ U(eps_t, 1), sigma = sigma_VP(t) | 1/sigma^2                       |
| ve   | ln sigma ~ U(ln sigma_min, ln sigma_max) | 1/sigma^2                  |
| ddpm | sigma_j, j ~ U{0..M-1} (the model's schedule) | 1/c_out^2 (MSE on the net's output) |

:class:`FamilyLoss` combines either noise distribution with either weighting for a model in its
own preconditioning (fine-tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from edm_sampling.schedules import VP_BETA_D, VP_BETA_MIN, vp_sigma

from .config import LOSSES


class LossOutput(NamedTuple):
    """Per-sample losses [B] and the sigmas [B] they were drawn at."""

    loss: torch.Tensor
    sigma: torch.Tensor


def denoising_loss(denoiser: Callable[..., torch.Tensor], y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                   weight: torch.Tensor, model_kwargs: dict[str, Any] | None = None) -> LossOutput:
    """lambda(sigma) * mean((D(y + sigma n; sigma) - y)^2) per sample, for given sigma [B] and n ~ N(0, I)."""
    column = sigma.reshape(-1, *([1] * (y.ndim - 1))).to(y.dtype)
    denoised = denoiser(y + noise * column, sigma, **(model_kwargs or {}))
    per_sample = (denoised.float() - y.float()).square().flatten(1).mean(dim=1)
    return LossOutput(weight.float() * per_sample, sigma)


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out(sigma)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


@dataclass
class LogNormalSigma:
    """ln sigma ~ N(p_mean, p_std^2), clamped to the model's [sigma_min, sigma_max]."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def __call__(self, batch: int, generator=None, device=None) -> torch.Tensor:
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(batch, generator=generator, device=device))
        return sigma.clamp(self.sigma_min, self.sigma_max)


@dataclass
class DiscreteTimestepSigma:
    """The DDPM recipe: a timestep j ~ U{0, ..., M-1}, sigma = sigma_j of the model's schedule."""

    train_sigmas: torch.Tensor

    def __call__(self, batch: int, generator=None, device=None) -> torch.Tensor:
        j = torch.randint(0, len(self.train_sigmas), (batch,), generator=generator, device=device)
        return self.train_sigmas.to(device=j.device, dtype=torch.float32)[j]


class Loss:
    """A training loss: a sigma distribution (``sample_sigma``) and a weight lambda(sigma)."""

    def sample_sigma(self, batch: int, generator=None, device=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, denoiser, y: torch.Tensor, generator=None, **model_kwargs: Any) -> LossOutput:
        """Draw sigma, then the noise, from ``generator`` and return the per-sample loss."""
        sigma = self.sample_sigma(y.shape[0], generator, y.device)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return denoising_loss(denoiser, y, sigma, noise, self.weight(sigma), model_kwargs)


@dataclass
class EDMLoss(Loss):
    """EDM: ln sigma ~ N(p_mean, p_std^2), lambda = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    def sample_sigma(self, batch: int, generator=None, device=None) -> torch.Tensor:
        return LogNormalSigma(self.p_mean, self.p_std)(batch, generator, device)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return edm_weight(sigma, self.sigma_data)


@dataclass
class VPLoss(Loss):
    """VP: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), lambda = 1/sigma^2."""

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN
    epsilon_t: float = 1e-5

    def sample_sigma(self, batch: int, generator=None, device=None) -> torch.Tensor:
        t = self.epsilon_t + (1 - self.epsilon_t) * torch.rand(batch, generator=generator, device=device)
        return vp_sigma(t.double(), self.beta_d, self.beta_min).float()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


@dataclass
class VELoss(Loss):
    """VE: ln sigma ~ U(ln sigma_min, ln sigma_max), lambda = 1/sigma^2."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def sample_sigma(self, batch: int, generator=None, device=None) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=device)
        return torch.exp(math.log(self.sigma_min) + u * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2


class FamilyLoss(Loss):
    """The loss of a model in its own preconditioning family (fine-tuning, or the DDPM recipe).

    Noise distribution: "lognormal" (EDM's, clamped to the model's sigma range) or "ddpm"
    (uniform integer timesteps of a discrete VP model). Weighting: "edm" (EDM's lambda) or
    "native": lambda = 1 / c_out(sigma)^2 of the model's own coefficients, i.e. a plain MSE on
    the network's raw output: epsilon-MSE for epsilon models, v-MSE for v-prediction, x0-MSE for
    sample prediction, EDM's lambda for EDM models.
    """

    def __init__(self, denoiser: Any, noise_distribution: str = "lognormal", weighting: str = "edm",
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        if noise_distribution == "ddpm":
            family = getattr(denoiser, "family", None)
            train_sigmas = getattr(family, "train_sigmas", None)
            if train_sigmas is None:
                name = getattr(family, "name", type(denoiser).__name__)
                raise ValueError(
                    f"--noise-distribution ddpm needs a model trained on discrete DDPM timesteps; "
                    f"this one is a {name!r} model: use --noise-distribution lognormal"
                )
            self.sampler: Callable[..., torch.Tensor] = DiscreteTimestepSigma(train_sigmas)
        elif noise_distribution == "lognormal":
            self.sampler = LogNormalSigma(p_mean, p_std, float(denoiser.sigma_min), float(denoiser.sigma_max))
        else:
            raise ValueError(f"--noise-distribution must be 'lognormal' or 'ddpm', got {noise_distribution!r}")
        if weighting not in ("edm", "native"):
            raise ValueError(f"--loss-weighting must be 'edm' or 'native', got {weighting!r}")
        self.weighting, self.sigma_data = weighting, sigma_data
        self._coefficients = denoiser.coefficients

    def sample_sigma(self, batch: int, generator=None, device=None) -> torch.Tensor:
        return self.sampler(batch, generator, device)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.weighting == "edm":
            return edm_weight(sigma, self.sigma_data)
        return 1 / self._coefficients(sigma).c_out.square()


def make_loss(name: str, **kwargs: Any) -> EDMLoss | VPLoss | VELoss:
    """The from-scratch loss called ``name`` ("edm", "vp", "ve"); the matching preconditioning
    family has the same name. The "ddpm" recipe is a :class:`FamilyLoss` (it needs the model)."""
    if name not in ("edm", "vp", "ve"):
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return {"edm": EDMLoss, "vp": VPLoss, "ve": VELoss}[name](**kwargs)


DEFAULT_BUCKET_EDGES = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0)


class SigmaBucketLog:
    """Running mean loss per sigma bucket (edges split (0, inf) into len(edges)+1 buckets).

    Sums and counts stay on the losses' device, so adding costs no host-device sync;
    :meth:`means` reads them back.
    """

    def __init__(self, edges: tuple[float, ...] = DEFAULT_BUCKET_EDGES):
        self.edges = tuple(edges)
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        """Accumulate per-sample losses [B] at sigmas [B]."""
        loss = loss.detach().float()
        if self.sums is None:
            self.sums = torch.zeros(len(self.edges) + 1, device=loss.device)
            self.counts = torch.zeros(len(self.edges) + 1, device=loss.device)
        edges = torch.tensor(self.edges, dtype=torch.float32, device=loss.device)
        index = torch.bucketize(sigma.detach().float().to(loss.device), edges)
        self.sums.index_add_(0, index, loss)
        self.counts.index_add_(0, index, torch.ones_like(loss))

    def labels(self) -> list[str]:
        bounds = (0.0, *self.edges, math.inf)
        return [f"sigma[{lo:g},{hi:g})" for lo, hi in zip(bounds[:-1], bounds[1:])]

    def means(self) -> dict[str, float]:
        """Mean loss per non-empty bucket, keyed by its sigma range."""
        if self.sums is None:
            return {}
        sums, counts = self.sums.tolist(), self.counts.tolist()
        return {k: s / c for k, s, c in zip(self.labels(), sums, counts) if c}

    def reset(self) -> None:
        self.sums = self.counts = None
