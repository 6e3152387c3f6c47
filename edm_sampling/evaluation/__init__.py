"""Evaluation: the low-NFE benchmark behind `edm-sampling bench` and `edm-sampling tune`.

- `metrics`: Frechet distance, per-sample ODE error, cached reference statistics.
- `features` / `inception`: the offline pixel features and Inception-v3 FID features from a
  local weights file.
- `models`: the built-in exact models and local diffusers folders behind one interface.
- `samplers_registry`: our samplers and diffusers' at a target NFE, with counted model calls.
- `sweep`, `tune`, `report`, `command`: the sweep, the churn grid search, outputs, the CLI.

Nothing heavy is imported here, so `import edm_sampling` stays light.
"""

import importlib

EVAL_EXTRA = "pip install 'edm_sampling[eval]'"
"""How to get the optional dependencies of bench and tune (scikit-learn, matplotlib)."""


def module_available(name: str) -> bool:
    """Whether `name` imports (an optional dependency: scikit-learn, matplotlib)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
