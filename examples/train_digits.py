"""Train a small UNet on the built-in digits with the EDM recipe, then sample the exported pipeline.

    python examples/train_digits.py            # ~8 minutes on 2 CPU cores (1500 steps)
    accelerate launch examples/train_digits.py # the same on GPUs
    python examples/train_digits.py --resume   # continue a stopped run (--overwrite: start over)
"""

import argparse

import torch

from edm_sampling.pipelines import EDMPipeline
from edm_sampling.training.config import TrainConfig
from edm_sampling.training.trainer import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output-dir", default="edm-output-digits")
parser.add_argument("--steps", type=int, default=1500)
again = parser.add_mutually_exclusive_group()
again.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint "
                   "(give the same settings: this script passes them all)")
again.add_argument("--overwrite", action="store_true", help="start a new run in --output-dir over an earlier one")
args = parser.parse_args()

result = train(TrainConfig(output_dir=args.output_dir, steps=args.steps, checkpoint_every=min(500, args.steps),
                            resume=args.resume, overwrite=args.overwrite))
print(f"{result.steps} steps in {result.seconds:.0f} s; grid: {result.samples_path}")

pipe = EDMPipeline.from_pretrained(result.pipeline_dir)
images = pipe(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
images[0].save(f"{args.output_dir}/first_sample.png")
