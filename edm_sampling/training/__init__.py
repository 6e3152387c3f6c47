"""EDM training for diffusers UNets (EDM_SPEC.md section 3).

- `preconditioning`: a diffusers UNet as the core's EDM / VP / VE denoiser D(x; sigma)
- `losses`: the Table 1 losses, per sample, and per-sigma-bucket logging
- `augment`: non-leaky geometric augmentation with its conditioning vector
- `data`, `ema`, `checkpoint`: image folders / built-in digits, EMA in images, atomic
  safetensors checkpoints
- `trainer`: the accelerate training loop; `export`: a diffusers pipeline folder
- `command`: the `edm-sampling train` subcommand

Submodules import torch / diffusers; this package file imports nothing heavy.
"""
