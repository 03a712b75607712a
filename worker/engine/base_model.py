"""Your own SDXL model (``BASE_MODEL``) at Lightning speed: check it, load it, make it fast.

``BASE_MODEL`` is an SDXL diffusers folder or a single ``.safetensors`` file in the original
(A1111/Civitai/ComfyUI) layout, a path relative to the model folder or absolute. Before any
weight is read, ``check`` looks at its configs or the file's header and refuses what is not
SDXL (SD 1.x, SD 2.x, SD3, Flux, the refiner, inpainting, a VAE or UNet alone, a LoRA) with one
``StartupError`` naming what was found. ``load_pipes`` then loads it with diffusers
(``from_pretrained``, or ``from_single_file`` with ``config=`` the model folder's pinned SDXL
base configs, offline) and applies ``LIGHTNING_MODE``:

- ``unet``: ByteDance's Lightning UNet of each step count replaces the model's UNet;
- ``lora``: the Lightning LoRA of each step count is fused into a copy of the model's UNet with
  diffusers' ``load_lora_weights`` + ``fuse_lora`` + ``unload_lora_weights``, so no PEFT layer
  is left (no per-call LoRA cost, and ``optimize()``'s fused QKV, which runs after this and
  deletes the unfused projections, bakes the fused weights in). One UNet per step count, the
  last one fused into the model's own UNet: memory is never more than one UNet per step count;
- ``none``: the model is a Lightning merge; one pipeline serves every step count in its range.

``identity`` is what ``parameters.model`` reports: the name and revision the builder recorded
beside the model when it baked it (``<model>.source.json``), else the file's sha256 (hashed at
start), else the folder's name.
"""

from __future__ import annotations

import copy
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from worker.engine import loading
from worker.errors import StartupError
from worker.spec import ModelSpec, sha256_of

log = logging.getLogger(__name__)

# Written by ``builder.download_weights --bake`` beside a baked model: where it came from.
SOURCE_SUFFIX = ".source.json"
ADAPTER = "lightning"  # the LoRA's adapter name while it is being fused (no "." allowed)
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
# What other model families' folders are called (model_index.json's _class_name), for the error.
FAMILIES = {"StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
            "StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxPipeline": "Flux",
            "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model",
            "StableCascadeCombinedPipeline": "Stable Cascade", "PixArtSigmaPipeline": "PixArt"}
WHAT_WORKS = ("this worker serves SDXL 1.0-architecture models (fine-tunes, merges) as a "
              "diffusers folder or one .safetensors file")


def model_path(spec: ModelSpec, folder: Path) -> Path:
    """Where BASE_MODEL is (``ModelSpec.model_path``)."""
    path = spec.model_path(folder)
    if path is None:
        raise ValueError("the spec has no BASE_MODEL")
    return path


def _refuse(spec: ModelSpec, what: str, evidence: str) -> StartupError:
    return StartupError(f"BASE_MODEL={spec.base_model} is {what} ({evidence}), not an SDXL "
                        f"model: {WHAT_WORKS}")


def check(spec: ModelSpec, folder: Path) -> str:
    """``"folder"`` or ``"file"``: how BASE_MODEL is laid out; a ``StartupError`` naming what
    was found when it is not an SDXL model this worker can load. Reads configs and headers
    only."""
    path = model_path(spec, folder)
    if not path.exists():
        raise StartupError(f"BASE_MODEL={spec.base_model}: {path} does not exist (give an SDXL "
                           f"diffusers folder or .safetensors file, absolute or relative to "
                           f"the model folder {folder})")
    base_unet = json.loads((folder / "unet" / "config.json").read_text())
    if path.is_dir():
        _check_folder(spec, path, base_unet)
        return "folder"
    if path.suffix != ".safetensors":
        raise StartupError(f"BASE_MODEL={spec.base_model} is a {path.suffix or 'suffix-less'} "
                           f"file: only .safetensors single files are loaded (a pickled .ckpt "
                           f"can run code when read); convert it to .safetensors first")
    _check_file(spec, path, base_unet)
    return "file"


