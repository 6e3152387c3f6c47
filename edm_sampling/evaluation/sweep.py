"""The NFE sweep: every sampler at every target NFE on the same seeds, scored four ways.

1. ODE error. Each deterministic run is compared with a high-accuracy solution of the
   probability-flow ODE from the *same starting state* (the sampler's own first noise level
   and its latents scaled the way it scales them): the closed-form solution (gaussian) or a
   reference integrator accurate to ~1e-7 (mixture, digits) where the model has one, else Heun on a
   `reference_steps`-step EDM grid in float64 (256 steps: 511 model calls), whose own
   accuracy is estimated by halving its step count. The per-sample RMSE is summarised by
   mean, median and 90th percentile; the tables show the median, the typical sample's
   accuracy, because a sample that ends in another mode (item 2) moves the mean by its whole
   distance / num_samples. Stochastic samplers have no ODE reference.
2. Mode mismatch, for models whose data has discrete modes (the mixture's components, the
   digits' 1797 training images): the fraction of samples that end in another mode than their
   reference. On the digits it is what tells samplers apart: the ideal denoiser of a finite
   dataset snaps every sample onto a training image, so a sample's error is either ~0 (same
   image as the reference: from NFE ~17 on the median is 0 for every sampler) or the
   distance between two digits; the mean error is the mismatch fraction times that
   distance. Their reference is the Dormand-Prince integrator too (~570 model calls,
   <= 1e-7); Heun at 256 steps (511 calls) agrees with it to 2e-9, Heun at 128 steps
   changes the training image of 1 sample in 64.
3. Frechet distance to the data (FID with `--inception PATH`, else FD on pooled pixels; see
   `features.py`), with the reference statistics cached in an .npz; beside it, the FD of as
   many true data draws (mean +- std over a few draws), the score of a perfect sampler.
4. Wall time per sample and the model calls actually made.

Seeds are split into fixed chunks of `batch_size` (at most num_samples / P, so that every
process gets work); chunk k runs on process k mod P. Every
sample draws its noise from its own generator seeded with its seed, so the numbers do not
depend on the number of processes (`accelerate launch --num_processes P`).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..safety.inputs import SEED, InvalidArgument, Number, check_bool, check_choice, existing_path, output_folder
from . import EVAL_EXTRA, metrics, module_available
from .samplers_registry import (
    DEFAULT_NFE,
    SAMPLER_GROUPS,
    SamplerSpec,
    core_rows,
    describe,
    resolve_samplers,
    run_sampler,
    sampler_set_line,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SweepConfig:
    """Everything a sweep needs; `validate()` checks it all before any model is run."""

    model: str = "mixture"
    samplers: Sequence[str] | None = None
    nfe: Sequence[int] = DEFAULT_NFE
    num_samples: int = 256
    batch_size: int = 256
    seed: int = 0
    reference_steps: int = 256
    inception: str | None = None
    reference: str | None = None
    stats_cache: str | None = None
    output: str | None = None
    overwrite: bool = False
    prompt: str | None = None
    guidance_scale: float = 7.5
    dtype: str = "float32"
    grid_images: int = 64
    progress: bool = True
    quiet: bool = False
    ode_errors: bool = True
    extra_specs: list = field(default_factory=list)
    schedule_file: str | None = None

    def validate(self) -> list[SamplerSpec]:
        """`InvalidArgument` naming the first bad option (the CLI shows its flag), every input file
        read far enough to know it is usable; returns the sampler specs."""
        nfe = self.nfe
        if isinstance(nfe, (str, bytes)) or not isinstance(nfe, Sequence) or not nfe:
            raise InvalidArgument("nfe", f"give one or more target NFEs, got {nfe!r}")
        for value in nfe:
            NFE.check("nfe", value)
        for name, rule in NUMBER_OPTIONS.items():
            rule.check(name, getattr(self, name))
        if self.reference_steps in (1, 2, 3):
            raise InvalidArgument("reference_steps", f"must be 0 (no ODE error) or an integer >= 4, got {self.reference_steps}")
        check_choice("dtype", self.dtype, DTYPES)
        for name in ("overwrite", "progress", "quiet", "ode_errors"):
            check_bool(name, getattr(self, name))
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidArgument("prompt", f"must be a text or None, got {self.prompt!r}")
        if self.samplers is not None and (isinstance(self.samplers, (str, bytes)) or not isinstance(self.samplers, Sequence)):
            raise InvalidArgument("samplers", f"must be a list of sampler names, got {self.samplers!r}")
        if self.samplers is not None and not self.samplers and not self.extra_specs:
            raise InvalidArgument("samplers", "give at least one sampler name (or None for all of them)")
        specs = resolve_samplers(self.samplers) if self.samplers or not self.extra_specs else []
        specs = specs + list(self.extra_specs)
        if self.schedule_file is not None:
            from .schedule_search import schedule_file_specs

            existing_path("schedule_file", self.schedule_file, what="schedule file")
            schedule_file_specs(self.schedule_file, nfe, scheduler_loop=True)  # checks the file and its NFEs
        if self.output is not None:
            from .report import check_output_dir

            check_output_dir(self.output, self.overwrite)
        if self.stats_cache is not None:
            output_folder("stats_cache", self.stats_cache)
        if self.inception is not None:
            existing_path("inception", self.inception)
        if self.reference is not None:
            check_reference(self.reference)
        from .models import BUILTIN_MODELS, check_model_dependencies, check_model_folder

        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise InvalidArgument("model", f"must be a built-in model {BUILTIN_MODELS} or a folder, got {self.model!r}")
        if str(self.model) not in BUILTIN_MODELS:
            check_model_folder(self.model)
        check_model_dependencies(self.model)
        return specs


NFE = Number(1, integer=True)
NUMBER_OPTIONS = {
    "num_samples": Number(2, integer=True),  # a covariance needs two samples
    "batch_size": Number(1, integer=True),
    "seed": SEED,
    "reference_steps": Number(0, integer=True),
    "guidance_scale": Number(0),
    "grid_images": Number(0, integer=True),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def reference_image_files(path: Path) -> list[Path]:
    """The images of a --reference folder, sorted."""
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_reference(reference: Any) -> None:
    """``--reference`` before any work: an .npz with arrays mu [d] and sigma [d, d], or a folder of
    at least 2 images, each of which opens and passes PIL's integrity check (`Image.verify`:
    headers, chunk checksums). The pixels are decoded before sampling starts (`run_sweep`)."""
    from PIL import Image

    path = existing_path("reference", reference, folder=Path(str(reference)).is_dir(), what="file or folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise InvalidArgument("reference", f"{path} must be an .npz with arrays mu and sigma, or a folder of images")
        try:
            with np.load(path, allow_pickle=False) as data:
                mu, sigma = (data[key] if key in data else None for key in ("mu", "sigma"))
        except Exception as error:  # OSError, ValueError, zipfile.BadZipFile, ...: a damaged file
            raise InvalidArgument("reference", f"cannot read {path} as an .npz: {error}") from None
        if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise InvalidArgument("reference", f"{path} must hold arrays 'mu' [d] and 'sigma' [d, d]")
        return
    files = reference_image_files(path)
    if len(files) < 2:
        raise InvalidArgument("reference", f"{path} holds fewer than 2 images ({', '.join(IMAGE_SUFFIXES)})")
    for file in files:
        try:
            with Image.open(file) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for damaged files
            raise InvalidArgument("reference", f"cannot read the image {file}: {error or type(error).__name__}") from None


def _chunks(num_samples: int, batch_size: int, seed: int, world: int = 1) -> list[list[int]]:
    """The seeds in chunks of at most `batch_size`, and of at most ceil(num_samples / world) so
    that each of `world` processes gets work (chunk k runs on process k mod world)."""
    size = min(batch_size, -(-num_samples // world))
    seeds = list(range(seed, seed + num_samples))
    return [seeds[i : i + size] for i in range(0, num_samples, size)]


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _latents_and_generators(seeds, shape, device, dtype):
    """Per-seed noise: each sample's generator draws its latents, then its churn noise."""
    from ..samplers import randn

    gens = _generators(seeds)
    return randn((len(seeds), *shape), gens, device, dtype), gens


