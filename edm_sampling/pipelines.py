"""`EDMPipeline`: unconditional or class-conditional image sampling for the models no diffusers
pipeline fits: VE NCSN++ (fourier `UNet2DModel`) and EDM-preconditioned `UNet2DModel`s (also
DDPM-family ones), driven by `EDMScheduler`.

    pipe = EDMPipeline(unet=unet, scheduler=EDMScheduler(model_family="edm"))
    images = pipe(batch_size=4, num_inference_steps=18, generator=[torch.Generator().manual_seed(s) for s in range(4)]).images

A saved folder loads with `EDMPipeline.from_pretrained(folder)`, or, in a process that has not
imported this package, with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`:
the folder holds a one-line loader file (`edm_pipeline.py`, it imports this module) that its
model_index.json names, which is how diffusers finds pipeline classes outside its own library.
Without `trust_remote_code=True` diffusers' error names the flag and the file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from . import schedulers as _schedulers  # noqa: F401  (diffusers finds EDMScheduler only in imported modules)
from .safety.errors import NonFiniteOutputError
from .safety.inputs import InvalidArgument, Number, check_choice, check_kinds
from .samplers import check_generator, check_sampling_inputs, randn

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LOADER_MODULE = "edm_pipeline"  # <folder>/edm_pipeline.py, named by model_index.json's _class_name
LOADER_SOURCE = (
    '"""Loader of a pipeline saved by edm_sampling (EDMPipeline). diffusers runs this file when the\n'
    'folder is loaded with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True); it only\n'
    'imports the installed edm_sampling package. Or: from edm_sampling import EDMPipeline;\n'
    'EDMPipeline.from_pretrained(folder)."""\n\n'
    "from edm_sampling.pipelines import EDMPipeline  # noqa: F401\n"
)


