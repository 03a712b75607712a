"""Owns diffusers: loads the model folder with the SDXL-Lightning recipe and generates images.

The recipe (ByteDance's model card, made cold-start friendly):
- SDXL base's text encoders and tokenizers, and the fp16-fix VAE, whose ``force_upcast: false``
  spares the fp32 re-cast of the VAE that the stock VAE needs on every fp16 call;
- the Lightning UNet built on the meta device (no random initialisation of 2.6 B parameters on the
  CPU) and filled from its ``.safetensors`` file straight onto the target device;
- ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"`` (SDXL ships "leading", which
  starts Lightning from a noise level it never saw); x0-prediction for the 1-step checkpoint;
- CUDA + fp16 when available, else CPU + fp32; one ``torch.Generator`` per image.

Every loaded checkpoint gets its own pipeline object; all of them share the same text encoders
and VAE modules, so a second checkpoint costs only its UNet.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

# Everything is read from local files; silence the libraries' progress bars and advice
# (torchvision fallbacks, 77-token notices: the worker reports truncation itself).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import model_files
from resolve import Plan

log = logging.getLogger(__name__)


class ModelFolderError(RuntimeError):
    """The model folder is missing files or holds files that do not load."""


@dataclass
class Model:
    """The loaded worker model: one pipeline per Lightning step count, sharing modules."""

    pipes: dict[int, StableDiffusionXLPipeline]
    device: torch.device
    dtype: torch.dtype

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.pipes))

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return next(iter(self.pipes.values())).tokenizer


def default_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when a GPU is present; otherwise CPU in fp32 (CPU fp16 is slow and lossy)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_unet(model_dir: Path, steps: int, device: torch.device,
              dtype: torch.dtype) -> UNet2DConditionModel:
    """Build the UNet on the meta device and assign the checkpoint's tensors, read on ``device``."""
    config = UNet2DConditionModel.load_config(model_dir / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    path = model_dir / model_files.CHECKPOINTS[steps]
    # safetensors reads straight into device memory; only the dtype cast may copy.
    state = {k: v.to(dtype) for k, v in load_file(path, device=str(device)).items()}
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # missing/unexpected keys or wrong shapes: wrong file
        raise ModelFolderError(f"{path.name} does not fit unet/config.json: {exc}") from None
    return unet.eval().requires_grad_(False)


def scheduler_for(model_dir: Path, steps: int) -> EulerDiscreteScheduler:
    """Euler with trailing timesteps: 4 steps -> [999, 749, 499, 249], as Lightning was trained."""
    config = EulerDiscreteScheduler.load_config(model_dir / "scheduler")
    extra = {"prediction_type": "sample"} if steps in model_files.X0_PREDICTION_STEPS else {}
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing", **extra)


def load(model_dir: Path, steps: tuple[int, ...], device: torch.device | None = None,
         dtype: torch.dtype | None = None) -> Model:
    """Load the model folder for the given step checkpoints; ``ModelFolderError`` if it can't."""
    if device is None or dtype is None:
        device, dtype = default_device()
    missing = model_files.missing_files(model_dir, steps)
    if missing:
        raise ModelFolderError(f"model folder {model_dir} is missing {', '.join(missing)}")
    try:
        return _load(model_dir, steps, device, dtype)
    except (SafetensorError, OSError, ValueError) as exc:  # unreadable, corrupt or mismatched
        raise ModelFolderError(f"{type(exc).__name__}: {exc}") from None


def _load(model_dir: Path, steps: tuple[int, ...], device: torch.device,
          dtype: torch.dtype) -> Model:
    shared = dict(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", variant="fp16",
                                                   dtype=dtype, device_map=str(device)),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            model_dir / "text_encoder_2", variant="fp16", dtype=dtype, device_map=str(device)),
        vae=AutoencoderKL.from_pretrained(model_dir / "vae", dtype=dtype).to(device),
    )
    pipes = {}
    for s in steps:
        pipe = StableDiffusionXLPipeline(**shared, unet=load_unet(model_dir, s, device, dtype),
                                         scheduler=scheduler_for(model_dir, s),
                                         add_watermarker=False)  # watermarking is a CPU round trip
        pipe.set_progress_bar_config(disable=True)
        pipes[s] = pipe
    return Model(pipes=pipes, device=device, dtype=dtype)


def prompt_tokens(model: Model, text: str) -> int:
    """How many CLIP tokens ``text`` takes, start and end tokens included."""
    return len(model.tokenizer(text, truncation=False).input_ids)


def generate(model: Model, plan: Plan) -> list[Image.Image]:
    """Run one plan: ``len(plan.seeds)`` images, image i from its own generator seeded seeds[i]."""
    pipe = model.pipes[plan.steps]
    generators = [torch.Generator(model.device).manual_seed(s) for s in plan.seeds]
    with torch.inference_mode():
        result = pipe(prompt=plan.prompt, negative_prompt=plan.negative_prompt,
                      width=plan.width, height=plan.height, num_inference_steps=plan.steps,
                      guidance_scale=plan.guidance_scale, num_images_per_prompt=len(plan.seeds),
                      generator=generators, output_type="pil")
    return list(result.images)
