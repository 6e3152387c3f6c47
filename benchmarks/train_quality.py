"""Quality per training budget: the EDM recipe vs the plain epsilon-prediction recipe.

Same UNet2DModel config, data order (built-in digits, upscaled), batch, optimizer steps,
Adam learning rate with warm-up, and EMA (half-life in images); only the recipe differs:

- EDM: log-normal sigma, EDM preconditioning and loss weight (`edm_sampling.training`),
  sampled with the EDM Heun sampler, 18 steps (35 NFE);
- epsilon: diffusers `DDPMScheduler` (1000 linear betas), uniform integer timesteps, MSE on
  the noise, sampled with diffusers' `DDIMPipeline` (50 steps) and, to give the baseline
  its best chance, also with the EDM Heun sampler on the same model (18 steps, 35 NFE).

Quality is the Frechet distance on pixel features ("FD-pixels",
`edm_sampling.evaluation.features.PixelFeatures`, 256 features for 16x16 images) between
generated samples and the whole digits set; lower is better. Target (issue 4):
FD(EDM) <= 0.8 x FD(epsilon, its best sampler).

    python benchmarks/train_quality.py --device cuda --steps 4000
    python benchmarks/train_quality.py --steps 1500          # CPU, the `train` defaults
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def fd_pixels(samples: torch.Tensor, reference: torch.Tensor) -> float:
    from edm_sampling.evaluation.features import PixelFeatures
    from edm_sampling.evaluation.metrics import frechet_distance_from_features

    features = PixelFeatures()
    return frechet_distance_from_features(features(samples).numpy(), features(reference).numpy())


def train_epsilon(config, data, device, seed: int):
    """The plain diffusers epsilon recipe with the trainer's data order, warm-up and EMA."""
    import copy

    from diffusers import DDPMScheduler

    from edm_sampling.training.data import batch_indices
    from edm_sampling.training.ema import ema_beta, ema_update
    from edm_sampling.training.trainer import build_unet

    torch.manual_seed(config.seed)
    unet = build_unet(config, data.channels, data.images.shape[-1], 0).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    scheduler = DDPMScheduler()
    generator = torch.Generator(device=device).manual_seed(seed)
    images = data.images.to(device)
    seen = 0
    for step in range(config.steps):
        clean = images[batch_indices(len(data), config.seed, step, config.batch_size).to(device)]
        noise = torch.randn(clean.shape, generator=generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=device)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(clean, noise, t), t).sample, noise)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min((seen + config.batch_size) / max(config.lr_warmup_images, 1), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += config.batch_size
        ema_update(ema, unet, ema_beta(config.batch_size, config.ema_halflife_images, seen, config.ema_rampup_ratio))
    return ema, scheduler


@torch.no_grad()
def sample_ddim(unet, scheduler_config, n: int, steps: int, seed: int, batch: int) -> torch.Tensor:
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, n, batch):
        g = torch.Generator(device="cpu").manual_seed(seed + start)
        images = pipe(batch_size=min(batch, n - start), num_inference_steps=steps, generator=g, eta=0.0, output_type="np").images
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out).float()


@torch.no_grad()
def sample_heun(denoiser, shape, n: int, steps: int, seed: int, batch: int, device) -> torch.Tensor:
    from edm_sampling.samplers import denoiser_sigmas, sample

    sigmas = denoiser_sigmas(denoiser, steps)
    out = []
    for start in range(0, n, batch):
        g = torch.Generator(device="cpu").manual_seed(seed + start)
        latents = torch.randn((min(batch, n - start), *shape), generator=g).to(device)
        out.append(sample(denoiser, latents, sigmas).sample.clamp(-1, 1).cpu())
    return torch.cat(out).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", default="16,32,64")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--grid-dir", default=None, help="write sample grids (PNG) here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    device = torch.device(args.device)

    from edm_sampling.denoisers import DiscreteVPDenoiser
    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.data import load_builtin_digits
    from edm_sampling.images import save_image_grid
    from edm_sampling.training.trainer import Trainer

    data = load_builtin_digits(args.resolution)
    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="edm-quality-"), overwrite=True, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         block_out_channels=tuple(int(c) for c in args.channels.split(",")),
                         progress=False, export=False, num_samples=0, checkpoint_every=10**9, log_every=10**9)
    shape = tuple(data.images.shape[1:])
    result: dict = {"steps": args.steps, "batch_size": args.batch_size, "resolution": args.resolution,
                    "channels": args.channels, "device": str(device), "num_samples": args.num_samples,
                    "metric": "FD-pixels (PixelFeatures, 256-d) vs all 1797 digits"}

    start = time.perf_counter()
    trainer = Trainer(config, data)
    trainer.run()
    result["edm_train_s"] = time.perf_counter() - start
    edm = sample_heun(trainer.ema, shape, args.num_samples, 18, args.seed, args.sample_batch, trainer.accelerator.device)

    start = time.perf_counter()
    eps_unet, scheduler = train_epsilon(config, data, device, args.seed)
    result["epsilon_train_s"] = time.perf_counter() - start
    eps_ddim = sample_ddim(eps_unet, scheduler.config, args.num_samples, 50, args.seed, args.sample_batch)
    eps_heun = sample_heun(DiscreteVPDenoiser.from_scheduler_config(eps_unet, scheduler.config), shape,
                           args.num_samples, 18, args.seed, args.sample_batch, device)

    result["fd_edm_heun18"] = fd_pixels(edm, data.images)
    result["fd_epsilon_ddim50"] = fd_pixels(eps_ddim, data.images)
    result["fd_epsilon_heun18"] = fd_pixels(eps_heun, data.images)
    result["fd_data_split"] = fd_pixels(data.images[::2], data.images[1::2])  # a floor: two halves of the data
    best_eps = min(result["fd_epsilon_ddim50"], result["fd_epsilon_heun18"])
    result["ratio_edm_vs_best_epsilon"] = result["fd_edm_heun18"] / best_eps
    print(json.dumps(result, indent=2))
    print(f"FD-pixels: EDM {result['fd_edm_heun18']:.3f}  epsilon (DDIM-50) {result['fd_epsilon_ddim50']:.3f}  "
          f"epsilon (Heun-18) {result['fd_epsilon_heun18']:.3f}  ratio {result['ratio_edm_vs_best_epsilon']:.3f} (target <= 0.8)")
    if args.grid_dir:
        for name, images in (("edm", edm), ("epsilon_ddim", eps_ddim), ("epsilon_heun", eps_heun)):
            save_image_grid(images[:64], os.path.join(args.grid_dir, f"quality_{name}.png"), scale=4, pad_value=-1.0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
