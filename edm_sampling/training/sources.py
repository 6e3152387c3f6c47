"""Streamed training images: an image folder or a Hugging Face `datasets` dataset, read per batch.

A *source* lists its items without decoding them: ``len(source)``, ``source.name(i)`` (for
reports), ``source.open(i)`` (a PIL image; may raise), optional ``captions`` and ``labels``.

- :class:`FolderSource`: the `imagefolder` convention. Every PNG / JPEG / WebP / BMP under the
  folder; captions from a ``metadata.jsonl`` beside them (one JSON object per line with
  ``file_name`` and a caption column, "text" by default); class labels from first-level
  subfolders. Zero-byte files and files whose header cannot be read are reported by name and
  left out when the folder is scanned; a folder with no usable image is refused.
- :class:`HFDatasetSource`: a dataset saved with ``save_to_disk`` (or, online, a hub name) with
  an image column and an optional caption column (``datasets`` is an optional dependency).

:class:`StreamedImages` turns a source into a torch ``Dataset`` of [C, H, W] tensors in
[-1, 1], resized (shorter side first, keeping the aspect ratio) and centre-cropped to the
training resolution. An image that fails to decode later is reported by name and replaced by
the next readable one, so a run never stops hours in; the replacement is deterministic, which
keeps exact resume. :class:`StepBatchSampler` feeds a ``DataLoader`` (with workers) the
micro-batches of each step as a pure function of (seed, step, round, process).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from edm_sampling.safety import InvalidArgument

from .data import micro_batch_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
DECODE_ERRORS = (OSError, ValueError, SyntaxError)  # PIL raises these for broken files


@dataclass
class ScanReport:
    """Files left out of a source, with the reason, and the sizes (width, height) seen."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    sizes: dict[tuple[int, int], str] = field(default_factory=dict)
    modes: set[str] = field(default_factory=set)


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """(size, mode) from an image file's header, without decoding the pixels."""
    from PIL import Image

    if path.stat().st_size == 0:
        raise OSError("zero-byte file")
    with Image.open(path) as image:
        return image.size, image.mode


