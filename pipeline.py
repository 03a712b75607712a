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

import copy
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.utils import logging as transformers_logging

import decoding
import model_files
from batching import StepCallback
from resolve import Plan
from safety import Checker, load_safety_checker

log = logging.getLogger(__name__)
# The environment variables above act only if this module imports the libraries first; set the
# same quiet levels explicitly (e.g. diffusers' "modules that should be kept in float32: []").
diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()

# Scheduler choices (schemas.SCHEDULERS), each built from the checkpoint's own scheduler config,
# so each keeps trailing timesteps and, for the 1-step checkpoint, x0-prediction. UNet
# evaluations at 4 steps (counted by tests/test_modes.py): Heun 7, PNDM 5, the rest 4. KarrasDPM
# moves the timesteps off the distilled trajectory (999, 687, 146, 0); ancestral/SDE add noise.
SCHEDULERS: dict[str, tuple[type, dict[str, object]]] = {
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    # The real DPM++ 2M SDE (Replicate's "DPM++2MSDE" runs KDPM2-ancestral, 7 evaluations).
    "DPM++2MSDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++",
                                                 "solver_order": 2}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS, as Stable Diffusion configures it
}
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "inpaint": StableDiffusionXLInpaintPipeline,
}


class ModelFolderError(RuntimeError):
    """The model folder is missing files or holds files that do not load."""


@dataclass
class Model:
    """The loaded worker model: one pipeline per Lightning step count, sharing modules."""

    pipes: dict[int, StableDiffusionXLPipeline]
    device: torch.device
    dtype: torch.dtype
    # (steps, mode, scheduler) -> a pipeline sharing every module of pipes[steps] but holding
    # its own scheduler, so no job changes the shared pipeline's state. Built on first use
    # (~16 ms each) and reused: generation runs on one thread at a time.
    views: dict[tuple[int, str, str], DiffusionPipeline] = field(default_factory=dict)
    safety: Checker | None = None
    # TAESDXL, when VAE_DECODER=tiny: ~18x fewer decode FLOPs than the full VAE, softer details.
    tiny_decoder: AutoencoderTiny | None = None
    # Token counting runs in request threads while the GPU thread encodes prompts; the Rust
    # tokenizer's padding/truncation state is per object, so counting uses its own copy.
    token_counter: tuple[CLIPTokenizer, threading.Lock] | None = None

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.pipes))

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return next(iter(self.pipes.values())).tokenizer


# fp16 on the GPU (the checkpoints' own precision); fp32 on a CPU, where fp16 is slow and lossy.
DTYPES = {"cuda": torch.float16, "cpu": torch.float32}


def placement(kind: str) -> tuple[torch.device, torch.dtype]:
    """The device of ``kind`` ("cuda" or "cpu") and the dtype the worker runs it in."""
    return torch.device(kind), DTYPES[kind]


def default_device() -> tuple[torch.device, torch.dtype]:
    """CUDA when a GPU is present, otherwise the CPU."""
    return placement("cuda" if torch.cuda.is_available() else "cpu")


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
         dtype: torch.dtype | None = None, safety: bool = False,
         tiny_decoder: bool = False) -> Model:
    """Load the model folder for the given step checkpoints; ``ModelFolderError`` if it can't."""
    if device is None or dtype is None:
        device, dtype = default_device()
    missing = model_files.missing_files(model_dir, steps, safety, tiny_decoder)
    if missing:
        raise ModelFolderError(f"model folder {model_dir} is missing {', '.join(missing)}")
    try:
        model = _load(model_dir, steps, device, dtype)
        if safety:
            model.safety = load_safety_checker(model_dir, device, dtype)
        if tiny_decoder:
            model.tiny_decoder = AutoencoderTiny.from_pretrained(
                model_dir / model_files.TAESD_DIR, dtype=dtype).to(device).eval()
        if device.type == "cuda":
            optimize(model)
        return model
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # corrupt or mismatched
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
    return Model(pipes=pipes, device=device, dtype=dtype,
                 token_counter=(copy.deepcopy(shared["tokenizer"]), threading.Lock()))


