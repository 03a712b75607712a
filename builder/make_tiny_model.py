"""Write a tiny, randomly initialised SDXL-shaped model folder for a ``ModelSpec``, offline.

The folder has exactly the layout of the real one (``worker/spec.py``), so the worker loads it
through the very code that loads ByteDance's weights; only the sizes differ. Its scheduler
config is SDXL base's own, every field, so every scheduler runs as on the real model. Tests and
machines without model-hub access use it. Same arguments, same bytes: every tensor comes from a
fixed seed. Takes about a second.

With ``--base-model NAME`` (a spec with BASE_MODEL) it also writes a tiny "fine-tune" as a
diffusers folder and as one original-layout file, and tiny Lightning LoRAs for it
(``builder/tiny_finetune.py``); its second text encoder is then wider than the first, as in SDXL.

Usage: ``python -m builder.make_tiny_model OUT_DIR [--steps 4 [2 ...]] [--safety-checker]
[--tiny-decoder] [--base-model tiny-finetune [--lightning-mode lora]]`` (``python
builder/make_tiny_model.py OUT_DIR ...`` works too).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: the repository root is not on sys.path then
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import runtime

runtime.configure_libraries()  # before transformers reads its environment

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from builder import add_spec_arguments, spec_from_args
from worker.spec import (
    CHECKPOINTS,
    SAFETY_WEIGHTS,
    TAESD_DIR,
    TEXT_ENCODER_WEIGHTS,
    VAE_WEIGHTS,
    ModelSpec,
)

log = logging.getLogger(__name__)

# Dimensions that must agree (diffusers' own SDXL test components): cross_attention_dim =
# hidden(te1) + hidden(te2) = 32 + 32; projection_class_embeddings_input_dim =
# 6 * addition_time_embed_dim + projection_dim(te2) = 6*8 + 32 = 80 (te2 48 wide with BASE_MODEL:
# 80 and 96); 77 = CLIP's context length.
TEXT_HIDDEN = 32
CLIP_CONTEXT = 77
OWN_MODEL_TEXT_2 = 48  # the second encoder's width in a BASE_MODEL tiny folder (see build)
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>"]  # only merges of existing tokens
# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 at the pinned
# revision (worker.spec.BASE_REVISION), every field: the other schedulers are built from it
# (DDIM reads clip_sample and set_alpha_to_one, PNDM skip_prk_steps). "leading" spacing is SDXL's;
# the worker must override it to "trailing" itself.
SDXL_BASE_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte-to-character table: the base alphabet of the BPE vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


def write_tokenizer(folder: Path, pad_token: str) -> dict[str, int]:
    """A byte-level CLIP BPE tokenizer in the four files sdxl-base ships; returns its vocab."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for m in MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": pad_token}
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=CLIP_CONTEXT,
                  do_lower_case=True, errors="replace", add_prefix_space=False)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def _save_fp16(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save weights in fp16, as the real repositories store them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def _unet(seed: int, channels: tuple[int, int],
          text_2: int = TEXT_HIDDEN) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=2, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + text_2,
        cross_attention_dim=TEXT_HIDDEN + text_2, norm_num_groups=1 if channels[0] < 32 else 32)


def _text_encoders(out: Path, vocab: dict[str, int], text_2: int = TEXT_HIDDEN) -> None:
    common = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                  pad_token_id=vocab["<|endoftext|>"], hidden_size=TEXT_HIDDEN,
                  intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
                  num_hidden_layers=5, vocab_size=len(vocab), hidden_act="gelu",
                  projection_dim=TEXT_HIDDEN, max_position_embeddings=CLIP_CONTEXT)
    for seed, sub, cls in ((0, "text_encoder", CLIPTextModel),
                           (1, "text_encoder_2", CLIPTextModelWithProjection)):
        torch.manual_seed(seed)
        width = {} if sub == "text_encoder" else dict(hidden_size=text_2, projection_dim=text_2)
        model = cls(CLIPTextConfig(**common | width))
        (out / sub).mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(str(out / sub / "config.json"))
        _save_fp16(model.state_dict(), out / sub / TEXT_ENCODER_WEIGHTS)


