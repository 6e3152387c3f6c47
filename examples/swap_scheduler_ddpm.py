"""Swap EDMScheduler into a DDPM / DDIM pipeline you already have, and sample in few model calls.

    python examples/swap_scheduler_ddpm.py --model path/to/ddpm-cifar10 [--solver unipc --steps 9]

`--model` is a local diffusers folder saved with `pipeline.save_pretrained` (DDPMPipeline or
DDIMPipeline: nothing is downloaded). One line does the swap; the rest is the pipeline's own
call. DDIMPipeline replaces any scheduler it is built with by a DDIMScheduler, so the swap comes
after loading, as here.
"""

import argparse

import torch
from diffusers import DiffusionPipeline

from edm_sampling import EDMScheduler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="local DDPMPipeline / DDIMPipeline folder")
parser.add_argument("--solver", default="heun", help="heun (EDM, 2N-1 calls) or unipc, dpmpp_3m, ipndm ... (N calls)")
parser.add_argument("--steps", type=int, default=18, help="num_inference_steps")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--output", default="samples.png")
args = parser.parse_args()

pipe = DiffusionPipeline.from_pretrained(args.model)
pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config, solver=args.solver)  # the one line
generators = [torch.Generator().manual_seed(seed) for seed in range(args.batch_size)]  # one per sample
images = pipe(batch_size=args.batch_size, num_inference_steps=args.steps, generator=generators).images

width, height = images[0].size
grid = images[0].resize((width * len(images), height))
for i, image in enumerate(images):
    grid.paste(image, (i * width, 0))
grid.save(args.output)
print(f"{len(images)} images, {len(pipe.scheduler.timesteps)} model calls each: {args.output}")
