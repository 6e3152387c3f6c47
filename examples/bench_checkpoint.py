"""Which sampler at how many model calls, on your own checkpoint (a local diffusers folder).

    python examples/bench_checkpoint.py --model path/to/ddpm-cifar10 --nfe 5,9,17
    python examples/bench_checkpoint.py --model path/to/sd --prompt "a photo of a cat" --nfe 9,17

The same as `edm-sampling bench --model PATH`, from Python: every sampler runs from the same
noise, its error is measured against a fine reference solution of the same ODE, and the table
ends with best edm_sampling / best diffusers per NFE. Outputs go to --output-dir.
"""

import argparse

from edm_sampling.evaluation.report import pivot_table
from edm_sampling.evaluation.sweep import SweepConfig, run_sweep

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="local diffusers folder")
parser.add_argument("--prompt", default=None, help="for text-to-image models")
parser.add_argument("--nfe", default="5,9,17")
parser.add_argument("--num-samples", type=int, default=32)
parser.add_argument("--output-dir", default="bench-checkpoint")
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()

config = SweepConfig(model=args.model, prompt=args.prompt, nfe=[int(n) for n in args.nfe.split(",")],
                     num_samples=args.num_samples, batch_size=args.num_samples, output=args.output_dir,
                     overwrite=args.overwrite, progress=False)
result = run_sweep(config)
print(pivot_table(result["rows"], "error_median"))
print(f"outputs: {args.output_dir}")
