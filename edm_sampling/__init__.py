"""EDM sampling and training (Karras et al. 2022) for the diffusers ecosystem.

The core (`schedules`, `samplers`, `denoisers`, `oracles`) depends on torch only; the
diffusers-facing classes live in `schedulers` and `pipelines` and are imported lazily.
"""

__version__ = "0.1.0"
