"""Streamed training data: image folders (captions, classes, odd sizes, broken files) and
Hugging Face datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edm_sampling.training.data import batch_indices, micro_batch_indices
from edm_sampling.training.sources import (
    FolderSource,
    StepBatchSampler,
    StreamedImages,
    resize_and_crop,
    source_resolution,
)
from tiny_models import write_image_folder


def test_resize_and_crop_covers_then_centre_crops():
    # a 4 x 2 (w x h) image: columns 0..3 grey levels; to 2 x 2 it is scaled by 1 and the middle kept
    array = np.array([[0, 80, 160, 240]] * 2, dtype=np.uint8)
    out = resize_and_crop(Image.fromarray(array, "L"), (2, 2), "L")
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([80, 160]) / 127.5 - 1)
    # a tall image to a wide size: scaled to cover (both sides >= target), RGB from grey
    tall = Image.fromarray(np.full((30, 10), 255, dtype=np.uint8), "L")
    out = resize_and_crop(tall, (8, 16), "RGB")
    assert out.shape == (3, 8, 16) and torch.all(out == 1.0)


def test_folder_captions_classes_and_broken_files(tmp_path):
    root = write_image_folder(tmp_path / "captioned", sizes=[(8, 8), (12, 6)], captions=["a cat", "a dog"], broken=True)
    source = FolderSource(root)
    assert len(source) == 2 and source.captions == ["a cat", "a dog"] and source.labels is None
    assert sorted(name for name, _ in source.report.skipped) == ["bad.png", "zero.png"]
    assert "zero-byte" in dict(source.report.skipped)["zero.png"]
    with pytest.raises(ValueError, match="resolution: the data has images of mixed sizes"):
        source_resolution(source)
    missing = FolderSource(root, caption_column="prompt")
    assert missing.captions is None and str(missing.caption_error).startswith("caption_column: ")

    classes = tmp_path / "classes"
    write_image_folder(classes / "cat", sizes=[(8, 8)])
    write_image_folder(classes / "dog", sizes=[(8, 8), (8, 8)])
    source = FolderSource(classes)
    assert source.class_names == ("cat", "dog") and source.labels == [0, 1, 1]
    assert source.captions is None and "metadata.jsonl" in str(source.caption_error)

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"")
    (only_bad / "y.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data: .*no usable image"):
        FolderSource(only_bad)


def test_image_that_fails_to_decode_later_is_replaced_and_reported(tmp_path):
    root = write_image_folder(tmp_path / "trunc", sizes=[(16, 16)] * 3)
    data = (root / "img1.png").read_bytes()
    (root / "img1.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    source = FolderSource(root)
    assert len(source) == 3  # passes the header scan
    images = StreamedImages(source, (8, 8), "RGB")
    item = images[1]
    assert item["index"] == 2 and len(item["failed"]) == 1 and "img1.png" in item["failed"][0]
    torch.testing.assert_close(item["image"], images[2]["image"], rtol=0, atol=0)


def test_step_batches_are_a_pure_function_of_seed_and_step():
    sampler = StepBatchSampler(10, seed=3, batch_size=8, grad_accum=2, processes=2, process_index=1,
                               start_step=5, stop_step=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    full = batch_indices(10, 3, 5, 8)
    assert batches[0] == full[2:4].tolist() and batches[1] == full[6:8].tolist()
    again = list(StepBatchSampler(10, 3, 8, 2, 2, 1, start_step=6, stop_step=7))
    assert again == batches[2:]
    every = [micro_batch_indices(10, 3, 5, r, 8, 2, 2, p).tolist() for r in range(2) for p in range(2)]
    assert sorted(sum(every, [])) == sorted(full.tolist())


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    folder = write_image_folder(root / "images", sizes=[(8, 8), (10, 8), (8, 12)])
    import pyarrow as pa

    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    table = pa.table({
        "picture": [{"bytes": (folder / f"img{i}.png").read_bytes(), "path": None} for i in range(3)],
        "caption": ["a red cat", "a blue dog", "a photo"],
    })
    data = datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features),
                            fingerprint="edm-sampling-test")
    data.save_to_disk(str(root / "saved"))
    return root / "saved"


def test_hf_dataset_source_and_column_errors(hf_dataset):
    from edm_sampling.training.sources import HFDatasetSource

    source = HFDatasetSource(str(hf_dataset), image_column="picture", caption_column="caption")
    assert len(source) == 3 and source.captions[1] == "a blue dog"
    image = StreamedImages(source, (8, 8), "RGB")[2]["image"]
    assert image.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="image_column: column 'image'"):
        HFDatasetSource(str(hf_dataset))
    assert str(HFDatasetSource(str(hf_dataset), "picture", "text").caption_error).startswith("caption_column: ")


def test_finetune_stable_diffusion_on_a_hf_dataset(hf_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.trainer import Trainer
    from tiny_models import tiny_sd_components

    StableDiffusionPipeline(**tiny_sd_components(tmp_path)).save_pretrained(tmp_path / "sd")
    common = dict(pretrained=str(tmp_path / "sd"), dataset=str(hf_dataset), image_column="picture", steps=1,
                  batch_size=2, progress=False, num_samples=0, export=False)
    with pytest.raises(ValueError, match="caption_column: column 'text'"):
        Trainer(TrainConfig(output_dir=str(tmp_path / "bad"), **common))
    assert not (tmp_path / "bad").exists()
    result = Trainer(TrainConfig(output_dir=str(tmp_path / "run"), caption_column="caption", **common)).run()
    assert result.steps == 1 and np.isfinite(result.last_loss)
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["unreadable_images"] == 0
