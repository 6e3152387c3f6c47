"""The models a sweep can run on, behind one small interface (`BenchModel`).

- The built-in exact models (no download): "mixture" (the default), a 6-component Gaussian
  mixture of 3x16x16 images whose ODE is solved to ~1e-7 by a reference integrator;
  "gaussian", a 64-d Gaussian whose ODE has a closed-form solution; and "digits", the ideal
  denoiser of scikit-learn's 1797 8x8 digits.
- A local diffusers folder (`--model PATH`): a DDPM / DDIM style UNet + scheduler, an NCSN++
  (VE) UNet with `ScoreSdeVeScheduler`, a model trained with this package (EDM
  preconditioning, `edm_sampling.schedulers.EDMScheduler`), or a Stable Diffusion folder
  (with a prompt; classifier-free guidance folded into the network, one call per evaluation).

Each model gives our samplers a denoiser D(x; sigma) and, where diffusers' own samplers
apply (discrete VP models), an epsilon network plus the scheduler config to build them from.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..families import EDM, VE
from ..safety.inputs import InvalidArgument, read_json_object, read_pipeline_index
from ..schedules import EDM_SIGMA_MAX, EDM_SIGMA_MIN, clamp_sigma_range

BUILTIN_MODELS = ("mixture", "gaussian", "digits")
VE_SAMPLING_RANGE = (0.02, 100.0)  # Table 1's VE range: our discretizations span at most this


@dataclass
class BenchModel:
    """What a sweep needs from a model.

    `denoiser`: D(x; sigma) in the model's own data space, for our samplers.
    `sigma_min`, `sigma_max`: the sampling range our discretizations span (EDM's 0.002..80
    clamped to the model's support).
    `unet`, `scheduler_config`: an epsilon-prediction (or v / sample) network with the
    `UNet2DModel` call signature and the config of its DDPM-family scheduler, for diffusers'
    own samplers; None where those samplers do not apply (VE, EDM models).
    `to_image`: model data -> images in [-1, 1] (VE data is in [0, 1]; latents are decoded).
    `exact_solution(x, sigma)`: the exact ODE solution at sigma = 0 from x at sigma, if known
    (closed form, or a reference integrator as accurate), described by `ode_reference`.
    `assign(x)`: for models with discrete modes (mixture components, training images), the
    mode each clean sample belongs to (int64 [B]); None for single-mode or unknown models.
    `reference_images()`: data images in [-1, 1] for the Frechet reference statistics.
    `data_draws(n, draw)`: n true data images (draw = 0, 1, ...: different draws) for the FD
    noise-floor estimate; None where the data cannot be drawn.
    `num_classes`: class-conditional models get one label per seed.
    `modules`: the other torch modules the callables use (a Stable Diffusion folder's VAE in
    `to_image`, its text encoder), moved with the rest by `to`.
    """

    name: str
    denoiser: Callable[..., torch.Tensor]
    sample_shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    unet: Callable[..., Any] | None = None
    scheduler_config: dict | None = None
    to_image: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    exact_solution: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    ode_reference: str = ""
    assign: Callable[[torch.Tensor], torch.Tensor] | None = None
    reference_images: Callable[[], torch.Tensor] | None = None
    reference_description: dict = field(default_factory=dict)
    data_draws: Callable[[int, int], torch.Tensor] | None = None
    num_classes: int | None = None
    info: dict = field(default_factory=dict)
    modules: tuple = ()

    def to(self, device: torch.device | str) -> "BenchModel":
        """Every torch module the model holds (denoiser, UNet, `modules`) moved to `device`."""
        for part in (self.denoiser, self.unet, *self.modules):
            if isinstance(part, torch.nn.Module):
                part.to(device)
        return self

    def class_labels(self, seeds: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """Per-seed class labels (drawn from the seed, so they do not depend on the batch)."""
        if not self.num_classes:
            return {}
        labels = [
            int(torch.randint(self.num_classes, (1,), generator=torch.Generator().manual_seed(10_000_019 + s)))
            for s in seeds
        ]
        return {"class_labels": torch.tensor(labels, device=device)}


def builtin_model(name: str = "mixture") -> BenchModel:
    """The built-in exact model: the oracle for our samplers and `OracleUNet2DModel` (its
    epsilon form for diffusers' default DDPM betas) for the scheduler loop."""
    from diffusers import DDPMScheduler

    from ..oracle_unet import OracleUNet2DModel
    from ..oracles import REFERENCE_RTOL, builtin_oracle, load_digits, solve_probability_flow_ode

    if name not in BUILTIN_MODELS:
        raise InvalidArgument("model", f"the built-in models are {BUILTIN_MODELS}, got {name!r} (or give a folder path)")
    unet = OracleUNet2DModel(dataset=name, coordinates="basis" if name == "mixture" else "pixel").eval()
    oracle = builtin_oracle(name) if name == "mixture" else unet.oracle  # the data, in image space
    scheduler_config = dict(DDPMScheduler(clip_sample=False).config)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    common = dict(name=name, denoiser=unet.oracle, sample_shape=shape, sigma_min=0.002, sigma_max=80.0, unet=unet,
                  scheduler_config=scheduler_config)
    def solution(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if name == "gaussian":
            return unet.oracle.ode_solution(x, sigma, 0.0)
        return solve_probability_flow_ode(unet.oracle, x, sigma, 0.0).solution

    integrator = (f"Dormand-Prince 5(4) in log sigma, float64, rtol {REFERENCE_RTOL:g} "
                  "(error <= 1e-7 RMSE by step halving, tests/test_oracles.py)")
    if name == "digits":
        digits = load_digits().float()

        def subsets(n: int, draw: int) -> torch.Tensor:
            return digits[torch.randperm(len(digits), generator=torch.Generator().manual_seed(1 + draw))[:n]]

        return BenchModel(
            **common,
            exact_solution=solution,
            ode_reference=integrator + "; it agrees with Heun at 511 model calls to 2e-9",
            assign=oracle.assign,
            reference_images=lambda: digits,
            reference_description={"data": "sklearn digits 8x8, 1797 images, [-1, 1]"},
            data_draws=subsets,
            info={"model": "exact denoiser of scikit-learn's 8x8 digits (1797 images)"},
        )

    def draws(n: int, draw: int) -> torch.Tensor:
        return oracle.sample_data(n, torch.Generator().manual_seed(1 + draw)).float()

    if name == "gaussian":
        reference, to_image, modes = "exact closed form", (lambda x: x), None
        description = "exact denoiser of a 64-d anisotropic Gaussian (closed-form ODE solution)"
    else:
        # sampled in the DCT coordinates where the covariances are diagonal (samplers commute
        # with the rotation; see GaussianMixtureOracle.in_basis_coordinates), shown as images
        reference, modes = integrator, unet.oracle.assign
        to_image = lambda z: oracle.from_basis(z).to(z.dtype)  # noqa: E731
        description = "exact denoiser of a 6-component Gaussian mixture of 3x16x16 images (DCT-diagonal covariances)"
    return BenchModel(
        **common,
        to_image=to_image,
        exact_solution=solution,
        ode_reference=reference,
        assign=modes,
        reference_images=lambda: oracle.sample_data(10_000, torch.Generator().manual_seed(0)).float(),
        reference_description={"data": f"built-in {name}, 10000 draws, seed 0"},
        data_draws=draws,
        info={"model": description},
    )


def _load_component(root: Path, name: str, spec: Any) -> Any:
    """Load component `name` of a pipeline folder from its [library, class] entry in model_index.json."""
    if not (isinstance(spec, (list, tuple)) and len(spec) == 2) or spec[0] is None:
        return None
    library, class_name = spec
    try:
        module = importlib.import_module(library)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as error:
        raise InvalidArgument("model", f"component {name!r} needs {library}.{class_name}, which cannot be imported: {error}") from error
    try:
        return cls.from_pretrained(str(root / name))
    except Exception as error:  # surfaced as a clear input error
        raise InvalidArgument("model", f"cannot load component {name!r} ({class_name}) from {root / name}: {error}") from error


def check_model_dependencies(name: str | Path) -> None:
    """`InvalidArgument` before any work when a built-in model needs an optional package that
    is missing (the digits: scikit-learn, which ships them offline)."""
    from . import EVAL_EXTRA, module_available

    if str(name) == "digits" and not module_available("sklearn"):
        raise InvalidArgument("model", f"the built-in digits need scikit-learn, which is not installed: {EVAL_EXTRA}")


def check_model_folder(path: str | Path) -> dict:
    """Validate a diffusers folder and return its model_index.json (before anything is loaded):
    every component's JSON files are read (`safety.inputs.read_pipeline_index`)."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidArgument("model", f"{str(path)!r} is neither a built-in model {BUILTIN_MODELS} nor a folder")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise InvalidArgument(
            "model", f"{root} is not a diffusers model folder (no model_index.json); save one with pipeline.save_pretrained(path)"
        )
    index = read_pipeline_index("model", root)
    pipeline = index.get("_class_name", "a pipeline")
    if "transformer" in index:
        raise InvalidArgument("model", f"{root} is a transformer pipeline ({pipeline}: SD3, Flux and the like); bench does not "
                                       "support transformer (flow) pipelines yet: it runs UNet folders (DDPM / DDIM, "
                                       "NCSN++, EDM, Stable Diffusion 1.x / 2.x)")
    unet_config = root / "unet" / "config.json"
    added = read_json_object("model", unet_config).get("addition_embed_type") if unet_config.is_file() else None
    if "text_encoder_2" in index or added is not None:
        raise InvalidArgument("model", f"{root} is a {pipeline} folder whose UNet takes added conditioning "
                                       f"(addition_embed_type {added!r}: SDXL's pooled text embeddings and image sizes); "
                                       "bench does not support SDXL's added conditioning yet")
    if "unet" not in index:
        raise InvalidArgument("model", f"{root} has no 'unet' component in model_index.json (components: {sorted(k for k in index if not k.startswith('_'))})")
    if "scheduler" not in index or not (root / "scheduler" / "scheduler_config.json").is_file():
        raise InvalidArgument("model", f"{root} has no scheduler/scheduler_config.json")
    return index


def load_model(
    path: str | Path,
    prompt: str | None = None,
    guidance_scale: float = 7.5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BenchModel:
    """A `BenchModel` from a built-in name or a local diffusers folder (see the module docstring)."""
    if str(path) in BUILTIN_MODELS:
        return builtin_model(str(path)).to(device)
    root = Path(path)
    index = check_model_folder(root)
    scheduler_config = read_json_object("model", root / "scheduler" / "scheduler_config.json")
    scheduler_class = scheduler_config.get("_class_name", "")
    is_sd = "text_encoder" in index and "vae" in index
    if is_sd and not prompt:
        raise InvalidArgument("prompt", f"{root} is a text-to-image model; give a prompt to sample it with")
    unet = _load_component(root, "unet", index["unet"])
    unet = unet.to(device).eval().requires_grad_(False)
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    if is_sd:
        return _stable_diffusion_model(root, index, unet, scheduler_config, prompt, guidance_scale, device, dtype)

    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else (config.sample_size,) * 2
    shape = (config.in_channels, *size)
    num_classes = getattr(config, "num_class_embeds", None)
    info = {"model": str(root), "pipeline": index.get("_class_name"), "scheduler": scheduler_class}
    reading, denoiser = _denoiser_of_folder(root, unet, scheduler_config)
    common = dict(name=root.name, denoiser=denoiser, sample_shape=shape, num_classes=num_classes, info=info)
    family = reading.family
    if isinstance(family, (VE, EDM)):  # the range the scheduler config states (EDMScheduler: its grid)
        lo, hi = (float(reading.scheduler_keys.get(key, default)) for key, default in (("sigma_min", 0.002), ("sigma_max", 80.0)))
        if isinstance(family, VE):
            lo, hi = clamp_sigma_range(*VE_SAMPLING_RANGE, lo, hi)
            return BenchModel(**common, sigma_min=lo, sigma_max=hi, to_image=lambda x: x * 2 - 1)
        return BenchModel(**common, sigma_min=lo, sigma_max=hi)
    lo, hi = clamp_sigma_range(EDM_SIGMA_MIN, EDM_SIGMA_MAX, family.sigma_min, family.sigma_max)
    return BenchModel(**common, sigma_min=lo, sigma_max=hi, unet=unet, scheduler_config=scheduler_config)


def _denoiser_of_folder(root: Path, net: Any, scheduler_config: dict) -> tuple[Any, Any]:
    """What a folder's scheduler config says (`families.read_scheduler_config`: the model family
    and its stated range) and `net`'s D(x; sigma) for that family. Bench runs discrete VP, VE
    and EDM models."""
    from ..denoisers import PreconditionedDenoiser
    from ..families import DiscreteVP, read_scheduler_config

    try:
        reading = read_scheduler_config(scheduler_config)
    except ValueError as error:
        raise InvalidArgument("model", f"the scheduler of {root} cannot be read: {error}") from error
    if not isinstance(reading.family, (DiscreteVP, VE, EDM)):
        raise InvalidArgument("model", f"{root} is a {reading.family.name!r} model; bench runs discrete VP (DDPM-family), VE and EDM models")
    return reading, PreconditionedDenoiser(net, reading.family)


class GuidedUNet(torch.nn.Module):
    """A text-conditioned UNet with classifier-free guidance folded in: one call evaluates the
    unconditional and conditional branches on a doubled batch and returns
    eps_u + w (eps_c - eps_u), so both our samplers and diffusers' count one call per step."""

    def __init__(self, unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.unet = unet
        self.register_buffer("cond", cond, persistent=False)
        self.register_buffer("uncond", uncond, persistent=False)
        self.guidance_scale = guidance_scale
        self.config = unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any):
        b = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        context = torch.cat([self.uncond.expand(b, -1, -1), self.cond.expand(b, -1, -1)])
        out = self.unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states=context).sample
        uncond, cond = out.chunk(2)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=uncond + self.guidance_scale * (cond - uncond))


