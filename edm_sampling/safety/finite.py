"""Refusing to save weights that hold NaN or inf (a model exported with them samples garbage)."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import NonFiniteWeightsError


def assert_finite_state(state_dict: Mapping[str, Any], what: str) -> None:
    """`NonFiniteWeightsError` naming the first tensor of ``state_dict`` with a NaN or inf
    (and how many tensors have them); ``what`` says whose weights these are."""
    import torch

    bad = [
        name for name, value in state_dict.items()
        if torch.is_tensor(value) and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())
    ]
    if bad:
        first = state_dict[bad[0]]
        count = int((~torch.isfinite(first)).sum())
        others = f" ({len(bad) - 1} more tensors too)" if len(bad) > 1 else ""
        raise NonFiniteWeightsError(
            f"{what}: tensor {bad[0]!r} holds {count} NaN/inf values of {first.numel()}{others}; refusing to save them"
        )
