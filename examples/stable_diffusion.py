"""EDMScheduler in Stable Diffusion (1.x / 2.x) from a local folder, with a low-NFE solver.

    python examples/stable_diffusion.py --model path/to/stable-diffusion --prompt "a photo of a cat"

Classifier-free guidance, `callback_on_step_end`, `sigmas=` and img2img work as with diffusers'
own schedulers. UniPC (order 3) on its log-sigma grid is the README's recommendation from 17
model calls on; below that, iPNDM (order 3).
"""

import argparse

import torch
from diffusers import StableDiffusionPipeline

from edm_sampling import EDMScheduler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="local StableDiffusionPipeline folder")
parser.add_argument("--prompt", default="a photo of a cat")
parser.add_argument("--steps", type=int, default=17, help="model calls (the batch is doubled for guidance)")
parser.add_argument("--guidance-scale", type=float, default=7.5)
parser.add_argument("--height", type=int, default=None)
parser.add_argument("--width", type=int, default=None)
parser.add_argument("--output", default="stable_diffusion.png")
args = parser.parse_args()

dtype = torch.float16 if torch.cuda.is_available() else torch.float32
pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=dtype, safety_checker=None)
pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
solver = {"solver": "unipc", "solver_order": 3} if args.steps >= 17 else {"solver": "ipndm"}
pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config, **solver)
image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=args.height,
             width=args.width, generator=torch.Generator().manual_seed(0)).images[0]
image.save(args.output)
print(f"{solver}: {len(pipe.scheduler.timesteps)} model calls: {args.output}")