def optimize(model: Model) -> None:
    """GPU layout and kernels that leave the results unchanged (within fp rounding).

    channels_last suits cuDNN's convolutions (the VAE decoder is ~94 % convolution); fused QKV
    turns three attention projections into one larger matmul. SDPA attention is diffusers'
    default already.
    """
    for module in modules_to_optimize(model):
        module.to(memory_format=torch.channels_last)
        if hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()


def modules_to_optimize(model: Model) -> list[torch.nn.Module]:
    shared_vae = next(iter(model.pipes.values())).vae
    return [pipe.unet for pipe in model.pipes.values()] + [shared_vae] + (
        [model.tiny_decoder] if model.tiny_decoder is not None else [])


def prompt_tokens(model: Model, text: str) -> int:
    """How many CLIP tokens ``text`` takes, start and end tokens included (thread-safe)."""
    tokenizer, lock = model.token_counter
    with lock:
        return len(tokenizer(text, truncation=False).input_ids)


def view(model: Model, steps: int, mode: str, scheduler: str) -> DiffusionPipeline:
    """The pipeline for one (checkpoint, mode, scheduler): shared modules, its own scheduler."""
    key = (steps, mode, scheduler)
    if key not in model.views:
        base = model.pipes[steps]
        cls, kwargs = SCHEDULERS[scheduler]
        # dtype: from_pipe casts every (shared!) module to float32 unless told otherwise.
        pipe = PIPELINE_CLASSES[mode].from_pipe(
            base, scheduler=cls.from_config(base.scheduler.config, **kwargs), dtype=model.dtype)
        pipe.set_progress_bar_config(disable=True)
        model.views[key] = pipe
    return model.views[key]




def generate_batch(model: Model, plans: Sequence[Plan],
                   on_step: StepCallback | None = None) -> list[list[Image.Image]]:
    """Run plans of one ``shape_key`` as one batch; image j of plan i from its own generator.

    Each image gets its own prompt row and ``torch.Generator``, so a plan's images are the same
    (within fp rounding) whether it runs alone or beside other plans.
    """
    first = plans[0]
    if any(p.shape_key != first.shape_key for p in plans):
        raise ValueError("plans of different shapes cannot share a batch")
    rows = [(p, seed) for p in plans for seed in p.seeds]
    kwargs: dict[str, object] = dict(
        prompt=[p.prompt for p, _ in rows], num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale, num_images_per_prompt=1, output_type="latent",
        generator=[torch.Generator(model.device).manual_seed(seed) for _, seed in rows])
    if first.negative_prompt is not None:  # else diffusers uses zero embeddings (SDXL's rule)
        kwargs["negative_prompt"] = [p.negative_prompt for p, _ in rows]
    if first.mode != "img2img":  # img2img takes its size from the init image
        kwargs.update(width=first.width, height=first.height)
    if first.mode != "txt2img":
        kwargs.update(image=[p.init_image for p, _ in rows], strength=first.strength)
    if first.mode == "inpaint":
        kwargs["mask_image"] = [p.mask_image for p, _ in rows]
    pipe = view(model, first.steps, first.mode, first.scheduler)
    if on_step is not None:
        def callback(pipe_: DiffusionPipeline, i: int, t: object, tensors: dict) -> dict:
            on_step(i + 1, pipe_.num_timesteps)
            return tensors

        kwargs["callback_on_step_end"] = callback
    with torch.inference_mode():
        images = decoding.decode_latents(model.tiny_decoder or pipe.vae, pipe(**kwargs).images)
    out, start = [], 0
    for p in plans:
        out.append(images[start:start + len(p.seeds)])
        start += len(p.seeds)
    return out


def generate(model: Model, plan: Plan, on_step: StepCallback | None = None) -> list[Image.Image]:
    """Run one plan: ``len(plan.seeds)`` images, image i from its own generator seeded seeds[i]."""
    return generate_batch(model, [plan], on_step)[0]
