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

:class:`FamilyLoss` combines a noise distribution with a weighting for a model in its own
preconditioning (fine-tuning). Besides EDM's and the native ones it offers the "balanced"
weighting, lambda(sigma) = 1 / L0(sigma) with L0 the model's own loss at sigma when training
starts (:class:`BalancedWeight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch

from edm_sampling.safety.inputs import check_choice
from edm_sampling.schedules import (EDM_SIGMA_MAX, EDM_SIGMA_MIN, VP_BETA_D, VP_BETA_MIN, sigma_to_timestep,
                                   timestep_to_sigma, vp_sigma)

from .config import LOSS_WEIGHTINGS, LOSSES, NOISE_DISTRIBUTIONS

CALIBRATION_LEVELS = 16  # noise levels of the balanced weighting's table, log-spaced over the model's range
CALIBRATION_IMAGES = 64  # training images (per process) each level's loss is averaged over


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


class BalancedWeight:
    """lambda(sigma) = 1 / L0(sigma): the loss is 1 at every noise level when training starts.

    EDM chose lambda = 1/c_out^2 so that the initial loss of a new network has the same size at
    every sigma (section 5 of the paper); EDM2 (Karras et al. 2024) keeps the per-sigma losses
    equal during training by dividing by a learned estimate of each. A pretrained model's
    losses are far from equal: an epsilon model's MSE on epsilon is ~1e-3 at sigma = 80 and
    ~0.3 at sigma = 0.1, so its native weighting hardly trains the high noise levels, where
    D = x - sigma * eps multiplies every epsilon error by sigma. This weighting divides by
    L0(sigma) = E ||D(y + n; sigma) - y||^2 / pixels of the model as it is at step 0, measured
    on the training data at ``CALIBRATION_LEVELS`` noise levels log-spaced over the model's
    range and interpolated linearly in log sigma (clamped at the ends). It is in D space, so
    it is the same weighting whatever the model's parameterization.
    """

    def __init__(self, levels: torch.Tensor, losses: torch.Tensor):
        levels, losses = levels.double().reshape(-1), losses.double().reshape(-1)
        if len(levels) < 2 or levels.shape != losses.shape or not bool((levels[1:] > levels[:-1]).all()):
            raise ValueError("BalancedWeight needs >= 2 increasing noise levels and one loss per level")
        if not bool(torch.isfinite(losses).all() and (losses > 0).all()):
            raise ValueError(f"the pretrained model's per-sigma losses must be finite and > 0, got {losses.tolist()}")
        self.levels, self.losses = levels, losses
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """1 / L0(sigma), on sigma's device (no host copy: the training step stays sync-free)."""
        if sigma.device not in self._on_device:
            self._on_device[sigma.device] = (self.levels.to(sigma.device, torch.float32),
                                             self.losses.to(sigma.device, torch.float32))
        levels, losses = self._on_device[sigma.device]
        position = sigma_to_timestep(sigma.detach().float(), levels)  # fractional index, linear in log sigma
        return 1 / timestep_to_sigma(position, losses)  # log L0 interpolated linearly in log sigma

    def state_dict(self) -> dict[str, list[float]]:
        return {"levels": self.levels.tolist(), "losses": self.losses.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, list[float]]) -> "BalancedWeight":
        return cls(torch.tensor(state["levels"], dtype=torch.float64), torch.tensor(state["losses"], dtype=torch.float64))


def calibration_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """The noise levels the balanced weighting measures: the model's range, with EDM's
    [0.002, 80] at an end the model leaves open (EDM models support any sigma)."""
    return (sigma_min if sigma_min > 0 else EDM_SIGMA_MIN, sigma_max if math.isfinite(sigma_max) else EDM_SIGMA_MAX)


@torch.no_grad()
def per_sigma_loss(denoiser: Callable[..., torch.Tensor], batches: Iterable[Any], levels: torch.Tensor,
                   images: int = CALIBRATION_IMAGES, seed: int = 0) -> torch.Tensor:
    """Mean of ||D(y + sigma n; sigma) - y||^2 / pixels at each of ``levels`` [K] over the first
    ``images`` clean images y of ``batches`` (objects with ``y`` and ``model_kwargs``, like the
    trainer's batches), n ~ N(0, I) drawn from ``seed``. The denoiser runs in eval mode, on
    chunks of 4 batches' size (no gradients), and is left in the mode it was in."""
    ys: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []
    seen = 0
    for batch in batches:
        take = min(len(batch.y), images - seen)
        ys.append(batch.y[:take])
        kwargs.append({k: v[:take] for k, v in batch.model_kwargs.items()})
        seen += take
        if seen >= images:
            break
    if seen == 0:
        raise ValueError("the balanced loss weighting needs training images to measure the model's loss on")
    y = torch.cat(ys)
    model_kwargs = {k: torch.cat([kw[k] for kw in kwargs]) for k in kwargs[0]}
    chunk = 4 * len(ys[0])
    generator = torch.Generator(device=y.device).manual_seed(seed)
    module = denoiser if isinstance(denoiser, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    total = torch.zeros(len(levels), dtype=torch.float64)
    try:
        for k, level in enumerate(levels.tolist()):
            for start in range(0, len(y), chunk):
                part = y[start:start + chunk]
                sigma = torch.full((len(part),), level, device=y.device)
                noise = torch.randn(part.shape, generator=generator, device=y.device, dtype=y.dtype)
                out = denoising_loss(denoiser, part, sigma, noise, torch.ones_like(sigma),
                                     {name: v[start:start + chunk] for name, v in model_kwargs.items()})
                total[k] += float(out.loss.float().sum())  # float64 on the host: MPS has none
    finally:
        if module is not None:
            module.train(was_training)
    return total / len(y)


class Loss:
    """A training loss: a sigma distribution (``sample_sigma``) and a weight lambda(sigma)."""

    needs_calibration = False  # FamilyLoss's balanced weighting measures the model first

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume this loss exactly (nothing for a fixed formula)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

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

    Noise distribution: "lognormal" (EDM's, clamped to the model's sigma range), "ddpm"
    (uniform integer timesteps of a discrete VP model) or "native" (the model's own: "ddpm"
    for discrete VP models, "lognormal" for EDM models). Weighting: "edm" (EDM's lambda),
    "native": lambda = 1 / c_out(sigma)^2 of the model's own coefficients, i.e. a plain MSE on
    the network's raw output (epsilon-MSE for epsilon models, v-MSE for v-prediction, x0-MSE for
    sample prediction, EDM's lambda for EDM models), or "balanced": 1 / (the model's own loss
    at sigma at the start), which needs :meth:`calibrate` before the first step
    (:class:`BalancedWeight`).
    """

    def __init__(self, denoiser: Any, noise_distribution: str = "lognormal", weighting: str = "edm",
                 p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        check_choice("noise_distribution", noise_distribution, NOISE_DISTRIBUTIONS)
        check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
        family = getattr(denoiser, "family", None)
        train_sigmas = getattr(family, "train_sigmas", None)
        if noise_distribution == "native":
            noise_distribution = "lognormal" if train_sigmas is None else "ddpm"
        if noise_distribution == "ddpm":
            if train_sigmas is None:
                name = getattr(family, "name", type(denoiser).__name__)
                raise ValueError(
                    f"--noise-distribution ddpm needs a model trained on discrete DDPM timesteps; "
                    f"this one is a {name!r} model: use --noise-distribution lognormal"
                )
            self.sampler: Callable[..., torch.Tensor] = DiscreteTimestepSigma(train_sigmas)
        else:
            self.sampler = LogNormalSigma(p_mean, p_std, float(denoiser.sigma_min), float(denoiser.sigma_max))
        self.noise_distribution, self.weighting, self.sigma_data = noise_distribution, weighting, sigma_data
        self.sigma_range = (float(denoiser.sigma_min), float(denoiser.sigma_max))
        self._coefficients = denoiser.coefficients
        self.balanced: BalancedWeight | None = None

    @property
    def needs_calibration(self) -> bool:
        """True until the balanced weighting has measured (or been given) its loss table."""
        return self.weighting == "balanced" and self.balanced is None

    def calibrate(self, denoiser: Any, batches: Iterable[Any],
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0) -> BalancedWeight:
        """Measure the balanced weighting's table: the loss of ``denoiser`` (as it is now) at
        ``CALIBRATION_LEVELS`` noise levels log-spaced over its range, on ``batches`` of
        training data; ``reduce`` averages the table over processes."""
        lo, hi = calibration_range(*self.sigma_range)
        levels = torch.exp(torch.linspace(math.log(lo), math.log(hi), CALIBRATION_LEVELS, dtype=torch.float64))
        losses = per_sigma_loss(denoiser, batches, levels, seed=seed)
        if reduce is not None:
            losses = reduce(losses)
        self.balanced = BalancedWeight(levels, losses)
        return self.balanced

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the balanced weighting's table (empty for the other weightings)."""
        return {"balanced": self.balanced.state_dict()} if self.balanced is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("balanced"):
            self.balanced = BalancedWeight.from_state_dict(state["balanced"])

    def sample_sigma(self, batch: int, generator=None, device=None) -> torch.Tensor:
        return self.sampler(batch, generator, device)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.weighting == "edm":
            return edm_weight(sigma, self.sigma_data)
        if self.weighting == "balanced":
            if self.balanced is None:
                raise RuntimeError("the balanced loss weighting is not calibrated: call FamilyLoss.calibrate first")
            return self.balanced(sigma)
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