class FolderSource:
    """An image folder in the `imagefolder` convention (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, caption_column: str = "text", flag: str = "data"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidArgument(flag, f"data folder {str(root)!r} does not exist or is not a folder")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not files:
            raise InvalidArgument(flag, f"data folder {str(root)!r} has no PNG or JPEG images ({', '.join(IMAGE_EXTENSIONS)})")
        self.report = ScanReport()
        usable = []
        for path in files:
            try:
                size, mode = _header(path)
            except DECODE_ERRORS as error:
                self.report.skipped.append((str(path.relative_to(self.root)), f"cannot read image: {error}"))
                continue
            self.report.sizes.setdefault(size, path.name)
            self.report.modes.add(mode)
            usable.append(path)
        if not usable:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.report.skipped[:3])
            raise InvalidArgument(flag, f"data folder {str(root)!r} has no usable image ({len(files)} files, {reasons})")
        self.files = usable
        self.captions = self._read_captions(caption_column, flag)
        self.class_names, self.labels = self._class_labels()

    def _read_captions(self, caption_column: str, flag: str) -> list[str] | None:
        path = self.root / METADATA_NAME
        if not path.is_file():
            self.caption_error = InvalidArgument(flag, f"{str(self.root)!r} has no {METADATA_NAME} (lines of "
                                                       f"{{\"file_name\": ..., \"{caption_column}\": ...}})")
            return None
        rows: dict[str, dict[str, Any]] = {}
        columns: set[str] = set()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidArgument(flag, f"cannot read {path}: {error}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[str(Path(row["file_name"]))] = row
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InvalidArgument(flag, f"{path} line {number} is not a JSON object with 'file_name': {error}") from error
            columns.update(row)
        if caption_column not in columns:
            self.caption_error = InvalidArgument("caption_column", f"column {caption_column!r} is not in {path} "
                                                                   f"(columns: {sorted(columns - {'file_name'})})")
            return None
        self.caption_error = None
        return [str(rows.get(str(p.relative_to(self.root)), {}).get(caption_column) or "") for p in self.files]

    def _class_labels(self) -> tuple[tuple[str, ...], list[int] | None]:
        parts = [p.relative_to(self.root).parts for p in self.files]
        if any(len(part) == 1 for part in parts):
            return (), None
        names = tuple(sorted({part[0] for part in parts}))
        index = {name: i for i, name in enumerate(names)}
        return names, [index[part[0]] for part in parts]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return str(self.files[i].relative_to(self.root))

    def open(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as image:
            image.load()
            return image.copy()


class HFDatasetSource:
    """A Hugging Face `datasets` dataset: a local folder written by ``save_to_disk`` (a
    ``DatasetDict`` gives its "train" split), or a hub name when online."""

    def __init__(self, name_or_path: str, image_column: str = "image", caption_column: str = "text"):
        local = Path(name_or_path).exists()
        if not local and (name_or_path.startswith((".", "~", "/")) or name_or_path.count("/") > 1):
            raise InvalidArgument("dataset", f"no such folder {name_or_path!r} (a hub name is 'owner/name')")
        try:
            import datasets
        except ImportError:
            raise InvalidArgument("dataset", "needs the `datasets` package: pip install 'edm_sampling[datasets]'") from None
        try:
            if local:
                data = datasets.load_from_disk(name_or_path)
            else:
                data = datasets.load_dataset(name_or_path, split="train")
        except Exception as error:  # any loading failure is a bad --dataset
            raise InvalidArgument("dataset", f"cannot load {name_or_path!r}: {error}") from error
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data and len(data) != 1:
                raise InvalidArgument("dataset", f"{name_or_path!r} has splits {sorted(data)} and none is 'train'")
            data = data["train"] if "train" in data else next(iter(data.values()))
        if len(data) == 0:
            raise InvalidArgument("dataset", f"{name_or_path!r} is empty")
        columns = list(data.column_names)
        if image_column not in columns:
            raise InvalidArgument("image_column", f"column {image_column!r} is not in the dataset (columns: {columns})")
        self.data, self.image_column = data, image_column
        self.report = ScanReport()
        if caption_column in columns:
            self.caption_error = None
            self.captions: list[str] | None = [str(c or "") for c in data[caption_column]]
        else:
            self.caption_error = InvalidArgument("caption_column", f"column {caption_column!r} is not in the dataset (columns: {columns})")
            self.captions = None
        label = data.features.get("label")
        if label is not None and hasattr(label, "names"):
            self.class_names: tuple[str, ...] = tuple(label.names)
            self.labels: list[int] | None = [int(v) for v in data["label"]]
        else:
            self.class_names, self.labels = (), None

    def __len__(self) -> int:
        return len(self.data)

    def name(self, i: int) -> str:
        return f"row {i}"

    def open(self, i: int):
        from PIL import Image

        value = self.data[i][self.image_column]
        if isinstance(value, dict):  # an undecoded Image feature
            import io

            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            value = Image.open(value)
        if not isinstance(value, Image.Image):
            raise ValueError(f"{type(value).__name__} is not an image")
        value.load()
        return value


def open_source(data: str | None, dataset: str | None, image_column: str, caption_column: str):
    """The source of ``--data`` (a folder) or ``--dataset``."""
    if dataset is not None:
        return HFDatasetSource(dataset, image_column, caption_column)
    return FolderSource(data, caption_column)


def resize_and_crop(image, size: tuple[int, int], mode: str) -> torch.Tensor:
    """A PIL image as a [C, H, W] float tensor in [-1, 1]: converted to ``mode`` ("L" or "RGB"),
    scaled (bicubic, antialiased) so it covers ``size`` = (H, W), then centre-cropped."""
    import numpy as np
    from PIL import Image

    height, width = size
    image = image.convert(mode)
    scale = max(height / image.height, width / image.width)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if mode == "L" else tensor.permute(2, 0, 1)


class StreamedImages(torch.utils.data.Dataset):
    """Item i of a source as ``{"image": [C, H, W], "index": j, "failed": [names]}``.

    j = i unless image i cannot be decoded: then the next readable item (i+1, i+2, ...) stands
    in, and the unreadable names are returned for the trainer to report and count.
    """

    def __init__(self, source: Any, size: tuple[int, int], mode: str):
        self.source, self.size, self.mode = source, tuple(size), mode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        failed: list[str] = []
        n = len(self.source)
        for k in range(n):
            j = (i + k) % n
            try:
                image = resize_and_crop(self.source.open(j), self.size, self.mode)
            except DECODE_ERRORS as error:
                failed.append(f"{self.source.name(j)} ({error})")
                continue
            return {"image": image, "index": j, "failed": failed}
        raise ValueError(f"no image of the data can be decoded (first: {failed[:3]})")


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a micro-batch of :class:`StreamedImages` items."""
    return {
        "images": torch.stack([item["image"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "failed": [name for item in items for name in item["failed"]],
    }


class StepBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches for steps ``start_step`` .. ``stop_step - 1``, round after
    round: `data.micro_batch_indices`, a pure function of (seed, step, round, process)."""

    def __init__(self, num_items: int, seed: int, batch_size: int, grad_accum: int, processes: int,
                 process_index: int, start_step: int, stop_step: int):
        self.args = (num_items, seed, batch_size, grad_accum, processes, process_index)
        self.start_step, self.stop_step = start_step, stop_step

    def __len__(self) -> int:
        return max(self.stop_step - self.start_step, 0) * self.args[3]

    def __iter__(self) -> Iterator[list[int]]:
        num_items, seed, batch_size, grad_accum, processes, process_index = self.args
        for step in range(self.start_step, self.stop_step):
            for round_ in range(grad_accum):
                yield micro_batch_indices(num_items, seed, step, round_, batch_size, grad_accum, processes,
                                          process_index).tolist()


def source_resolution(source: Any, flag: str = "resolution") -> tuple[int, int]:
    """The one size (H, W) all images of a scanned folder share (when no resolution is given)."""
    sizes = source.report.sizes
    if len(sizes) != 1:
        examples = ", ".join(f"{w}x{h} ({name})" for (w, h), name in list(sizes.items())[:3])
        raise InvalidArgument(flag, f"the data has images of mixed sizes: {examples}; give a resolution S or H,W to resize them")
    (width, height), _ = next(iter(sizes.items()))
    return height, width


def source_mode(source: Any) -> str:
    """"L" for an all-greyscale folder, else "RGB" (datasets: RGB)."""
    modes = source.report.modes
    return "L" if modes and modes <= {"L", "1", "I;16", "I"} else "RGB"