def _vae(out: Path) -> None:
    torch.manual_seed(0)
    # 4 blocks -> vae_scale_factor 8, as in SDXL; force_upcast False, as in the fp16-fix VAE.
    vae = AutoencoderKL(block_out_channels=[8, 8, 16, 16], in_channels=3, out_channels=3,
                        latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1,
                        norm_num_groups=8, sample_size=128, scaling_factor=0.13025,
                        force_upcast=False)
    vae.save_config(str(out / "vae"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(out / "vae" / VAE_WEIGHTS), metadata={"format": "pt"})


def _safety_checker(out: Path) -> None:
    """A tiny CLIP safety checker and preprocessor, in the layout of CompVis's repository."""
    torch.manual_seed(2)
    tower = dict(hidden_size=TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
                 num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(tower, vocab_size=520, bos_token_id=518,
                                         eos_token_id=519, max_position_embeddings=CLIP_CONTEXT),
                        vision_config=dict(tower, image_size=32, patch_size=8),
                        projection_dim=TEXT_HIDDEN)
    checker = StableDiffusionSafetyChecker(config)
    (out / "safety_checker").mkdir(parents=True, exist_ok=True)
    checker.config.to_json_file(str(out / "safety_checker" / "config.json"))
    torch.save(checker.state_dict(), out / "safety_checker" / SAFETY_WEIGHTS)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(str(out / "feature_extractor"))


def _tiny_decoder(out: Path) -> None:
    """A miniature TAESDXL-shaped decoder (same latent and image channels, 8x upsampling)."""
    torch.manual_seed(3)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                            decoder_block_out_channels=(8, 8, 8, 8),
                            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                            latent_channels=4)
    taesd.save_config(str(out / TAESD_DIR))
    save_file({k: v.contiguous() for k, v in taesd.state_dict().items()},
              str(out / TAESD_DIR / VAE_WEIGHTS), metadata={"format": "pt"})


def build(out: Path, spec: ModelSpec,
          unet_channels: tuple[int, int] = (2, 4)) -> Path:
    """Write the tiny model folder for ``spec`` at ``out`` and return it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SDXL_BASE_SCHEDULER_CONFIG, indent=2) + "\n")
    vocab = write_tokenizer(out / "tokenizer", "<|endoftext|>")
    write_tokenizer(out / "tokenizer_2", "!")  # sdxl-base's tokenizer_2 pads with "!"
    # With BASE_MODEL the second text encoder is wider than the first, as in SDXL (768 and
    # 1280): diffusers' single-file loader tells SDXL's two encoders apart by their widths.
    text_2 = OWN_MODEL_TEXT_2 if spec.own_model else TEXT_HIDDEN
    _text_encoders(out, vocab, text_2)
    _vae(out)
    _unet(0, unet_channels, text_2).save_config(str(out / "unet"))
    # A different random UNet per checkpoint, so tests can tell them apart (the Lightning UNet
    # mode only: a LoRA or a merge has no such file).
    for s in spec.steps if spec.lightning_mode == "unet" else ():
        _save_fp16(_unet(1000 + s, unet_channels, text_2).state_dict(), out / CHECKPOINTS[s])
    if spec.safety_checker:
        _safety_checker(out)
    if spec.tiny_decoder:
        _tiny_decoder(out)
    if spec.own_model:  # BASE_MODEL: a tiny fine-tune (folder and single file) and its LoRAs
        from builder import tiny_finetune  # peft: only for this

        tiny_finetune.write(out)
    missing = spec.missing(out)
    if missing:
        raise RuntimeError(f"tiny model is missing {missing}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    add_spec_arguments(parser)
    parser.add_argument("--unet-channels", type=int, nargs=2, default=[2, 4],
                        help="UNet block widths (32 64 gives a 2M-parameter UNet)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(args.out_dir, spec_from_args(args), tuple(args.unet_channels))
    log.info("tiny model written to %s", args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