def reference_solution(model, latents, start_sigma, start_scale, steps, model_kwargs) -> torch.Tensor:
    """The ODE solution at sigma = 0 from x = start_scale * latents at start_sigma: the model's
    own (closed form or reference integrator) where it has one, else Heun on a `steps`-step
    EDM grid in float64."""
    from ..samplers import sample
    from ..schedules import karras_sigmas

    x0 = latents.to(torch.float64) * start_scale
    if model.exact_solution is not None:
        return model.exact_solution(x0, start_sigma).to(torch.float64)
    sigma_min = min(model.sigma_min, start_sigma / 2)
    sigmas = karras_sigmas(steps, sigma_min=sigma_min, sigma_max=start_sigma)
    with torch.no_grad():
        out = sample(model.denoiser, x0 / start_sigma, sigmas, solver="heun", state_dtype=torch.float64,
                     model_kwargs=model_kwargs, round_sigma=getattr(model.denoiser, "round_sigma", None))
    return out.sample.to(torch.float64)


START_TOLERANCE = 1e-7


def _same_start(references: dict, key: tuple) -> tuple:
    """The key of a reference already computed from the same start (same chunk, sigma and
    scale within START_TOLERANCE relative: float32 and float64 copies of one level, as
    diffusers' schedulers keep them), else `key`. A relative start difference d moves the
    solution at sigma = 0 by about d sqrt(lam_max) (x_0 = scale z shrinks by sqrt(lam) / sigma
    along the ODE): at most 5e-8 RMS on the built-in data, below the reference's own error."""
    for other in references:
        if other[0] == key[0] and all(abs(a - b) <= START_TOLERANCE * abs(b) for a, b in zip(key[1:], other[1:])):
            return other
    return key


