"""Train a small UNet on the built-in digits with the EDM recipe, then sample the exported pipeline.

    python examples/train_digits.py            # ~8 minutes on 2 CPU cores (1500 steps)
    accelerate launch examples/train_digits.py # the same on GPUs
"""

import argparse

import torch

from edm_sampling.pipelines import EDMPipeline
from edm_sampling.training.config import TrainConfig
from edm_sampling.training.trainer import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output-dir", default="edm-output-digits")
parser.add_argument("--steps", type=int, default=1500)
args = parser.parse_args()

result = train(TrainConfig(output_dir=args.output_dir, steps=args.steps, checkpoint_every=min(500, args.steps)))
print(f"{result.steps} steps in {result.seconds:.0f} s; grid: {result.samples_path}")

pipe = EDMPipeline.from_pretrained(result.pipeline_dir)
images = pipe(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
images[0].save(f"{args.output_dir}/first_sample.png")