def _check_folder(spec: ModelSpec, path: Path, base_unet: dict[str, Any]) -> None:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        config = path / "config.json"
        kind = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        if kind:
            raise _refuse(spec, f"a {kind} alone", "config.json, no model_index.json")
        if any("lora" in p.name.lower() for p in path.glob("*.safetensors")):
            raise _refuse(spec, "a LoRA", "a LoRA weights file, no model_index.json")
        raise _refuse(spec, "not a diffusers pipeline folder", "no model_index.json")
    index = json.loads(index_file.read_text())
    kind = index.get("_class_name", "?")
    if kind not in SDXL_PIPELINES:
        raise _refuse(spec, FAMILIES.get(kind, f"a {kind} model"), f"model_index.json: {kind}")
    if not index.get("text_encoder") or index["text_encoder"][0] is None:
        raise _refuse(spec, "the SDXL refiner", "model_index.json has no text_encoder")
    unet_config = path / "unet" / "config.json"
    if not unet_config.is_file():
        raise _refuse(spec, "an SDXL folder without a UNet", "no unet/config.json")
    _same_unet(spec, json.loads(unet_config.read_text()), base_unet, "unet/config.json")


def _same_unet(spec: ModelSpec, unet: dict[str, Any], base: dict[str, Any], where: str) -> None:
    """The UNet must have SDXL's interface: text width, conditioning and latent channels."""
    for key in ("cross_attention_dim", "addition_embed_type", "in_channels"):
        if unet.get(key) != base.get(key):
            what = ("an SDXL inpainting model" if key == "in_channels" and unet.get(key) == 9
                    else "not SDXL-shaped")
            raise _refuse(spec, what, f"{where}: {key} {unet.get(key)!r}, SDXL has "
                                      f"{base.get(key)!r}")


def _header(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise StartupError(f"BASE_MODEL={path} is not a readable .safetensors file: "
                           f"{type(exc).__name__}: {exc}") from None
    header.pop("__metadata__", None)
    return header


def _check_file(spec: ModelSpec, path: Path, base_unet: dict[str, Any]) -> None:
    header = _header(path)
    keys = list(header)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    unet_prefix = "model.diffusion_model."
    if not has(unet_prefix):
        if has("lora"):
            raise _refuse(spec, "a LoRA", "its tensors are LoRA weights (lora_*)")
        if has("double_blocks.") or has("single_blocks."):
            raise _refuse(spec, "Flux", "double_blocks / single_blocks tensors")
        if has("joint_blocks."):
            raise _refuse(spec, "Stable Diffusion 3", "joint_blocks tensors")
        if all(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv",
                             "first_stage_model.")) for k in keys):
            raise _refuse(spec, "a VAE alone", "encoder/decoder tensors only")
        if has("down_blocks.") and has("conv_in."):
            raise _refuse(spec, "a UNet alone", "diffusers UNet tensors, no text encoders/VAE")
        raise _refuse(spec, "not a Stable Diffusion checkpoint", "no model.diffusion_model.*")
    if has("joint_blocks."):
        raise _refuse(spec, "Stable Diffusion 3", "joint_blocks tensors")
    if has("double_blocks."):
        raise _refuse(spec, "Flux", "double_blocks tensors")
    if has("cond_stage_model.transformer."):
        raise _refuse(spec, "Stable Diffusion 1.x", "one CLIP-L text encoder, cond_stage_model")
    if has("cond_stage_model.model."):
        raise _refuse(spec, "Stable Diffusion 2.x", "one OpenCLIP text encoder, cond_stage_model")
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise _refuse(spec, "the SDXL refiner", "one OpenCLIP text encoder, no CLIP-L")
    needed = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
              "first_stage_model.", f"{unet_prefix}label_emb.")
    if absent := [n for n in needed if not has(n)]:
        raise _refuse(spec, "not a complete SDXL checkpoint", f"no {', '.join(absent)} tensors")
    conv_in = header.get(f"{unet_prefix}input_blocks.0.0.weight", {}).get("shape", [0, 0])
    cross = next((e["shape"][1] for k, e in header.items()
                  if k.startswith(unet_prefix) and k.endswith("attn2.to_k.weight")), None)
    _same_unet(spec, {"cross_attention_dim": cross, "in_channels": conv_in[1],
                      "addition_embed_type": "text_time"}, base_unet, path.name)