def _modes(model, sample: torch.Tensor) -> torch.Tensor | None:
    """The mode of each sample (model.assign), on the CPU; None for models without modes."""
    if model.assign is None:
        return None
    with torch.no_grad():
        return model.assign(sample.to(_param_device(model), torch.float64)).cpu()


def _reference_check(model, latents, start_sigma, start_scale, steps, model_kwargs, reference) -> dict:
    """How far the Heun reference is from its own half-step solution: its error is about a
    third of that where Heun is in its second-order regime."""
    coarse = reference_solution(model, latents, start_sigma, start_scale, steps // 2, model_kwargs)
    diff = metrics.per_sample_rmse(coarse, reference)
    return {"steps": steps, "half_steps_rmse_median": float(np.median(diff)), "half_steps_rmse_max": float(diff.max()),
            "estimated_error": float(diff.max()) / 3.0}


def _distributed():
    """(rank, world size, device, gather) from accelerate when launched with it; plain otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        # on a machine without GPUs accelerate forms a gloo (CPU) group only when asked with cpu=True
        state = PartialState(cpu=not torch.cuda.is_available())
        return state.process_index, state.num_processes, state.device, gather_object, state.wait_for_everyone
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return 0, 1, device, (lambda x: x), (lambda: None)


def _features(config: SweepConfig, device):
    from .features import InceptionFeatures, PixelFeatures

    if config.inception:
        return InceptionFeatures(config.inception, device=device)
    return PixelFeatures()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edm_sampling" / "fd_stats"


def _load_reference_images(path: Path, image_shape: Sequence[int], limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` (all) images of a folder as [N, C, H, W] in [-1, 1], in the samples'
    `image_shape` (C, H, W): converted to their channel count and, where another size, resized
    to theirs (bicubic, antialiased: as FID pipelines resize real images to the size compared);
    `InvalidArgument` naming a file that does not decode."""
    from PIL import Image

    channels, height, width = image_shape
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for file in reference_image_files(path)[:limit]:
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(image, dtype=np.float32).reshape(height, width, -1))
        except Exception as error:  # PIL raises many types for damaged files
            raise InvalidArgument("reference", f"cannot read the image {file}: {error or type(error).__name__}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def reference_image_sizes(path: Path) -> list[tuple[int, int]]:
    """The distinct (width, height) of a --reference folder's images (headers only), sorted."""
    from PIL import Image

    sizes = set()
    for file in reference_image_files(path):
        with Image.open(file) as image:
            sizes.add(image.size)
    return sorted(sizes)


def _resize_note(config: SweepConfig, image_shape: Sequence[int]) -> str | None:
    """The note saying that the --reference images are resized to the samples' size, or None."""
    if config.reference is None or config.reference.endswith(".npz"):
        return None
    target = (image_shape[2], image_shape[1])
    other = [size for size in reference_image_sizes(Path(config.reference)) if size != target]
    if not other:
        return None
    sizes = ", ".join(f"{w}x{h}" for w, h in other)
    return (f"--reference images of {sizes} are resized to the samples' {target[0]}x{target[1]} (bicubic, antialiased, "
            "as FID pipelines resize real images) before their features are taken")


def reference_statistics(config: SweepConfig, model, features, image_shape) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(mu, sigma, info) of the data features, from --reference or the built-in data, cached in an .npz."""
    if config.reference is not None and config.reference.endswith(".npz"):
        with np.load(config.reference, allow_pickle=False) as data:  # its arrays were checked by check_reference
            dim = features.describe(image_shape)["dim"]
            if data["mu"].shape != (dim,):
                raise InvalidArgument("reference", f"{config.reference} holds {data['mu'].shape[0]}-d statistics; "
                                 f"the samples' {features.name} features are {dim}-d")
            return data["mu"], data["sigma"], {"source": config.reference}
    if config.reference is not None:
        folder = Path(config.reference)
        images_fn = lambda: _load_reference_images(folder, image_shape)  # noqa: E731
        description = {"data": str(folder.resolve()), "files": metrics.files_fingerprint(reference_image_files(folder)),
                       "image_shape": list(image_shape)}
    elif model.reference_images is not None:
        images_fn, description = model.reference_images, dict(model.reference_description)
    else:
        return None
    description.update(features.describe(image_shape))
    key = metrics.stats_cache_key(**description)
    cache_dir = Path(config.stats_cache) if config.stats_cache else _default_cache_dir()
    path = cache_dir / f"{key}.npz"

    def compute() -> np.ndarray:
        images = images_fn()
        return torch.cat([features(images[i : i + 500]) for i in range(0, len(images), 500)]).numpy()

    mu, sigma, cached = metrics.load_or_compute_statistics(path, compute, description)
    return mu, sigma, {"source": description, "cache": str(path), "loaded_from_cache": cached}


def _notes(config: SweepConfig, specs: list[SamplerSpec], nfes: list[int], model, skipped: list[str], fd_available: bool) -> list[str]:
    """One line for each option that does nothing or does less than asked, so nothing is silent."""
    notes = []
    if skipped:
        notes.append(f"skipped {', '.join(skipped)}: they run diffusers' scheduler loop on a discrete VP (DDPM-family) "
                     f"epsilon network, and {config.model} is not one (VE / EDM models run our core samplers only; "
                     "EDMScheduler rows ran as the same solver and grid on the core runner)")
    if config.schedule_file is not None:
        from ..schedules import read_schedule_file

        searched_on = read_schedule_file(config.schedule_file, "schedule_file").meta.get("model")
        if searched_on is not None and str(searched_on) != str(config.model):
            notes.append(f"--schedule-file {config.schedule_file} was searched on {searched_on}, not {config.model}: "
                         "a schedule fits the model it was searched on")
    if config.prompt and "prompt" not in model.info:
        notes.append(f"--prompt ignored: {config.model} is not a text-to-image model")
    if not fd_available:
        notes.append("Frechet distance skipped: a --model folder has no reference data; give --reference "
                     "(a folder of images or an .npz with mu and sigma)")
    if config.output is not None and not module_available("matplotlib"):
        notes.append(f"no plots (quality_vs_nfe.png, tune.png): matplotlib is not installed ({EVAL_EXTRA}); the tables, "
                     "CSV, JSON and sample grids are written")
    if config.reference_steps == 0 and config.ode_errors:
        notes.append("ODE error skipped: --reference-steps 0")
    elif model.exact_solution is not None and config.reference_steps != SweepConfig.reference_steps:
        notes.append(f"--reference-steps {config.reference_steps} ignored: {config.model} has an exact reference "
                     f"({model.ode_reference})")
    for nfe in nfes:
        short = [f"{s.name} ({s.nfe_for_steps(s.steps_for_nfe(nfe))})" for s in specs
                 if s.nfe_for_steps(s.steps_for_nfe(nfe)) != nfe]
        if short:
            notes.append(f"NFE {nfe}: these samplers cannot make exactly {nfe} calls and make the largest count below it "
                         f"(Heun-type: 2N - 1 calls for N steps): {', '.join(short)}")
    return notes


def run_sweep(config: SweepConfig, model=None, folder=None) -> dict[str, Any]:
    """Run the sweep; on the main process returns {"rows", "meta", "samples", "features",
    "reference_statistics"} and writes the outputs when `config.output` is set; other
    processes return {}. `model`: an already loaded `BenchModel` for config.model (else it is
    loaded here). `folder`: the output folder, already opened (`open_output_folder`) by a caller
    that writes more into it (tune); else the main process opens it itself, before any work, and
    commits it after writing. The built-in models run on one CPU thread (restored afterwards): their
    tensors are too small for threads to pay off, and threads stall when the CPU is shared;
    use several processes (torchrun) to use more cores."""
    threads = torch.get_num_threads()
    if str(config.model) in _builtin_models():
        torch.set_num_threads(1)
    try:
        return _run_sweep(config, model, folder)
    finally:
        torch.set_num_threads(threads)


def _builtin_models() -> tuple[str, ...]:
    from .models import BUILTIN_MODELS

    return BUILTIN_MODELS


def _run_sweep(config: SweepConfig, model=None, folder=None) -> dict[str, Any]:
    specs = config.validate()
    rank, world, device, gather, barrier = _distributed()
    nfes = sorted(dict.fromkeys(int(n) for n in config.nfe))
    own = folder is None and config.output is not None and rank == 0
    if own:
        folder = agree(gather, lambda: open_output_folder(config, sweep_outputs(config, specs, nfes)))
    else:
        agree(gather, lambda: None)
    try:
        result = _sweep(config, specs, nfes, model, rank, world, device, gather, barrier)
        if own and result:
            folder.commit()
        return result
    finally:
        if own:
            folder.__exit__(None, None, None)


def agree(gather, work: Callable[[], Any]) -> Any:
    """``work()`` on this process, then every process learns whether it failed on any (a
    ValueError there is raised everywhere), so that none waits forever for one that gave up."""
    result, error = None, None
    try:
        result = work()
    except ValueError as caught:
        error = caught
    errors = [e for e in gather([error]) if e is not None]
    if errors:
        raise errors[0]
    return result


def sweep_outputs(config: SweepConfig, specs: Sequence[SamplerSpec], nfes: Sequence[int]) -> list[str]:
    """The files a sweep writes in its output folder (known before it runs)."""
    from .report import OUTPUT_FILES

    grids = [grid_name(spec.name, nfe) for spec in specs for nfe in nfes] if config.grid_images else []
    return list(OUTPUT_FILES) + grids


def grid_name(sampler: str, nfe: int) -> str:
    """The sample grid of one sampler at one NFE, inside the output folder."""
    return f"grids/{_safe(sampler)}_nfe{nfe}.png"


def open_output_folder(config: SweepConfig, outputs: Sequence[str]):
    """The output folder as a `RunFolder` (lock, clean-up, manifest), entered: the rule of
    ``--overwrite`` checked again with the lock held, and every file at ``outputs`` one that
    edm_sampling wrote (a user's file there is refused, never replaced). Leave it with
    ``__exit__``; ``commit`` after writing deletes the earlier results this run did not rewrite."""
    from ..safety import RunFolder
    from .report import check_output_dir

    folder = RunFolder(config.output, parameter="output").__enter__()
    try:
        check_output_dir(config.output, config.overwrite)
        folder.check_replaceable(folder.root / name for name in outputs)
    except BaseException:
        folder.__exit__(None, None, None)
        raise
    return folder


def _sweep(config, specs, nfes, model, rank, world, device, gather, barrier) -> dict[str, Any]:
    wall_start = time.perf_counter()
    features = _features(config, device)  # loads --inception now: a bad file fails before sampling
    from .models import load_model

    dtype = DTYPES[config.dtype]
    if model is None:
        model = load_model(config.model, prompt=config.prompt, guidance_scale=config.guidance_scale, device=device, dtype=dtype)
    model.to(device)
    added: list[str] = []
    if config.schedule_file is not None:
        from .schedule_search import with_schedule_file_rows

        specs, added = with_schedule_file_rows(specs, config.schedule_file, config.nfe, model.unet is not None)
    skipped = []
    if model.unet is None:  # VE / EDM models: rows from groups run their core equivalent, or are skipped
        specs, skipped = core_rows(specs, explicit=[n for n in config.samplers or [] if n not in SAMPLER_GROUPS])
    if any(s.runner == "scheduler" for s in specs) and model.unet is None:
        names = [s.name for s in specs if s.runner == "scheduler"]
        raise InvalidArgument("samplers", f"{names} need a discrete VP (DDPM-family) model; {config.model} is not one")

    chunks = _chunks(config.num_samples, config.batch_size, config.seed, world)
    mine = [k for k in range(len(chunks)) if k % world == rank]
    inputs = agree(gather, lambda: _read_inputs(config, model, features, device, dtype) if rank == 0 else None)
    fd_available = config.reference is not None or model.reference_images is not None
    notes = _notes(config, specs, nfes, model, skipped, fd_available) + (inputs["notes"] if inputs else [])
    if rank == 0 and not config.quiet:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    do_errors = config.ode_errors and config.reference_steps > 0
    from tqdm.auto import tqdm

    my_samples = sum(len(chunks[k]) for k in mine)
    bar = tqdm(total=len(specs) * len(nfes) * my_samples, disable=not config.progress or rank != 0, desc="bench",
               unit="sample", unit_scale=False)
    records = []
    references: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
    ref_check = None
    for spec in specs:
        for nfe in nfes:
            steps = spec.steps_for_nfe(nfe)
            for k in mine:
                seeds = chunks[k]
                bar.set_postfix_str(f"{spec.name} NFE {nfe}")
                latents, gens = _latents_and_generators(seeds, model.sample_shape, device, dtype)
                kwargs = model.class_labels(seeds, device)
                out = run_sampler(spec, model, latents, steps, gens, kwargs)
                errors = mismatch = None
                if do_errors and not spec.stochastic:
                    key = _same_start(references, (k, out.start_sigma, out.start_scale))
                    if key not in references:
                        bar.set_postfix_str(f"{spec.name} NFE {nfe}: reference ODE solution")
                        reference = reference_solution(model, latents, out.start_sigma, out.start_scale,
                                                       config.reference_steps, kwargs)
                        references[key] = (reference, _modes(model, reference))
                        if ref_check is None and model.exact_solution is None:
                            ref_check = _reference_check(model, latents, out.start_sigma, out.start_scale,
                                                         config.reference_steps, kwargs, reference)
                    reference, reference_modes = references[key]
                    errors = metrics.per_sample_rmse(out.sample, reference)
                    if reference_modes is not None:
                        mismatch = (_modes(model, out.sample) != reference_modes).numpy()
                records.append({"sampler": spec.name, "nfe_target": nfe, "chunk": k, "steps": out.steps, "nfe": out.nfe,
                                "seconds": out.seconds, "start_sigma": out.start_sigma, "errors": errors, "mismatch": mismatch,
                                "sample": out.sample.detach().float().cpu()})
                bar.update(len(seeds))
    bar.close()
    records = gather(records)
    checks = gather([ref_check])
    per_process = gather([my_samples])
    if rank != 0:
        barrier()
        return {}
    ref_check = next((c for c in checks if c is not None), None)
    result = _assemble(config, specs, nfes, model, features, records, ref_check, inputs["statistics"])
    result["true_images"] = inputs["true_images"]
    result["meta"]["notes"] = notes
    result["meta"]["sampler_set"] = sampler_set_line(config.samplers, [s.name for s in specs], added, config.schedule_file)
    result["meta"]["wall_time_s"] = time.perf_counter() - wall_start
    result["meta"]["num_processes"] = world
    result["meta"]["samples_per_process"] = per_process
    if config.output is not None:
        write_outputs(config, result, model)
    barrier()
    return result


def _read_inputs(config: SweepConfig, model, features, device, dtype) -> dict[str, Any]:
    """Everything the sweep reads from the user's files, read before sampling (a damaged image
    fails now, not after the sweep): the reference statistics (the --reference images decoded,
    unless cached) and the true images shown beside the sample grids."""
    with torch.no_grad():
        image_shape = tuple(model.to_image(torch.zeros(1, *model.sample_shape, device=device, dtype=dtype)).shape[1:])
    truth = None
    if config.output is not None and config.grid_images:
        truth = _true_images(config, model, config.grid_images, image_shape)
    return {"statistics": reference_statistics(config, model, features, image_shape), "true_images": truth,
            "notes": [note for note in [_resize_note(config, image_shape)] if note]}


def _assemble(config, specs, nfes, model, features, records, ref_check, stats) -> dict[str, Any]:
    from .report import starts_from_prior

    by_run: dict[tuple, list] = {}
    for r in records:
        by_run.setdefault((r["sampler"], r["nfe_target"]), []).append(r)
    first = next(iter(by_run.values()))
    image_shape = tuple(model.to_image(first[0]["sample"][:1].to(_param_device(model))).shape[1:])
    reference = None if stats is None else metrics.FrechetReference(stats[0], stats[1])
    rows, samples, sample_features = [], {}, {}
    for spec in specs:
        for nfe in nfes:
            parts = sorted(by_run[(spec.name, nfe)], key=lambda r: r["chunk"])
            sample = torch.cat([p["sample"] for p in parts])
            measured = sorted({p["nfe"] for p in parts})
            row = {"sampler": spec.name, "family": spec.family, "stochastic": spec.stochastic, "steps": parts[0]["steps"],
                   "nfe_target": nfe, "nfe": measured[-1], "num_samples": int(sample.shape[0]),
                   "sec_per_sample": sum(p["seconds"] for p in parts) / sample.shape[0],
                   "start_sigma": parts[0]["start_sigma"],
                   "from_prior": starts_from_prior(parts[0]["start_sigma"], model.sigma_max)}
            if any(p["errors"] is not None for p in parts):
                row.update(metrics.summarize_errors(np.concatenate([p["errors"] for p in parts])))
            else:
                row.update(metrics.summarize_errors(np.array([])))
            has_modes = any(p["mismatch"] is not None for p in parts)
            row["mode_mismatch"] = float(np.concatenate([p["mismatch"] for p in parts]).mean()) if has_modes else math.nan
            images = _to_images(model, sample)
            row["fd"] = math.nan
            if reference is not None:
                feats = sample_features[(spec.name, nfe)] = features(images).numpy()
                row["fd"] = reference.distance_of_features(feats)
            rows.append(row)
            samples[(spec.name, nfe)] = images
    exact = model.exact_solution is not None
    meta = {
        "model": config.model,
        "model_info": model.info,
        "sigma_max": model.sigma_max,
        "samplers": {s.name: {"family": s.family, "description": describe(s), "runner": s.runner} for s in specs},
        "features": features.name,
        "feature_info": features.describe(image_shape),
        "reference_statistics": None if stats is None else stats[2],
        "ode_reference": "none" if not (config.ode_errors and config.reference_steps)
        else (model.ode_reference if exact else f"Heun, {config.reference_steps} steps ({2 * config.reference_steps - 1} NFE), float64"),
        "ode_reference_check": ref_check,
        "has_modes": model.assign is not None,
        "config": {k: v for k, v in asdict(config).items() if k != "extra_specs"},
        "versions": _versions(),
    }
    if reference is not None and model.data_draws is not None and config.reference is None:
        meta["fd_floor"] = _fd_floor(model, features, reference, config.num_samples)
    return {"rows": rows, "meta": meta, "samples": samples, "features": sample_features,
            "reference_statistics": None if stats is None else stats[:2]}


def _param_device(model) -> torch.device:
    for part in (model.denoiser, model.unet):
        if isinstance(part, torch.nn.Module):
            for p in list(part.parameters()) + list(part.buffers()):
                return p.device
    return torch.device("cpu")


def _to_images(model, sample: torch.Tensor) -> torch.Tensor:
    device = _param_device(model)
    with torch.no_grad():
        return torch.cat([model.to_image(sample[i : i + 64].to(device)).float().cpu() for i in range(0, len(sample), 64)])


FD_FLOOR_DRAWS = 5


def _fd_floor(model, features, reference: metrics.FrechetReference, n: int, draws: int = FD_FLOOR_DRAWS) -> dict:
    """FD of n true data images against the reference statistics, mean and std over `draws`
    draws: what a perfect sampler scores with n samples, and how much that moves by chance.
    Samplers within about one std of it are indistinguishable from the data by this metric."""
    values = []
    for draw in range(draws):
        feats = features(model.data_draws(n, draw)).numpy()
        values.append(reference.distance_of_features(feats))
    return {"num_samples": int(len(feats)), "draws": draws, "fd_mean": float(np.mean(values)),
            "fd_std": float(np.std(values, ddof=1)), "fd_values": values}


def _versions() -> dict:
    import diffusers

    from .. import __version__

    return {"edm_sampling": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}


def write_outputs(config: SweepConfig, result: dict[str, Any], model=None) -> Path:
    """results.csv, results.json, quality_vs_nfe.png and grids/<sampler>_nfe<N>.png (each
    titled, beside a grid of true data where the model can draw it) in config.output, each
    written atomically (inside an open `open_output_folder`, each is recorded as the package's)."""
    from ..images import save_titled_grids
    from .report import COLUMNS, plot_quality_vs_nfe, write_csv, write_json

    out = Path(config.output)
    rows, meta = result["rows"], result["meta"]
    write_csv(rows, out / "results.csv", COLUMNS)
    write_json({"rows": rows, "meta": meta}, out / "results.json")
    if module_available("matplotlib"):
        plot_quality_vs_nfe(rows, out / "quality_vs_nfe.png", title=f"{config.model}: quality vs model calls, "
                            f"{config.num_samples} samples per point", fd_floor=meta.get("fd_floor"))
    if config.grid_images:
        shape = next(iter(result["samples"].values())).shape[1:]
        truth = result["true_images"] if "true_images" in result else _true_images(config, model, config.grid_images, shape)
        lookup = {(r["sampler"], r["nfe_target"]): r for r in rows}
        for (name, nfe), images in result["samples"].items():
            row = lookup[(name, nfe)]
            shown = min(config.grid_images, len(images))
            panels = [(f"{name}: {shown} of {len(images)} samples", images[:shown])]
            if truth is not None:
                panels.append((f"true data: {len(truth)} draws", truth))
            save_titled_grids(panels, out / grid_name(name, nfe), title=_grid_title(row), max_images=config.grid_images)
    return out


def _true_images(config: SweepConfig, model, n: int, image_shape: Sequence[int]) -> torch.Tensor | None:
    """n data images to show beside the samples: draws of a built-in model, or the first of a
    --reference image folder in the samples' `image_shape`; None when neither exists."""
    if config.reference is not None and not config.reference.endswith(".npz"):
        return _load_reference_images(Path(config.reference), image_shape, limit=n)
    if model is not None and model.data_draws is not None:
        return model.data_draws(n, 0)
    return None


def _grid_title(row: dict) -> str:
    """'<sampler> at NFE n (target t): mean RMSE ..., mode mismatch ...%, FD ...' from a result row."""
    parts = [f"{row['sampler']} at {row['nfe']} model calls" + (f" (target {row['nfe_target']})" if row["nfe"] != row["nfe_target"] else "")]
    if math.isfinite(row["error_median"]):
        parts.append(f"median RMSE to ODE solution {row['error_median']:.3g}")
    if math.isfinite(row.get("mode_mismatch", math.nan)):
        parts.append(f"other mode {100 * row['mode_mismatch']:.1f}%")
    if math.isfinite(row["fd"]):
        parts.append(f"FD {row['fd']:.3g}")
    return ", ".join(parts)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)
