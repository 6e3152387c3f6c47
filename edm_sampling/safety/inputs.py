"""Bad input, refused before any work: one `InvalidArgument` naming the parameter and its range.

Every check raises `InvalidArgument(name, problem)`, a ValueError whose text is "NAME: PROBLEM"
with NAME the Python parameter name. The command line shows the same error under the flag the
user typed (`cli.py` maps the field ``lr`` to ``--lr`` through the parser), so one check
serves both.

- `Number`: a rule for one numeric parameter (integer or real, bounds open or closed, None
  allowed or not); `Number.check` refuses bools, strings, NaN and inf (unless the rule allows
  inf) and values out of range, naming the range.
- `check_kinds`: the type half alone (a real number, not a string or a bool; a flag; a path),
  for callers whose own range checks would otherwise fail with a TypeError on a string.
- `check_choice`, `check_bool`, `existing_path`, `output_folder`, `read_json_object`:
  the rest of what users type: names from a list, flags, paths, small JSON files.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


class InvalidArgument(ValueError):
    """A bad value for the parameter ``name``; ``problem`` says what is allowed and what was given."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem

    def renamed(self, name: str) -> "InvalidArgument":
        """The same error under another name (a CLI flag for a Python parameter)."""
        return InvalidArgument(name, self.problem)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


KINDS = {
    "real": lambda v: _is_real(v),
    "real?": lambda v: v is None or _is_real(v),
    "bool": lambda v: isinstance(v, bool),
    "path?": lambda v: v is None or (isinstance(v, (str, os.PathLike)) and str(v) != ""),
    "numbers?": lambda v: v is None or (hasattr(v, "__len__") and not isinstance(v, (str, bytes))
                                        and all(_is_real(x) for x in (v.tolist() if hasattr(v, "tolist") else v))),
}
KIND_NAMES = {"real": "a number", "real?": "a number or None", "bool": "True or False", "path?": "a path or None",
              "numbers?": "a sequence of numbers or None"}


def check_kinds(**values: tuple[Any, str]) -> None:
    """`InvalidArgument` for the first ``name=(value, kind)`` whose value is not of its kind
    (see `KINDS`): a type check ahead of range checks written for numbers,
    so a string or a bool is named instead of failing later with a TypeError."""
    for name, (value, kind) in values.items():
        if not KINDS[kind](value):
            raise InvalidArgument(name, f"must be {KIND_NAMES[kind]}, got {value!r}")


@dataclass(frozen=True)
class Number:
    """The allowed values of one numeric parameter: ``low`` <= x <= ``high`` (``low_open`` /
    ``high_open``: strict), an integer if ``integer``, None if ``optional``; inf only if
    ``allow_inf`` (and the bounds allow it); NaN never."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    allow_inf: bool = False

    def describe(self) -> str:
        """'an integer >= 1', 'a finite number > 0', 'a number in [0, 1)', ..."""
        kind = "an integer" if self.integer else ("a number" if self.allow_inf else "a finite number")
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = kind
        return text + (" (or None)" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if not _is_real(value) or math.isnan(value):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if math.isinf(value) and not self.allow_inf:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def check(self, name: str, value: Any) -> None:
        """`InvalidArgument` naming ``name`` and the allowed range unless `accepts`."""
        if not self.accepts(value):
            raise InvalidArgument(name, f"must be {self.describe()}, got {value!r}")


SEED = Number(0, 2**63 - 1, integer=True)
"""A random seed: what torch and numpy both take."""


def check_choice(name: str, value: Any, choices: Iterable[Any], optional: bool = False) -> None:
    """`InvalidArgument` unless ``value`` is one of ``choices`` (or None when ``optional``)."""
    choices = tuple(choices)
    if value is None and optional:
        return
    if isinstance(value, bool) or value not in choices:
        raise InvalidArgument(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"must be True or False, got {value!r}")


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise InvalidArgument(name, f"must be a path, got {value!r}")
    return Path(value)


def existing_path(name: str, value: Any, folder: bool = False, what: str | None = None) -> Path:
    """``value`` as a Path to a readable file (a folder with ``folder=True``), else `InvalidArgument`
    saying what is there instead; ``what`` names the kind of file in the message."""
    path = _path(name, value)
    what = what or ("folder" if folder else "file")
    if not path.exists():
        raise InvalidArgument(name, f"no such {what} {str(path)!r}")
    if path.is_dir() != folder:
        raise InvalidArgument(name, f"{str(path)!r} is not a {what}")
    if not os.access(path, os.R_OK | (os.X_OK if folder else 0)):
        raise InvalidArgument(name, f"cannot read {str(path)!r} (permission denied)")
    return path


def output_folder(name: str, value: Any) -> Path:
    """``value`` as a Path where an output folder can be (it may not exist yet): `InvalidArgument`
    if it, or a folder it would be created in, is a file."""
    path = _path(name, value)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == path else f"cannot be created: {str(part)!r} is a file"
                raise InvalidArgument(name, f"{str(path)!r} {what}, not a folder")
            break
    return path


def read_json_object(name: str, path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; `InvalidArgument` naming the file and the problem if it is
    missing, unreadable, not JSON, or JSON but not an object."""
    path = existing_path(name, path)
    try:
        value = json.loads(path.read_bytes())
    except OSError as error:
        raise InvalidArgument(name, f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise InvalidArgument(name, f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(name, f"{path} must hold a JSON object {{...}}, it holds a {type(value).__name__}")
    return value


def read_pipeline_index(name: str, root: Path) -> dict[str, Any]:
    """The model_index.json object of the diffusers folder ``root``, after checking every
    component it names (a list value: [library, class], or [null, null] for an absent optional
    one): a folder beside it, and every JSON file in that folder a JSON object. So a broken config is named
    here, before any weight loads (a loader given a local folder whose config it cannot read may
    report a failed download instead)."""
    index_path = root / "model_index.json"
    index = read_json_object(name, index_path)
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, (list, tuple)) or list(spec) == [None, None]:
            continue  # settings (requires_safety_checker: false) and absent optional components
        if not (len(spec) == 2 and all(isinstance(p, str) and p for p in spec)):
            raise InvalidArgument(name, f"{index_path}: component {component!r} must be [library, class], got {spec!r}")
        folder = root / component
        if not folder.is_dir():
            raise InvalidArgument(name, f"{index_path} names the component {component!r}, but {folder} is not a folder")
        configs = sorted(folder.glob("*.json"))
        if not configs:
            raise InvalidArgument(name, f"the component folder {folder} has no config file (*.json)")
        for config in configs:
            read_json_object(name, config)
    return index
