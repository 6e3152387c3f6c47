"""Fine-tune quality: N more steps of a recipe vs N more steps of the model's native DDPM
objective, all from the same epsilon-trained pixel model of the digits.

1. The package makes the pretrained model: `edm-sampling train --loss ddpm` with its defaults
   (1500 steps, lr 2e-3, batch 64) on the built-in digits (16x16), exported as a DDPMPipeline
   with its DDPMScheduler (epsilon prediction).
2. The digits are written as a PNG folder; every fine-tune reads it with `--pretrained`, the
   same seed (data order), batch, Adam learning rate (the fine-tuning default unless --lr),
   warm-up and EMA. Only the recipe differs, as noise:weighting pairs (`--recipes`):
   - ddpm:native      the peer: the model's native objective (uniform integer timesteps, epsilon-MSE);
   - lognormal:edm    EDM's recipe as published (log-normal sigma clipped to the model's range,
                      EDM's lambda): issue 10's target;
   - lognormal:native EDM's noise levels with the weight EDM's rule lambda c_out^2 = 1 gives an
                      epsilon model (which is epsilon-MSE);
   - ddpm:edm         EDM's lambda on the model's own timesteps;
   - native:balanced  the package's default for `--pretrained`: the model's own noise levels,
                      each weighted by 1 / the model's own loss there at step 0.
   The preconditioning is the model's own in all.
3. Same sampler budget for all: EDM Heun, 18 steps (35 NFE), on each EMA model, same seeds.
   Quality is the Frechet distance on pixel features (FD-pixels, 256-d) to all 1797 digits;
   lower is better. Noise of the metric: each model is scored on two seed sets (the
   difference is printed), and the two halves of the data score the floor. `--train-seeds`
   repeats every fine-tune with other seeds (data order and noise) for the training noise.
4. Where each recipe gains or loses: the mean D-space error ||D(y + n; sigma) - y||^2 / pixels
   of each EMA model on 256 digits at four of the sampler's noise levels (fixed noise).

    python benchmarks/finetune_quality.py                     # CPU, ~25 min on 2 cores
    python benchmarks/finetune_quality.py --recipes ddpm:native,native:balanced --train-seeds 0,1
    python benchmarks/finetune_quality.py --device cuda --steps 2000

Target (issue 10): FD(recipe) <= 0.9 x FD(ddpm:native), printed for every recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_quality import fd_pixels, sample_heun  # noqa: E402

PEER = "ddpm:native"
DEFAULT_RECIPES = f"{PEER},lognormal:edm,lognormal:native,ddpm:edm,native:balanced"
PROBE_SIGMAS = (80.0, 10.0, 1.0, 0.1)


def write_digits(folder: Path, images: torch.Tensor) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array, "L").save(folder / f"{i:04d}.png")
    return folder


@torch.no_grad()
def denoising_errors(denoiser, images: torch.Tensor, sigmas: tuple[float, ...], seed: int = 0) -> list[float]:
    """Mean ||D(y + sigma n; sigma) - y||^2 / pixels over ``images`` at each sigma, n from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    device = next(denoiser.parameters()).device
    errors = []
    for sigma in sigmas:
        noise = torch.randn(images.shape, generator=generator)
        noisy = (images + sigma * noise).to(device)
        denoised = denoiser(noisy, torch.full((len(images),), sigma, device=device)).cpu()
        errors.append(float((denoised - images).square().mean()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=1500, help="DDPM-recipe steps of the pretrained model (train's default)")
    parser.add_argument("--steps", type=int, default=400, help="N: fine-tuning steps of each recipe")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", default="16,32,64")
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate, all recipes (default: train's, 1e-4)")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per seed set (two sets per model)")
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model and of the sample seed sets")
    parser.add_argument("--train-seeds", default="0", help="fine-tuning seeds (data order, noise), comma separated")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"noise:weighting pairs; {PEER} (the peer) is always run")
    parser.add_argument("--workdir", default=None, help="keep the models here (a finished base model is reused)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"

    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.data import load_builtin_digits
    from edm_sampling.training.trainer import Trainer

    data = load_builtin_digits(16)
    shape = tuple(data.images.shape[1:])
    channels = tuple(int(c) for c in args.channels.split(","))
    recipes = list(dict.fromkeys([PEER, *args.recipes.split(",")]))
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    sample_seeds = (args.seed, args.seed + 10**6)
    probe = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(1))[:256]]
    quiet = dict(progress=False, num_samples=0, checkpoint_every=10**9, log_every=10**9, batch_size=args.batch_size)
    result: dict = {"base_steps": args.base_steps, "steps_N": args.steps, "batch_size": args.batch_size,
                    "channels": args.channels, "num_samples": args.num_samples, "device": args.device,
                    "train_seeds": train_seeds, "sampler": "EDM Heun 18 steps (35 NFE)",
                    "metric": "FD-pixels (256-d) vs all 1797 digits", "probe_sigmas": PROBE_SIGMAS, "recipes": {}}

    def scores(trainer) -> list[float]:
        device = trainer.accelerator.device
        return [fd_pixels(sample_heun(trainer.ema, shape, args.num_samples, 18, s, args.sample_batch, device), data.images)
                for s in sample_seeds]

    with tempfile.TemporaryDirectory(prefix="edm-ft-quality-") as tmp:
        root = Path(args.workdir or tmp)
        base_dir = root / "base" / "pipeline"
        start = time.perf_counter()
        base = Trainer(TrainConfig(output_dir=str(root / "base"), loss="ddpm", steps=args.base_steps, lr=args.base_lr,
                                   block_out_channels=channels, export_scheduler="original", seed=args.seed,
                                   resume=base_dir.is_dir(), **quiet))
        base.run()
        result["base_train_s"] = time.perf_counter() - start
        result["fd_base"] = scores(base)
        result["d_error_base"] = denoising_errors(base.ema, probe, PROBE_SIGMAS)
        folder = root / "digits"
        if not folder.is_dir():
            write_digits(folder, data.images)
        for recipe in recipes:
            noise, weighting = recipe.split(":")
            runs = []
            for train_seed in train_seeds:
                start = time.perf_counter()
                trainer = Trainer(TrainConfig(output_dir=str(root / f"{noise}+{weighting}-{train_seed}"),
                                              pretrained=str(base_dir), data=str(folder), noise_distribution=noise,
                                              loss_weighting=weighting, steps=args.steps, lr=args.lr, export=False,
                                              overwrite=True, seed=train_seed, **quiet))
                trainer.run()
                runs.append({"seed": train_seed, "train_s": time.perf_counter() - start, "fd": scores(trainer),
                             "d_error": denoising_errors(trainer.ema, probe, PROBE_SIGMAS)})
                result["lr"] = trainer.config.learning_rate
            result["recipes"][recipe] = runs
    result["fd_data_halves"] = fd_pixels(data.images[::2], data.images[1::2])

    def mean_fd(recipe: str) -> float:
        return statistics.mean(statistics.mean(run["fd"]) for run in result["recipes"][recipe])

    result["seed_set_noise"] = max(abs(r["fd"][0] - r["fd"][1]) for runs in result["recipes"].values() for r in runs)
    if len(train_seeds) > 1:
        result["train_seed_noise"] = max(max(statistics.mean(r["fd"]) for r in runs) - min(statistics.mean(r["fd"]) for r in runs)
                                         for runs in result["recipes"].values())
    result["ratio_vs_peer"] = {recipe: mean_fd(recipe) / mean_fd(PEER) for recipe in recipes}
    print(json.dumps(result, indent=2))
    print(f"\nFD-pixels after N = {args.steps} fine-tuning steps (lr {result['lr']:g}, {len(train_seeds)} training seed(s), "
          f"2 x {args.num_samples} samples, Heun 18 steps) from a {args.base_steps}-step DDPM model\n")
    print(f"| recipe (noise:weighting) | FD-pixels | / {PEER} | " + " | ".join(f"D error, sigma {s:g}" for s in PROBE_SIGMAS) + " |")
    print("|---|---|---|" + "---|" * len(PROBE_SIGMAS))
    rows = [("pretrained model", statistics.mean(result["fd_base"]), None, result["d_error_base"])]
    for recipe in recipes:
        errors = [statistics.mean(run["d_error"][i] for run in result["recipes"][recipe]) for i in range(len(PROBE_SIGMAS))]
        rows.append((recipe, mean_fd(recipe), result["ratio_vs_peer"][recipe], errors))
    for name, fd, ratio, errors in rows:
        ratio_text = "" if ratio is None else f"{ratio:.3f}"
        print(f"| {name} | {fd:.3f} | {ratio_text} | " + " | ".join(f"{e:.3g}" for e in errors) + " |")
    noise_line = f"noise: two seed sets of one model differ by <= {result['seed_set_noise']:.3f}"
    if "train_seed_noise" in result:
        noise_line += f", training seeds by <= {result['train_seed_noise']:.3f}"
    print(f"\n{noise_line}; two halves of the data score {result['fd_data_halves']:.3f}. Target: ratio <= 0.9")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
