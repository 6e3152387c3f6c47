"""Builders of tiny, real diffusers / transformers models from configs (no download).

Every builder seeds torch before creating weights, so two calls give identical models. The
models are small enough that a full sampling run costs milliseconds on a CPU; their
outputs are random but deterministic, which is all an equality test between two samplers
needs. Reusable by any test: `from tests.tiny_models import tiny_unet2d`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edm_sampling.denoisers import PreconditionedDenoiser
from edm_sampling.families import FlowMatching

SAMPLE_SIZE = 8


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_unet2d(
    in_channels: int = 3,
    sample_size: int = SAMPLE_SIZE,
    num_class_embeds: int | None = None,
    seed: int = 0,
    **overrides: Any,
):
    """A UNet2DModel with positional time embedding (DDPM / DDIM / EDM-preconditioned nets).

    It takes fractional timesteps as well as integers; `num_class_embeds` adds a class
    embedding (forward(..., class_labels=...)).
    """
    from diffusers import UNet2DModel

    _seeded(seed)
    config = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        num_class_embeds=num_class_embeds,
    )
    config.update(overrides)
    return UNet2DModel(**config).eval()


def tiny_fourier_unet2d(in_channels: int = 3, sample_size: int = SAMPLE_SIZE, seed: int = 0, **overrides: Any):
    """An NCSN++-style UNet2DModel(time_embedding_type="fourier"): takes sigma as its timestep
    (log inside) and divides its output by it, i.e. it outputs a score."""
    return tiny_unet2d(
        in_channels=in_channels,
        sample_size=sample_size,
        seed=seed,
        time_embedding_type="fourier",
        flip_sin_to_cos=False,
        **overrides,
    )


def tiny_unet2d_condition(cross_attention_dim: int = 8, sample_size: int = SAMPLE_SIZE, seed: int = 0):
    """A UNet2DConditionModel with 4 latent channels for a Stable Diffusion pipeline."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
    ).eval()


def tiny_vae(seed: int = 0, **overrides: Any):
    """An AutoencoderKL with 4 latent channels and one downsampling (x2); `overrides` set other
    config values (SD3's shift_factor / scaling_factor)."""
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * SAMPLE_SIZE,
        **overrides,
    ).eval()


_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue")