def _stable_diffusion_model(root, index, unet, scheduler_config, prompt, guidance_scale, device, dtype) -> BenchModel:
    tokenizer = _load_component(root, "tokenizer", index["tokenizer"])
    text_encoder = _load_component(root, "text_encoder", index["text_encoder"]).to(device).eval()
    vae = _load_component(root, "vae", index["vae"]).to(device).eval()
    if vae.dtype != dtype:
        vae = vae.to(dtype=dtype)

    @torch.no_grad()
    def encode(text: str) -> torch.Tensor:
        ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids.to(device))[0].to(dtype)

    net = GuidedUNet(unet, encode(prompt), encode(""), guidance_scale)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size if isinstance(unet.config.sample_size, (list, tuple)) else (unet.config.sample_size,) * 2
    shape = (unet.config.in_channels, *size)
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def to_image(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(vae.dtype) / scaling).sample.float().clamp(-1, 1)

    reading, denoiser = _denoiser_of_folder(root, net, scheduler_config)
    lo, hi = clamp_sigma_range(EDM_SIGMA_MIN, EDM_SIGMA_MAX, reading.family.sigma_min, reading.family.sigma_max)
    return BenchModel(
        name=root.name, denoiser=denoiser, sample_shape=shape, sigma_min=lo, sigma_max=hi, unet=net,
        scheduler_config=scheduler_config, to_image=to_image, modules=(vae, text_encoder),
        info={"model": str(root), "pipeline": index.get("_class_name"), "prompt": prompt,
              "guidance_scale": guidance_scale, "image_size": [s * vae_factor for s in size]},
    )
