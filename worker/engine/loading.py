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

import itertools
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from worker.errors import ModelFolderError, StartupError
from worker.spec import CHECKPOINTS, TAESD_DIR, X0_PREDICTION_STEPS, ModelSpec

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
    except torch.OutOfMemoryError:
        raise  # memory, not a wrong file: Engine.load says so
    except RuntimeError as exc:  # missing/unexpected keys or wrong shapes: wrong file
        raise ModelFolderError(f"{path.name} does not fit unet/config.json: {exc}") from None
    return unet.eval().requires_grad_(False)


def scheduler_for(model_dir: Path, steps: int) -> EulerDiscreteScheduler:
    """Euler with trailing timesteps: 4 steps -> [999, 749, 499, 249], as Lightning was trained."""
    config = EulerDiscreteScheduler.load_config(model_dir / "scheduler")
    extra = {"prediction_type": "sample"} if steps in X0_PREDICTION_STEPS else {}
    return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing", **extra)


def has_tiny_decoder(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds TAESDXL (its config and weights)."""
    folder = model_dir / TAESD_DIR
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def load_tiny_decoder(model_dir: Path, device: torch.device,
                      dtype: torch.dtype) -> AutoencoderTiny:
    """TAESDXL: ~18x fewer decode FLOPs than the full VAE, softer fine detail."""
    return AutoencoderTiny.from_pretrained(model_dir / TAESD_DIR, dtype=dtype).to(device).eval()


def optimize_for_cuda(modules: Iterable[torch.nn.Module]) -> None:
    """GPU layout and kernels that leave the results unchanged (within fp rounding).

    channels_last suits cuDNN's convolutions (the VAE decoder is ~94 % convolution); fused QKV
    turns three attention projections into one larger matmul (``fuse_qkv``). SDPA attention is
    diffusers' default already.
    """
    for module in modules:
        module.to(memory_format=torch.channels_last)
        fuse_qkv(module)


# Set on a module whose projections fuse_qkv fused; a second optimize() leaves it alone (the
# separate projections it would fuse again are gone).
FUSED_FOR_GOOD = "_qkv_fused_for_good"


def fuse_qkv(module: torch.nn.Module) -> None:
    """Fuse each attention's Q/K/V projections (K/V in cross-attention) and free the originals.

    diffusers' ``fuse_qkv_projections`` (0.42) concatenates the weights into ``to_qkv`` /
    ``to_kv`` but keeps ``to_q``/``to_k``/``to_v`` for ``unfuse_qkv_projections``: on SDXL's
    UNet that is 0.648 B parameters (1.30 GB in fp16) that ``FusedAttnProcessor2_0`` never reads,
    per checkpoint. Here each attention is fused and its unused projections deleted one at a
    time (so loading never holds both copies of the whole UNet), keeping ``to_q`` in
    cross-attention, which the fused processor still uses. The arithmetic is diffusers' own, so
    the images are the same bit for bit. The worker never unfuses; ``unfuse_qkv_projections``
    now says it cannot rather than switch back to processors whose weights are gone.
    """
    if not hasattr(module, "fuse_qkv_projections") or getattr(module, FUSED_FOR_GOOD, False):
        return
    if any("Added" in type(p).__name__ for p in module.attn_processors.values()):
        return  # added-KV attention: diffusers refuses to fuse it too (not in SDXL)
    for attn in [m for m in module.modules() if isinstance(m, Attention)]:
        attn.fuse_projections(fuse=True)
        unused = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
        for name in unused:
            delattr(attn, name)
    module.set_attn_processor(FusedAttnProcessor2_0())
    module.unfuse_qkv_projections = _cannot_unfuse
    setattr(module, FUSED_FOR_GOOD, True)


def _cannot_unfuse() -> None:
    raise RuntimeError("fused QKV projections cannot be unfused: the separate Q/K/V weights were "
                       "freed after fusing (worker/engine/loading.py fuse_qkv); load the model "
                       "again without optimize() for unfused attention")


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (each tensor counted once)."""
    return sum(t.numel() * t.element_size()
               for t in itertools.chain(module.parameters(), module.buffers()))


def gpu_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of ``device`` if it is a GPU that can tell, else ``None``."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.mem_get_info(device)
    except RuntimeError:
        return None


def weights_bytes(model_dir: Path, spec: ModelSpec, dtype: torch.dtype) -> dict[str, int]:
    """What each of the spec's weight files takes in memory in ``dtype``, by path.

    Element counts come from the ``.safetensors`` headers (8 bytes of length, then JSON), so
    nothing is loaded; a ``.bin`` file (the safety checker's) is counted as fp32, as CompVis
    ships it. Files that are absent or unreadable are left out.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {}
    for f in spec.files():
        path = model_dir / f.path
        try:
            if path.suffix == ".safetensors":
                with path.open("rb") as stream:
                    (length,) = struct.unpack("<Q", stream.read(8))
                    header = json.loads(stream.read(length))
                numel = sum(math.prod(entry["shape"]) for name, entry in header.items()
                            if name != "__metadata__")
            elif path.suffix == ".bin":
                numel = path.stat().st_size // 4
            else:
                continue
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue
        sizes[f.path] = numel * itemsize
    return sizes
