"""A tiny SDXL "fine-tune" and tiny Lightning LoRAs for it, for the BASE_MODEL tests, offline.

Beside the tiny model (``builder.make_tiny_model``), which is the SDXL base config folder here:

    model_index.json                        SDXL base's pipeline index (the single-file config)
    tiny-finetune/                          the fine-tune as a diffusers folder (fp16)
    tiny-finetune.safetensors               the same weights in the original (LDM/A1111) layout
    sdxl_lightning_{2,4,8}step_lora.safetensors   random LoRAs for the fine-tune's UNet

The fine-tune has the tiny base's architecture and different random weights (its own seeds).
The single file is written by ``to_original_layout``, the inverse of diffusers' single-file
conversion, and checked against it: diffusers' own converter must give back every tensor, so
the file goes through exactly the code a Civitai download does. Same arguments, same bytes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from worker.spec import LORAS

log = logging.getLogger(__name__)

FINETUNE_DIR = "tiny-finetune"
FINETUNE_FILE = "tiny-finetune.safetensors"
# stabilityai/stable-diffusion-xl-base-1.0's model_index.json at the pinned revision (the
# fields from_single_file reads): which class each component is.
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# Where LoRAs reach in SDXL's transformer blocks (a distillation LoRA touches all of them).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]
LORA_RANK = 4
# lora_B is multiplied by this: the diffusers LoRA format has no alpha, and at PEFT's initial
# scale the tiny model's images barely move (mean 0.76 of 255), too little to tell apart.
LORA_GAIN = 8.0
SEED = 7000  # the fine-tune's weights: unlike any seed the tiny base uses


def finetune_pipeline(base: Path) -> StableDiffusionXLPipeline:
    """The tiny base's architecture (its configs and tokenizers) with fresh random weights."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    encoders = [cls(CLIPTextConfig.from_pretrained(base / sub)) for cls, sub in (
        (CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae"))
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(base / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_pretrained(base / "scheduler"),
        add_watermarker=False)


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection"))


def _unet_key(key: str, config: dict) -> str:
    """A diffusers UNet key in the original layout (model.diffusion_model.*)."""
    per = config["layers_per_block"] + 1
    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
           **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in top:
        return top[key]

    def resnet(rest: str) -> str:
        for new, old in _RESNET:
            rest = rest.replace(new, old, 1) if rest.startswith(new) else rest
        return rest

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per + layer
        return (f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}")
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        return (f"middle_block.{2 * layer}.{resnet(rest)}" if kind == "resnets"
                else f"middle_block.1.{rest}")
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per + layer
        return (f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}")
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{block * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ValueError(f"no original-layout name for UNet key {key}")


def _vae_key(key: str, blocks: int) -> str:
    """A diffusers VAE key in the original layout (first_stage_model.*)."""
    for new, old in (("conv_norm_out", "norm_out"), ("conv_shortcut", "nin_shortcut")):
        key = key.replace(new, old)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.",
                 key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    for new, old in ((".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."),
                     (".to_v.", ".v."), (".to_out.0.", ".proj_out.")):
        key = key.replace(f"mid_block.attentions.0{new}", f"mid.attn_1{old}")
    return key


def _open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection's tensors in OpenCLIP's layout (SDXL's second encoder)."""
    out: dict[str, torch.Tensor] = {}
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items():
        if diffusers_key in state:
            tensor = state[diffusers_key]
            out[ldm_key] = tensor.T.contiguous() if ldm_key == "text_projection" else tensor
    for key, tensor in state.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
        if not m:
            continue
        i, rest = m[1], m[2]
        if re.match(r"self_attn\.[qkv]_proj\.", rest):
            if rest.startswith("self_attn.q_proj."):  # q, k, v stacked as in_proj
                kind = rest.rsplit(".", 1)[1]
                out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                    [state[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"]
                     for p in "qkv"])
            continue
        rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
                .replace("self_attn.", "attn."))
        out[f"transformer.resblocks.{i}.{rest}"] = tensor
    return out


def to_original_layout(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights as one SDXL checkpoint in the original (A1111/Civitai) layout,
    checked: diffusers' own converter must turn the UNet and VAE back into every tensor."""
    config = dict(pipe.unet.config)
    unet = {f"model.diffusion_model.{_unet_key(k, config)}": v
            for k, v in pipe.unet.state_dict().items()}
    blocks = len(pipe.vae.config.block_out_channels)
    vae = {}
    for key, tensor in pipe.vae.state_dict().items():
        # the original VAE's mid-block attention is 1x1 convolutions
        attention = "mid_block.attentions.0.to_" in key and key.endswith("weight")
        vae[f"first_stage_model.{_vae_key(key, blocks)}"] = (
            tensor[:, :, None, None] if attention else tensor)
    clip_l = {f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v
              for k, v in pipe.text_encoder.state_dict().items()}
    clip_g = {f"conditioner.embedders.1.model.{k}": v
              for k, v in _open_clip(pipe.text_encoder_2.state_dict()).items()}
    checkpoint = unet | vae | clip_l | clip_g
    for got, want in ((convert_ldm_unet_checkpoint(checkpoint, config), pipe.unet.state_dict()),
                      (convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config)),
                       pipe.vae.state_dict())):
        if set(got) != set(want) or any(not torch.equal(got[k], want[k]) for k in want):
            raise RuntimeError(f"original-layout export does not round-trip: "
                               f"{sorted(set(got) ^ set(want))[:5]}")
    return checkpoint


def lightning_lora(unet: UNet2DConditionModel, steps: int) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet`` (one seed per step count), in diffusers' LoRA format."""
    torch.manual_seed(8000 + steps)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS,
                                init_lora_weights=False), adapter_name="tiny")
    state = get_peft_model_state_dict(unet, adapter_name="tiny")
    unet.delete_adapters("tiny")
    return {f"unet.{k}": (v * (LORA_GAIN if "lora_B" in k else 1.0)).detach().to(torch.float16)
            .contiguous() for k, v in state.items()}


def write(out: Path) -> None:
    """Write the fine-tune, its single file, model_index.json and the LoRAs into ``out``."""
    (out / "model_index.json").write_text(json.dumps(SDXL_MODEL_INDEX, indent=2) + "\n")
    pipe = finetune_pipeline(out).to(torch.float16)
    pipe.save_pretrained(out / FINETUNE_DIR, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in to_original_layout(pipe).items()},
              str(out / FINETUNE_FILE), metadata={"format": "pt"})
    for steps, name in LORAS.items():
        save_file(lightning_lora(pipe.unet, steps), str(out / name), metadata={"format": "pt"})