class EDMPipeline(DiffusionPipeline):
    """Sampling loop of the diffusers protocol around a UNet2DModel and an `EDMScheduler`.

    The state stays in float32 (or the latents' wider dtype) whatever the UNet's dtype; the
    UNet's input is cast to its own dtype. Images come back in [0, 1]: VE data already lives
    in [0, 1], VP and EDM data in [-1, 1].
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: Any, scheduler: Any):
        super().__init__()
        config = getattr(unet, "config", None)
        if not (isinstance(unet, torch.nn.Module) and hasattr(config, "in_channels") and hasattr(config, "sample_size")):
            raise InvalidArgument("unet", f"must be a diffusers UNet2DModel (a torch module with config.in_channels and "
                                          f"config.sample_size), got {type(unet).__name__}")
        if not all(callable(getattr(scheduler, name, None)) for name in ("set_timesteps", "scale_model_input", "step")):
            raise InvalidArgument("scheduler", f"must be a diffusers scheduler such as EDMScheduler, got {type(scheduler).__name__}")
        self.register_modules(unet=unet, scheduler=scheduler)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def _class_labels(self, class_labels: Any, batch_size: int, device: torch.device) -> torch.Tensor | None:
        conditional = (
            getattr(self.unet.config, "num_class_embeds", None) is not None
            or getattr(self.unet.config, "class_embed_type", None) is not None
        )
        if class_labels is None:
            if conditional:
                raise ValueError("class_labels is required: the unet is class-conditional (num_class_embeds is set)")
            return None
        if not conditional:
            raise ValueError("class_labels was given but the unet has no class embedding")
        try:
            labels = torch.as_tensor(class_labels, device=device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            labels = None
        classes = getattr(self.unet.config, "num_class_embeds", None)
        if labels is None or labels.is_floating_point() or labels.dtype == torch.bool or not bool(
                ((labels >= 0) & (labels < (classes or 2**62))).all()):
            raise InvalidArgument("class_labels", f"must be integer labels in [0, {classes}), got {class_labels!r}")
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"class_labels must hold 1 or batch_size={batch_size} labels, got {labels.numel()}")
        return labels.long()

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 18,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate `batch_size` images.

        Args:
            generator: one generator, or a list of one per sample (then each sample depends
                only on its own seed; churn noise is drawn per sample too).
            class_labels: one label for all samples or one per sample (class-conditional UNets).
            latents: N(0, I) noise of the sample shape; drawn with `generator` when None.
            output_type: "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW in [0, 1]) or "latent"
                (the raw final samples in the model's data range, unclamped).
        """
        check_choice("output_type", output_type, OUTPUT_TYPES)
        Number(1, integer=True).check("batch_size", batch_size)
        check_kinds(return_dict=(return_dict, "bool"))
        check_generator(generator, batch_size)
        device = self._execution_device
        shape = self._sample_shape(batch_size)
        if latents is None:
            latents = randn(shape, generator, device, torch.float32)
        else:
            check_sampling_inputs(self.unet, latents)
            if tuple(latents.shape) != shape:
                raise InvalidArgument("latents", f"must have shape {shape}, got {tuple(latents.shape)}")
        labels = self._class_labels(class_labels, batch_size, device)
        model_kwargs = {} if labels is None else {"class_labels": labels}

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        state_dtype = torch.promote_types(latents.dtype, torch.float32)
        sample = latents.to(device=device, dtype=state_dtype) * self.scheduler.init_noise_sigma
        finite = []  # per model call: whether its output is finite, a device flag read once after the loop
        with warnings.catch_warnings():  # EDMScheduler's own non-finite warning: the error below says more
            warnings.filterwarnings("ignore", message="the samples are not finite", category=RuntimeWarning)
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(sample, t).to(self.unet.dtype)
                output = self.unet(model_input, t, **model_kwargs).sample
                finite.append(torch.isfinite(output).all())
                sample = self.scheduler.step(output, t, sample, generator=generator).prev_sample
        self._check_finite(finite, sample)

        if output_type == "latent":
            images = sample
        else:
            family = getattr(self.scheduler, "family", None)  # VE data lives in [0, 1], the others in [-1, 1]
            images = family.to_unit_range(sample) if family is not None else sample / 2 + 0.5
            images = images.clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _check_finite(self, finite: list[torch.Tensor], sample: torch.Tensor) -> None:
        """`NonFiniteOutputError` naming the first model call whose output held NaN or inf (one
        host sync for the whole generation), or saying that the samples did though no output did."""
        flags = torch.stack(finite + [torch.isfinite(sample).all()]).cpu().tolist()
        if all(flags):
            return
        timesteps = self.scheduler.timesteps
        if not all(flags[:-1]):
            call = flags.index(False)
            raise NonFiniteOutputError(
                f"the model returned NaN or inf at step {call} of {len(finite)} (timestep {float(timesteps[call]):.6g}); "
                "no images are returned")
        raise NonFiniteOutputError("the samples hold NaN or inf although every model output was finite (a scheduler "
                                   "setting out of range?); no images are returned")

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' save_pretrained, plus the loader file that lets
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` find this class in a
        process that has not imported edm_sampling (see the module docstring)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        (folder / f"{LOADER_MODULE}.py").write_text(LOADER_SOURCE)
        index_path = folder / self.config_name
        index = json.loads(index_path.read_text())
        index["_class_name"] = [LOADER_MODULE, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """diffusers' load_config; a folder saved with the loader file names this class directly,
        so `EDMPipeline.from_pretrained(folder)` needs neither the file nor trust_remote_code."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if config.get("_class_name") == [LOADER_MODULE, cls.__name__]:
            config["_class_name"] = cls.__name__
        return loaded


def _register_with_diffusers() -> None:
    """Let `DiffusionPipeline.from_pretrained(folder)` find EDMPipeline in folders saved without
    the loader file (model_index.json `_class_name` "EDMPipeline", as earlier versions wrote):
    diffusers resolves that name in its own namespace only. An EDMPipeline that diffusers itself
    may ship one day is left alone.
    """
    import diffusers

    if getattr(diffusers, EDMPipeline.__name__, EDMPipeline) is EDMPipeline:
        setattr(diffusers, EDMPipeline.__name__, EDMPipeline)


_register_with_diffusers()
