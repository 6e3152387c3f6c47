"""Train a small UNet on the built-in digits with the EDM recipe, then sample the exported pipeline.

    python examples/train_digits.py            # ~4-7 minutes on 2 CPU cores
    accelerate launch examples/train_digits.py # the same on GPUs
"""

import torch

from edm_sampling.pipelines import EDMPipeline
from edm_sampling.training.config import TrainConfig
from edm_sampling.training.trainer import train

result = train(TrainConfig(output_dir="edm-output-digits", overwrite=True))
print(f"{result.steps} steps in {result.seconds:.0f} s; grid: {result.samples_path}")

pipe = EDMPipeline.from_pretrained(result.pipeline_dir)
images = pipe(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
images[0].save("edm-output-digits/first_sample.png")