def write_clip_vocab(directory: str | Path) -> tuple[Path, Path]:
    """Write a tiny CLIP BPE vocabulary (vocab.json, merges.txt) into `directory`.

    Single letters (bare and word-final) plus a few whole words, so any lowercase prompt
    tokenizes without an unknown token."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(_LETTERS) + [c + "</w>" for c in _LETTERS]
    merges: list[str] = []
    for word in _WORDS:
        if len(word) < 2:
            continue
        piece = word[0]
        for k, char in enumerate(word[1:], start=1):
            suffix = "</w>" if k == len(word) - 1 else ""
            merges.append(f"{piece} {char}{suffix}")
            piece = piece + char + suffix
            if piece not in tokens:
                tokens.append(piece)
    vocab = {token: index for index, token in enumerate(tokens)}
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path


def tiny_clip_tokenizer(directory: str | Path, model_max_length: int = 16):
    """A CLIPTokenizer built from the vocabulary written by write_clip_vocab(directory)."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_clip_vocab(directory)
    vocab = json.loads(vocab_path.read_text())
    merges = [tuple(line.split()) for line in merges_path.read_text().splitlines()[1:] if line.strip()]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_clip_text_model(vocab_size: int, hidden_size: int = 8, max_positions: int = 16, seed: int = 0,
                         with_projection: bool = False):
    """A 2-layer CLIPTextModel whose hidden size is the UNet's cross_attention_dim, or with
    `with_projection` a CLIPTextModelWithProjection (SD3's CLIP encoders: pooled output too)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seeded(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden_size,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_sd_components(directory: str | Path, scheduler=None) -> dict[str, Any]:
    """Keyword arguments for StableDiffusionPipeline / StableDiffusionImg2ImgPipeline built
    from tiny models; the tokenizer's vocabulary is written under `directory`."""
    from diffusers import DDPMScheduler

    tokenizer = tiny_clip_tokenizer(Path(directory) / "clip_vocab")
    if scheduler is None:
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return dict(
        unet=tiny_unet2d_condition(),
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


class CallCounter:
    """Counts a module's forward calls by wrapping its `forward` (works inside pipelines,
    which call the module directly)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self._forward = module.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return self._forward(*args, **kwargs)

        module.forward = counted

    def reset(self) -> None:
        self.calls = 0

    def remove(self) -> None:
        self.module.forward = self._forward


def tiny_sd3_transformer(clip_hidden_size: int = 8, sample_size: int = SAMPLE_SIZE, seed: int = 0):
    """A one-layer SD3Transformer2DModel on 4 latent channels; its text inputs are the two CLIP
    encoders' concatenated states (2 * clip_hidden_size wide) and pooled outputs."""
    from diffusers import SD3Transformer2DModel

    _seeded(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=2 * clip_hidden_size,
        caption_projection_dim=16,
        pooled_projection_dim=2 * clip_hidden_size,
    ).eval()


def tiny_sd3_components(directory: str | Path, scheduler=None) -> dict[str, Any]:
    """Keyword arguments for StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline from tiny
    models: two CLIP text encoders sharing one tokenizer (written under `directory`), no T5
    (`text_encoder_3=None`: SD3 feeds zeros in its place), a 4-channel VAE with SD3's
    shift_factor, and FlowMatchEulerDiscreteScheduler(shift=3.0) unless `scheduler` is given."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = tiny_clip_tokenizer(Path(directory) / "clip_vocab")
    return dict(
        transformer=tiny_sd3_transformer(),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=tiny_clip_text_model(len(tokenizer), seed=1, with_projection=True),
        text_encoder_2=tiny_clip_text_model(len(tokenizer), seed=2, with_projection=True),
        text_encoder_3=None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=None,
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def write_image_folder(
    directory: str | Path,
    sizes: list[tuple[int, int]],
    captions: list[str] | None = None,
    mode: str = "RGB",
    broken: bool = False,
) -> Path:
    """An imagefolder of PNGs of the given (width, height) sizes, each a different smooth pattern.

    `captions` go to metadata.jsonl (`file_name`, `text`); `broken` adds an unreadable file
    (bad.png) and a zero-byte one (zero.png)."""
    import numpy as np
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (width, height) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width]
        channels = [(37 * i + 5 * x + 3 * y) % 256, (90 + 11 * i + 7 * y) % 256, (200 - 23 * i + 2 * x) % 256]
        array = np.stack(channels, axis=-1).astype(np.uint8)
        image = Image.fromarray(array, "RGB").convert(mode)
        image.save(directory / f"img{i}.png")
        if captions is not None:
            rows.append({"file_name": f"img{i}.png", "text": captions[i]})
    if captions is not None:
        (directory / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    if broken:
        (directory / "bad.png").write_bytes(b"this is not a PNG")
        (directory / "zero.png").write_bytes(b"")
    return directory



class FirstCallSeesUnitNoise(PreconditionedDenoiser):
    """A flow denoiser as an SD3 / Flux loop feeds it when the grid starts at a finite sigma (from
    sigma_max, or after afs) where the pipeline's unit noise n stands in for pure noise: its first
    call sees n itself as x_t, i.e. x_edm = (1 + sigma) n, while the solver's state is sigma n (the
    scheduler takes D for the input the model saw). ``family``: the flow family."""

    def __init__(self, net, family=None):
        super().__init__(net, family if family is not None else FlowMatching())
        self.calls = 0

    def forward(self, x, sigma, **kwargs):
        self.calls += 1
        if self.calls == 1 and bool(torch.isfinite(sigma).all()):
            x = x * ((1 + sigma) / sigma).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return super().forward(x, sigma, **kwargs)
