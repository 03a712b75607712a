"""The SDXL-Lightning recipe, from the model folder's files to torch modules on a device.

ByteDance's model card, made cold-start friendly:
- SDXL base's text encoders and tokenizers, and the fp16-fix VAE, whose ``force_upcast: false``
  spares the fp32 re-cast of the VAE that the stock VAE needs on every fp16 call;
- the Lightning UNet built on the meta device (no random initialisation of 2.6 B parameters on
  the CPU) and filled from its ``.safetensors`` file straight onto the target device;
- ``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"`` (SDXL ships "leading", which
  starts Lightning from a noise level it never saw); x0-prediction for the 1-step checkpoint;
- CUDA + fp16 when available, else CPU + fp32.

Functions only: ``pipeline.Engine.load`` calls them and keeps what they return.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from worker.errors import ModelFolderError, StartupError
from worker.spec import CHECKPOINTS, TAESD_DIR, X0_PREDICTION_STEPS

# fp16 on the GPU (the checkpoints' own precision); fp32 on a CPU, where fp16 is slow and lossy.
DTYPES = {"cuda": torch.float16, "cpu": torch.float32}


def placement(kind: str) -> tuple[torch.device, torch.dtype]:
    """The device of ``kind`` ("cuda" or "cpu") and the dtype the worker runs it in."""
    return torch.device(kind), DTYPES[kind]


def choose_device(wanted: str) -> tuple[torch.device, torch.dtype]:
    """The device for ``DEVICE=wanted``: ``auto`` takes CUDA if present; ``cuda`` insists on a
    GPU that really works (a worker on a broken or missing GPU must not take jobs)."""
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return placement("cpu")
    if not torch.cuda.is_available():
        raise StartupError("DEVICE=cuda but no usable CUDA device is visible "
                           "(torch.cuda.is_available() is False): check the GPU and driver")
    try:
        torch.ones(1, device="cuda").add_(1).item()  # initialises the context, fails if broken
    except RuntimeError as exc:
        raise StartupError(f"the CUDA device does not work: {exc}") from None
    return placement("cuda")


def shared_components(model_dir: Path, device: torch.device,
                      dtype: torch.dtype) -> dict[str, Any]:
    """What every checkpoint's pipeline shares: tokenizers, text encoders, the VAE."""
    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(model_dir / "text_encoder", variant="fp16",
                                                   dtype=dtype, device_map=str(device)),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            model_dir / "text_encoder_2", variant="fp16", dtype=dtype, device_map=str(device)),
        vae=AutoencoderKL.from_pretrained(model_dir / "vae", dtype=dtype).to(device),
    )


def load_unet(model_dir: Path, steps: int, device: torch.device,
              dtype: torch.dtype) -> UNet2DConditionModel:
    """Build the UNet on the meta device and assign the checkpoint's tensors, read on ``device``."""
    config = UNet2DConditionModel.load_config(model_dir / "unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    path = model_dir / CHECKPOINTS[steps]
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
    extra = {"prediction_type": "sample"} if steps in X0_PREDICTION_STEPS else {}
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing", **extra)


def load_tiny_decoder(model_dir: Path, device: torch.device,
                      dtype: torch.dtype) -> AutoencoderTiny:
    """TAESDXL: ~18x fewer decode FLOPs than the full VAE, softer fine detail."""
    return AutoencoderTiny.from_pretrained(model_dir / TAESD_DIR, dtype=dtype).to(device).eval()


def optimize_for_cuda(modules: Iterable[torch.nn.Module]) -> None:
    """GPU layout and kernels that leave the results unchanged (within fp rounding).

    channels_last suits cuDNN's convolutions (the VAE decoder is ~94 % convolution); fused QKV
    turns three attention projections into one larger matmul. SDPA attention is diffusers'
    default already.
    """
    for module in modules:
        module.to(memory_format=torch.channels_last)
        if hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()
