"""EDMScheduler in a flow-matching pipeline (Stable Diffusion 3, Flux, ...) from a local folder.

    python examples/sd3_flux.py --model path/to/stable-diffusion-3 --prompt "a photo of a cat" --steps 9

`EDMScheduler.from_config` reads the flow-matching config (shift, dynamic shifting; the pipeline
passes its `sigmas` and `mu` as it does to FlowMatchEulerDiscreteScheduler) and samples the same
ODE in EDM's sigma = t / (1 - t), with any of the core's solvers.
"""

import argparse

import torch
from diffusers import DiffusionPipeline

from edm_sampling import EDMScheduler

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="local StableDiffusion3Pipeline / FluxPipeline folder")
parser.add_argument("--prompt", default="a photo of a cat")
parser.add_argument("--solver", default="adams_alpha_adaptive", help="a solver of edm_sampling.solvers.SOLVERS")
parser.add_argument("--steps", type=int, default=9)
parser.add_argument("--guidance-scale", type=float, default=5.0)
parser.add_argument("--height", type=int, default=None)
parser.add_argument("--width", type=int, default=None)
parser.add_argument("--no-t5", action="store_true", help="SD3 without its T5 text encoder (saves memory)")
parser.add_argument("--output", default="flow.png")
args = parser.parse_args()

dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if args.no_t5 else {}
pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype, **without_t5).to("cuda" if torch.cuda.is_available() else "cpu")
pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config, solver=args.solver)
image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=args.height,
             width=args.width, generator=torch.Generator().manual_seed(0)).images[0]
image.save(args.output)
print(f"{type(pipe).__name__} with EDMScheduler({args.solver}): {len(pipe.scheduler.timesteps)} model calls: {args.output}")
