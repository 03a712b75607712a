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


# ---- tiny adapters for the tiny model (tests, benchmark) ------------------------------------
# Linear layers a LoRA adapts, as trainers (kohya's sd-scripts, diffusers' train_dreambooth_lora)
# target them: every attention projection and the feed-forward, in the UNet and both encoders.
LORA_UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
LORA_TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _lora_layers(model_dir: Path, text_encoders: bool) -> list[tuple[str, str, int, int]]:
    """(component, module path, in, out) of every layer a LoRA for this model adapts."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            model_dir / "unet"))
    layers = [("unet", name, module.in_features, module.out_features)
              for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)
              and name.endswith(LORA_UNET_LAYERS) and ".transformer_blocks." in name]
    if text_encoders:
        for component in ("text_encoder", "text_encoder_2"):
            config = CLIPTextConfig.from_pretrained(model_dir / component)
            for layer in range(config.num_hidden_layers):
                layers += [(component, f"text_model.encoder.layers.{layer}.self_attn.{name}",
                            config.hidden_size, config.hidden_size) for name in LORA_TEXT_LAYERS]
    return layers


def lora_factors(model_dir: Path, seed: int, rank: int = 2, text_encoders: bool = False,
                 only: str | tuple[str, ...] = "",
                 ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) factors per layer, seeded; ``only`` keeps layers whose path ends so."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for component, path, width_in, width_out in _lora_layers(model_dir, text_encoders):
        if only and not path.endswith(only):
            continue
        down = torch.randn(rank, width_in, generator=generator) / width_in ** 0.5
        # x4: the tiny model's images are mostly its VAE's noise; a LoRA must show through it
        up = 4 * torch.randn(width_out, rank, generator=generator)
        factors[(component, path)] = (down, up)
    return factors


def write_diffusers_lora(path: Path, model_dir: Path, seed: int = 0, rank: int = 2,
                         text_encoders: bool = False, only: str | tuple[str, ...] = "") -> Path:
    """A LoRA in diffusers/PEFT layout (``unet.<path>.lora_A.weight``), what diffusers'
    ``save_lora_weights`` writes; no alpha (= rank: scale 1)."""
    state = {}
    for (component, module), (down, up) in lora_factors(model_dir, seed, rank, text_encoders,
                                                        only).items():
        state[f"{component}.{module}.lora_A.weight"] = down
        state[f"{component}.{module}.lora_B.weight"] = up
    return _save_adapter(state, path)


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def sgm_name(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path in the original (SGM) SDXL repository's block names, which
    kohya's sd-scripts write for SDXL: ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1``
    (a down block holds ``layers_per_block`` layers plus its downsampler)."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        inner = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(parts[1:3])]
        return ".".join(["middle_block", inner, *parts[3:]])
    block, kind, layer = int(parts[1]), parts[2], int(parts[3])
    inner = "0" if kind == "resnets" else "1"
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str(1 + block * (layers_per_block + 1) + layer), inner,
                         *parts[4:]])
    return ".".join(["output_blocks", str(block * (layers_per_block + 1) + layer), inner,
                     *parts[4:]])


def write_kohya_lora(path: Path, model_dir: Path, seed: int = 0, rank: int = 2,
                     text_encoders: bool = False, alpha: float | None = None,
                     only: str | tuple[str, ...] = "", sgm: bool = False) -> Path:
    """The same factors in kohya/A1111 layout (``lora_unet_<path with _>.lora_down.weight``,
    ``.alpha``), as most Civitai files are; ``alpha`` None writes alpha = rank (scale 1);
    ``sgm``: UNet blocks under SGM names (``input_blocks_4_1_...``), as sd-scripts writes SDXL."""
    state = {}
    layers = UNet2DConditionModel.load_config(model_dir / "unet")["layers_per_block"]
    for (component, module), (down, up) in lora_factors(model_dir, seed, rank, text_encoders,
                                                        only).items():
        if sgm and component == "unet":
            module = sgm_name(module, layers)
        key = KOHYA_PREFIX[component] + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    return _save_adapter(state, path)


def write_locon_lora(path: Path, model_dir: Path, seed: int = 0, rank: int = 2) -> Path:
    """A kohya LoCon file: LoRA factors on the resnets' 3x3 convolutions (down: rank x in x 3
    x 3, up: out x rank x 1 x 1), as sd-scripts' ``conv_dim`` writes them."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
            model_dir / "unet"))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d) and ".resnets." in name and \
                name.endswith(("conv1", "conv2")):
            fan_in = module.in_channels * 9
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(
                rank, module.in_channels, 3, 3, generator=generator) / fan_in ** 0.5
            state[f"{key}.lora_up.weight"] = 2 * torch.randn(module.out_channels, rank, 1, 1,
                                                             generator=generator)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return _save_adapter(state, path)


def write_foreign_lora(path: Path, kind: str) -> Path:
    """Files that are not an SDXL LoRA, for the error tests: ``sd15`` (cross-attention fed
    768-wide text features), ``flux`` (transformer keys), ``loha`` (LyCORIS), ``nolora``."""
    generator = torch.Generator().manual_seed(7)
    if kind == "sd15":
        key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        state = {f"{key}.lora_down.weight": torch.randn(2, 768, generator=generator),
                 f"{key}.lora_up.weight": torch.randn(4, 2, generator=generator),
                 f"{key}.alpha": torch.tensor(2.0)}
    elif kind == "flux":
        state = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight":
                 torch.randn(2, 8, generator=generator),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight":
                 torch.randn(8, 2, generator=generator)}
    elif kind == "loha":
        key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        state = {f"{key}.hada_w1_a": torch.randn(4, 2, generator=generator),
                 f"{key}.hada_w1_b": torch.randn(2, 4, generator=generator)}
    elif kind == "nolora":
        state = {"conv.weight": torch.randn(4, 4, generator=generator)}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return _save_adapter(state, path)


def write_sdxl_embedding(path: Path, vectors: int = 2, seed: int = 0,
                         widths: tuple[int, int] = (TEXT_HIDDEN, TEXT_HIDDEN)) -> Path:
    """An SDXL textual-inversion file (``clip_l``, ``clip_g``: ``vectors`` rows each), as the
    SDXL trainers write it; ``widths`` (768,) style SD 1.x files come from ``write_sd15_...``."""
    generator = torch.Generator().manual_seed(seed)
    # x3: a token's vector must stand out of the tiny encoders' random ones to show in images
    return _save_adapter({"clip_l": 3 * torch.randn(vectors, widths[0], generator=generator),
                          "clip_g": 3 * torch.randn(vectors, widths[1], generator=generator)},
                         path)


def write_sd15_embedding(path: Path) -> Path:
    """An SD 1.x embedding (A1111's ``emb_params``, 768-wide): not for SDXL."""
    return _save_adapter({"emb_params": torch.randn(2, 768, generator=torch.Generator()
                                                    .manual_seed(5))}, path)


def _save_adapter(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


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
