"""Step time: the EDM trainer's optimizer step vs a plain diffusers epsilon-prediction step.

Both use the same UNet2DModel config, batch, Adam and accelerate `Accelerator`, in the same
process; blocks of steps of the two alternate so that machine load hits both alike, and the
median per-step time of each is compared. The EDM step is `Trainer.train_step` itself
(per-step seeding, EDM sigma / noise, preconditioning, per-sigma-bucket logging, the
non-finite gradient check, warm-up, EMA). The plain step is what diffusers'
train_unconditional example does: random integer timesteps, `DDPMScheduler.add_noise`, MSE
on epsilon, backward, Adam, and (as in that example with --use_ema) `EMAModel.step`.

    python benchmarks/train_step_time.py                 # CPU, default digits settings
    python benchmarks/train_step_time.py --device cuda --batch-size 256

Target (issue 4): EDM / plain <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--channels", default="16,32,64")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--json", default=None, help="write the result here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        import os

        os.environ["ACCELERATE_USE_CPU"] = "true"

    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.data import load_builtin_digits
    from edm_sampling.training.trainer import Trainer, build_unet

    channels = tuple(int(c) for c in args.channels.split(","))
    data = load_builtin_digits(args.resolution)
    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="edm-bench-"), overwrite=True, batch_size=args.batch_size,
                         block_out_channels=channels, progress=False, export=False, num_samples=0)
    trainer = Trainer(config, data)
    acc = trainer.accelerator
    device = acc.device

    torch.manual_seed(config.seed)
    unet = build_unet(config, data.channels, args.resolution, 0)
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    unet, optimizer = acc.prepare(unet, optimizer)
    ema = EMAModel(acc.unwrap_model(unet).parameters(), decay=0.999)
    ema.to(device)
    scheduler = DDPMScheduler()
    images = data.images.to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    def plain_step() -> None:
        unet.train()
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=generator, device=device)
        clean = images[idx]
        noise = torch.randn(clean.shape, generator=generator, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator, device=device)
        noisy = scheduler.add_noise(clean, noise, t)
        pred = unet(noisy, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(acc.unwrap_model(unet).parameters())
        float(loss.detach())  # the log line every step, like the trainer

    def edm_step() -> None:
        trainer.train_step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(args.block):
            fn()
        sync()
        return (time.perf_counter() - start) / args.block

    for fn in (edm_step, plain_step):  # warm-up
        timed(fn)
    edm, plain = [], []
    for r in range(args.rounds):
        order = (edm_step, plain_step) if r % 2 == 0 else (plain_step, edm_step)
        for fn in order:
            (edm if fn is edm_step else plain).append(timed(fn))
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "channels": list(channels),
        "edm_step_s": statistics.median(edm),
        "plain_epsilon_step_s": statistics.median(plain),
    }
    result["ratio"] = result["edm_step_s"] / result["plain_epsilon_step_s"]
    print(json.dumps(result, indent=2))
    print(f"EDM trainer step / plain diffusers epsilon step = {result['ratio']:.3f} (target <= 1.05)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