def identity(spec: ModelSpec, folder: Path) -> str:
    """What ``parameters.model`` says ran: ``repo@revision`` or ``name sha256:...``."""
    path = model_path(spec, folder)
    source = path.with_name(path.name + SOURCE_SUFFIX)
    if source.is_file():
        recorded = json.loads(source.read_text())
        if recorded.get("revision"):
            return f"{recorded['name']}@{recorded['revision']}"
        if recorded.get("sha256"):
            return f"{recorded['name']} sha256:{recorded['sha256']}"
    if path.is_file():
        started = time.perf_counter()
        digest = sha256_of(path)
        log.info("BASE_MODEL %s: sha256 %s (hashed in %.1f s; a baked model records it at "
                 "build time)", path.name, digest, time.perf_counter() - started)
        return f"{path.name} sha256:{digest}"
    return f"{path.name} (folder, no revision recorded)"



def checkpoint_label(spec: ModelSpec, steps: int) -> str | None:
    """``parameters.checkpoint``: the Lightning file that made ``steps`` fast (None: a merge)."""
    name = spec.lightning_file(steps)
    if name and spec.lightning_mode == "lora" and spec.lora_scale != 1.0:
        return f"{name} (scale {spec.lora_scale:g})"
    return name


def load_model(spec: ModelSpec, folder: Path, layout: str, device: torch.device,
               dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """BASE_MODEL as one pipeline on ``device``, from local files only."""
    path = model_path(spec, folder)
    common: dict[str, Any] = dict(dtype=dtype, local_files_only=True, add_watermarker=False)
    if layout == "file":
        # config=: the model folder is a local SDXL base config folder (model_index.json and
        # each component's config, tokenizers), so nothing is fetched and nothing guessed.
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder),
                                                          **common)
    else:
        fp16 = any(".fp16" in p.name for p in (path / "unet").glob("*.safetensors"))
        pipe = StableDiffusionXLPipeline.from_pretrained(
            path, variant="fp16" if fp16 else None, use_safetensors=True, **common)
    return pipe.to(device)


def fuse_lightning_lora(pipe: StableDiffusionXLPipeline, lora: Path, scale: float) -> None:
    """Fuse the Lightning LoRA at ``lora`` into ``pipe``'s UNet and remove every PEFT layer."""
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=ADAPTER,
                           use_safetensors=True)
    # A LoRA whose keys match nothing loads silently (diffusers only warns): refuse instead.
    if ADAPTER not in pipe.get_list_adapters().get("unet", []):
        pipe.unload_lora_weights()
        raise StartupError(f"{lora.name} did not apply to BASE_MODEL's UNet (no matching "
                           f"layers): is the model SDXL?")
    pipe.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()  # the deltas are in the weights now; drop the wrappers


def load_pipes(spec: ModelSpec, folder: Path, device: torch.device,
               dtype: torch.dtype) -> dict[int, StableDiffusionXLPipeline]:
    """One pipeline per served step count, all sharing the model's text encoders and VAE."""
    layout = check(spec, folder)
    model = load_model(spec, folder, layout, device, dtype)
    shared = {name: getattr(model, name) for name in
              ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")}
    config = EulerDiscreteScheduler.load_config(folder / "scheduler")
    if spec.lightning_mode == "none":
        # A merge: trailing timesteps like every Lightning model; x0-prediction is ByteDance's
        # 1-step UNet only, never a merge's.
        pipe = _pipe(shared, model.unet, EulerDiscreteScheduler.from_config(
            config, timestep_spacing="trailing"))
        return dict.fromkeys(spec.steps, pipe)
    pipes = {}
    own_unet = model.unet
    for i, steps in enumerate(spec.steps):
        if spec.lightning_mode == "unet":
            unet = loading.load_unet(folder, steps, device, dtype)
        else:  # lora: a copy per step count, the last one the model's own UNet
            unet = own_unet if i == len(spec.steps) - 1 else copy.deepcopy(own_unet)
        pipe = _pipe(shared, unet, loading.scheduler_for(folder, steps))
        if spec.lightning_mode == "lora":
            fuse_lightning_lora(pipe, folder / spec.lightning_file(steps), spec.lora_scale)
        pipes[steps] = pipe
    del model, own_unet  # unet mode: the model's own UNet is not served; free it
    return pipes


def _pipe(shared: dict[str, Any], unet: torch.nn.Module,
          scheduler: EulerDiscreteScheduler) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(**shared, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
