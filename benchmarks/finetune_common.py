"""Shared set-up of the fine-tuning benchmarks: small pretrained pipelines saved to disk and an
image folder with captions (no download), plus the plain diffusers fine-tuning step they are
compared with (what diffusers' train_unconditional / train_text_to_image examples do)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

PROMPTS = ("a photo of a cat", "a red dog", "a blue cat", "a dog")


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` RGB PNGs of random smooth blobs at ``size`` with captions in metadata.jsonl."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        colour = rng.uniform(0, 255, 3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.05 + 0.1 * r))[..., None]
        Image.fromarray((blob * colour + (1 - blob) * 30).astype("uint8")).save(folder / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": PROMPTS[i % len(PROMPTS)]})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def save_pixel_pipeline(folder: Path, size: int, channels: tuple[int, ...]) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    n = len(channels)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), layers_per_block=2,
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def save_latent_pipeline(folder: Path, size: int, channels: tuple[int, ...]) -> Path:
    """A small StableDiffusionPipeline (UNet2DConditionModel, AutoencoderKL x4, CLIP text model)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(folder.parent / "clip_vocab")
    torch.manual_seed(0)
    n = len(channels)
    unet = UNet2DConditionModel(sample_size=size // 4, in_channels=4, out_channels=4, block_out_channels=channels,
                                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                                layers_per_block=2, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                        sample_size=size)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def plain_step_fn(pipeline_dir: Path, data: Path, size: int, batch_size: int, accelerator, lr: float,
                  latent: bool) -> Callable[[], None]:
    """One step of the plain diffusers fine-tuning loop on the same pipeline and images:
    a DataLoader over the folder, random integer timesteps, ``add_noise``, epsilon-MSE,
    backward, Adam, ``EMAModel.step``; latent: ``vae.encode(...).latent_dist.sample() *
    scaling_factor`` and the prompt's ``text_encoder(input_ids)[0]`` under no_grad."""
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.training_utils import EMAModel

    from edm_sampling.training.sources import FolderSource, StreamedImages, collate_images

    device = accelerator.device
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    unet = pipe.unet.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=0.999)
    ema.to(device)
    source = FolderSource(data)
    loader = torch.utils.data.DataLoader(StreamedImages(source, (size, size), "RGB"), batch_size=batch_size,
                                         shuffle=True, collate_fn=collate_images, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    state: dict[str, Any] = {"it": iter(loader)}
    if latent:
        vae = pipe.vae.to(device).eval().requires_grad_(False)
        text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
        tokens = pipe.tokenizer(source.captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids

    def next_batch() -> dict[str, Any]:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])

    def step() -> None:
        batch = next_batch()
        clean = batch["images"].to(device)
        kwargs = {}
        if latent:
            with torch.no_grad():
                clean = vae.encode(clean).latent_dist.sample() * vae.config.scaling_factor
                kwargs["encoder_hidden_states"] = text_encoder(tokens[batch["index"]].to(device))[0]
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=device)
        pred = unet(scheduler.add_noise(clean, noise, t), t, **kwargs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(accelerator.unwrap_model(unet).parameters())
        float(loss.detach())  # the log line every step, like the trainer's non-finite check

    return step


def use_cpu_if_asked(device: str) -> None:
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
