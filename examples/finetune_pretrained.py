"""Fine-tune a pretrained diffusers pipeline (DDPM, DDIM or Stable Diffusion) on your images.

    python examples/finetune_pretrained.py --pretrained path/to/ddpm-pipeline --data path/to/images --steps 2000
    accelerate launch examples/finetune_pretrained.py --pretrained path/to/sd --data path/to/captioned

The model keeps its own preconditioning (epsilon / v / sample, from its scheduler config), so
it works from step 0; `--data` is an image folder (a metadata.jsonl with file_name + text gives
captions). The run folder holds checkpoints (resume with `edm-sampling train --resume`), sample
grids, and `pipeline/`: your pipeline class and components with the fine-tuned UNet.
"""

import argparse

from diffusers import DiffusionPipeline

from edm_sampling.training.config import TrainConfig
from edm_sampling.training.trainer import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--pretrained", required=True, help="local diffusers pipeline folder")
parser.add_argument("--data", required=True, help="image folder")
parser.add_argument("--output-dir", default="edm-output-finetune")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--resolution", default=None, help="S or H,W (default: the model's)")
again = parser.add_mutually_exclusive_group()
again.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint "
                   "(give the same settings: this script passes them all)")
again.add_argument("--overwrite", action="store_true", help="start a new run in --output-dir over an earlier one")
args = parser.parse_args()

result = train(TrainConfig(pretrained=args.pretrained, data=args.data, output_dir=args.output_dir, steps=args.steps,
                           batch_size=args.batch_size, resolution=args.resolution, checkpoint_every=max(1, args.steps // 4),
                           resume=args.resume, overwrite=args.overwrite))
print(f"{result.steps} steps, last loss {result.last_loss:.4f}; pipeline: {result.pipeline_dir}")

import edm_sampling.pipelines  # noqa: E402,F401  (EDMScheduler is found by module path when the folder loads)

pipe = DiffusionPipeline.from_pretrained(result.pipeline_dir)
print(f"loads as {type(pipe).__name__} with {type(pipe.scheduler).__name__}")
