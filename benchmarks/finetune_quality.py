"""Fine-tune quality: N more steps of the EDM recipe vs N more steps of the model's native DDPM
objective, both from the same epsilon-trained pixel model of the digits.

1. The package makes the pretrained model: `edm-sampling train --loss ddpm` on the built-in
   digits (16x16), exported as a DDPMPipeline with its DDPMScheduler (epsilon prediction).
2. The digits are written as a PNG folder; every fine-tune reads it with `--pretrained`, the
   same seed (data order), batch, Adam learning rate, warm-up and EMA. Only the recipe
   differs, as noise:weighting pairs (`--recipes`): the EDM recipe (log-normal sigma clipped
   to the model's range, EDM weighting), the model's native DDPM objective (uniform integer
   timesteps, epsilon-MSE), and the two mixed. The preconditioning is the model's own in all.
3. Same sampler budget for all: EDM Heun, 18 steps (35 NFE), on each EMA model; the same
   seeds. Quality is the Frechet distance on pixel features (FD-pixels, 256-d) to all 1797
   digits; lower is better. The metric's noise level is reported twice: FD between the two
   halves of the data, and between two seed sets of one model.

    python benchmarks/finetune_quality.py                     # CPU, ~20 min on 2 shared cores
    python benchmarks/finetune_quality.py --device cuda --base-steps 4000 --steps 2000

Target (issue 10): FD(EDM fine-tune) <= 0.9 x FD(DDPM fine-tune). The script also prints
the mixed recipes, which tell the noise distribution's share from the weighting's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_quality import fd_pixels, sample_heun  # noqa: E402


def write_digits(folder: Path, images: torch.Tensor) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array, "L").save(folder / f"{i:04d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=800, help="DDPM-recipe steps of the pretrained model")
    parser.add_argument("--steps", type=int, default=400, help="N: fine-tuning steps of each recipe")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", default="16,32,64")
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (both recipes)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", default="lognormal:edm,lognormal:native,ddpm:edm,ddpm:native",
                        help="noise:weighting pairs; the first is compared with ddpm:native (which must be listed)")
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
    quiet = dict(progress=False, num_samples=0, checkpoint_every=10**9, log_every=10**9, batch_size=args.batch_size,
                 seed=args.seed)
    result: dict = {"base_steps": args.base_steps, "steps_N": args.steps, "batch_size": args.batch_size,
                    "channels": args.channels, "lr": args.lr, "num_samples": args.num_samples, "device": args.device,
                    "sampler": "EDM Heun 18 steps (35 NFE)", "metric": "FD-pixels (256-d) vs all 1797 digits"}

    def fd_of(trainer, seed=args.seed) -> float:
        device = trainer.accelerator.device
        samples = sample_heun(trainer.ema, shape, args.num_samples, 18, seed, args.sample_batch, device)
        return fd_pixels(samples, data.images)

    recipes = [tuple(r.split(":")) for r in args.recipes.split(",")]
    with tempfile.TemporaryDirectory(prefix="edm-ft-quality-") as tmp:
        root = Path(args.workdir or tmp)
        base_dir = root / "base" / "pipeline"
        start = time.perf_counter()
        base = Trainer(TrainConfig(output_dir=str(root / "base"), loss="ddpm", steps=args.base_steps, lr=args.base_lr,
                                   block_out_channels=channels, export_scheduler="original",
                                   resume=base_dir.is_dir(), **quiet))
        base.run()
        result["base_train_s"] = time.perf_counter() - start
        result["fd_base"] = fd_of(base)
        folder = root / "digits"
        if not folder.is_dir():
            write_digits(folder, data.images)
        for noise, weighting in recipes:
            name = f"{noise}+{weighting}"
            start = time.perf_counter()
            trainer = Trainer(TrainConfig(output_dir=str(root / name), pretrained=str(base_dir), data=str(folder),
                                          noise_distribution=noise, loss_weighting=weighting, steps=args.steps,
                                          lr=args.lr, export=False, overwrite=True, **quiet))
            trainer.run()
            result[f"train_s[{name}]"] = time.perf_counter() - start
            result[f"fd[{name}]"] = fd_of(trainer)
            if (noise, weighting) == recipes[0]:
                result["fd_first_recipe_other_seeds"] = fd_of(trainer, seed=args.seed + 10**6)
    result["fd_data_halves"] = fd_pixels(data.images[::2], data.images[1::2])
    first, native = "{}+{}".format(*recipes[0]), "ddpm+native"
    result["seed_noise"] = abs(result["fd_first_recipe_other_seeds"] - result[f"fd[{first}]"])
    result["ratio"] = result[f"fd[{first}]"] / result[f"fd[{native}]"]
    print(json.dumps(result, indent=2))
    scores = "  ".join(f"{k[3:-1]} {v:.3f}" for k, v in result.items() if k.startswith("fd["))
    print(f"FD-pixels after {args.steps} fine-tuning steps: {scores}  (pretrained {result['fd_base']:.3f}, data "
          f"halves {result['fd_data_halves']:.3f}, seed noise {result['seed_noise']:.3f})  ratio {first} / {native} "
          f"= {result['ratio']:.3f} (target <= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
