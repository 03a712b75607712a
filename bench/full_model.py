"""Write a FULL-SIZE SDXL-Lightning model folder with random weights, for speed benchmarks.

Timings do not depend on weight values, so this folder stands in for the real one where the real
weights cannot be downloaded. It has exactly the layout of ``worker/spec.py`` and the real SDXL
architecture (``/work/shared/notes/sdxl-architecture.md``):

    UNet 2.567 B parameters, fp16   sdxl_lightning_4step_unet.safetensors   (5.13 GB)
    CLIP-L text model 123 M, fp16   text_encoder/model.fp16.safetensors
    bigG text + projection 695 M    text_encoder_2/model.fp16.safetensors
    VAE 83.7 M, fp32                vae/diffusion_pytorch_model.safetensors (fp32 like the real
                                    fp16-fix file, 335 MB), force_upcast false
    tokenizers                      CLIP BPE with the real vocabulary size 49408 (and 48894
                                    merges, as many as the real one), so the text encoders'
                                    embeddings have their real shape
    TAESDXL 2.4 M, fp32             taesdxl/diffusion_pytorch_model.safetensors (VAE_DECODER=tiny;
                                    diffusers' default AutoencoderTiny is TAESDXL's shape)
    scheduler                       Euler, "leading" as SDXL ships it

Fast and small in RAM: the modules are built on the meta device (no parameter memory) only to
learn the tensor names and shapes, and each ``.safetensors`` file is written by streaming scaled
slices of one 32 MB pool of N(0, 1) fp16 values (std 1/sqrt(fan_in) for weights, 0.02 for
embeddings, ones for norm weights, zeros for biases: activations stay well inside fp16 range).
Each file is written under a ``.part`` name and renamed; a ``.complete`` marker, written last,
makes a finished folder a no-op on the next run. ~1 min and < 1 GB of RAM on 2 cores.

Usage: ``python -m bench.full_model OUT_DIR [--verify]``, from the repository root (--verify:
``pipeline.Engine.load`` it on the CPU in fp16 and check every file's key set against its module).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import struct
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from builder import make_tiny_model
from worker.spec import CHECKPOINTS, TAESD_DIR, TEXT_ENCODER_WEIGHTS, VAE_WEIGHTS, ModelSpec

log = logging.getLogger(__name__)

# What the folder holds: the 4-step checkpoint and TAESDXL (VAE_DECODER=tiny), no safety checker.
SPEC = ModelSpec(steps=(4,), tiny_decoder=True)

VOCAB_SIZE = 49408  # CLIP's BPE vocabulary: 512 byte tokens + 48894 merges + 2 specials
UNET_CONFIG: dict[str, object] = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4,
    out_channels=4, layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn",
    norm_num_groups=32, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True)
VAE_CONFIG: dict[str, object] = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=False)
CLIP_L: dict[str, object] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, hidden_act="quick_gelu",
                                 projection_dim=768)
CLIP_BIGG: dict[str, object] = dict(hidden_size=1280, intermediate_size=5120,
                                    num_hidden_layers=32, num_attention_heads=20,
                                    hidden_act="gelu", projection_dim=1280)
# Published parameter counts (sdxl-architecture.md); the build checks it is within 0.5 % of each.
EXPECTED_PARAMS = {"unet": 2.567e9, "vae": 83.7e6, "text_encoder": 123e6,
                   "text_encoder_2": 695e6, "taesdxl": 2.445e6}  # TAESDXL: 1.22 M decoder
POOL_SIZE = 1 << 24  # 16 M fp16 values
MARKER = ".complete"

Shapes = dict[str, tuple[int, ...]]


def _std(name: str, shape: tuple[int, ...]) -> float | None:
    """Init scale for one tensor; None for a constant (1 for norm weights, 0 for biases)."""
    if len(shape) < 2:
        return None
    if "embedding" in name and len(shape) == 2:  # token/position tables: CLIP's own init std
        return 0.02
    return 1.0 / math.sqrt(math.prod(shape[1:]))


def write_safetensors(path: Path, shapes: Shapes, dtype: torch.dtype, pool: torch.Tensor,
                      seed: int) -> int:
    """Stream a ``.safetensors`` file of random tensors; returns its size in bytes."""
    tag = {torch.float16: "F16", torch.float32: "F32"}[dtype]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": tag, "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    rng = torch.Generator().manual_seed(seed)
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(shapes):
            f.write(_tensor_bytes(name, shapes[name], dtype, pool, rng))
    part.rename(path)
    return 8 + len(blob) + offset


def _tensor_bytes(name: str, shape: tuple[int, ...], dtype: torch.dtype, pool: torch.Tensor,
                  rng: torch.Generator) -> bytes:
    n = math.prod(shape)
    std = _std(name, shape)
    if std is None:
        value = 0.0 if name.endswith("bias") else 1.0
        return torch.full((n,), value, dtype=dtype).numpy().tobytes()
    out = torch.empty(n, dtype=dtype)
    start = int(torch.randint(0, POOL_SIZE, (1,), generator=rng))
    done = 0
    while done < n:  # consecutive pool slices from a random start, wrapping around
        k = min(n - done, POOL_SIZE - start)
        torch.mul(pool[start:start + k], std, out=out[done:done + k])
        done, start = done + k, 0
    return out.numpy().tobytes()


def module_shapes(component: str) -> tuple[Shapes, object]:
    """Names and shapes of a component's state dict, from a module built on the meta device."""
    with init_empty_weights():
        if component == "unet":
            module = UNet2DConditionModel(**UNET_CONFIG)
        elif component == "vae":
            module = AutoencoderKL(**VAE_CONFIG)
        elif component == "taesdxl":
            module = AutoencoderTiny()
        else:
            module = text_encoder_class(component)(text_config(component))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    count = sum(math.prod(s) for s in shapes.values())
    if abs(count / EXPECTED_PARAMS[component] - 1) > 0.005:
        raise RuntimeError(f"{component}: {count:,} parameters, expected about "
                           f"{EXPECTED_PARAMS[component]:,.0f}")
    return shapes, module


def text_encoder_class(component: str) -> type:
    return CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection


def text_config(component: str) -> CLIPTextConfig:
    # Special token ids as the tokenizer below numbers them (49406, 49407), like the real vocab.
    return CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77, layer_norm_eps=1e-5,
                          bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1,
                          pad_token_id=VOCAB_SIZE - 1,
                          **(CLIP_L if component == "text_encoder" else CLIP_BIGG))


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """The tiny model's byte-level BPE tokenizer, grown to CLIP's 49408 tokens.

    Merges of two byte tokens are appended until the vocabulary has its real size, with the two
    special tokens last (ids 49406, 49407) as in CLIP's own vocab.json.
    """
    vocab = make_tiny_model.write_tokenizer(folder, pad_token)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    for token in specials:
        vocab.pop(token)
    merges = (folder / "merges.txt").read_text().splitlines()
    chars = [token for token in vocab if len(token) == 1]
    for a in chars:
        for b in chars:
            if len(vocab) == VOCAB_SIZE - len(specials):
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append(f"{a} {b}")
    for token in specials:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")


def is_complete(out: Path) -> bool:
    return (out / MARKER).is_file() and not SPEC.missing(out)


def build(out: Path, seed: int = 0) -> Path:
    """Write the full-size folder at ``out`` (nothing to do if it is already complete)."""
    if is_complete(out):
        log.info("%s is complete: not rebuilding", out)
        return out
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1, timestep_spacing="leading").save_config(
        str(out / "scheduler"))
    write_tokenizer(out / "tokenizer", "<|endoftext|>")
    write_tokenizer(out / "tokenizer_2", "!")  # SDXL's tokenizer_2 pads with "!"
    pool = torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(seed)).half()
    files = {"text_encoder": out / "text_encoder" / TEXT_ENCODER_WEIGHTS,
             "text_encoder_2": out / "text_encoder_2" / TEXT_ENCODER_WEIGHTS,
             "vae": out / "vae" / VAE_WEIGHTS,
             "taesdxl": out / TAESD_DIR / VAE_WEIGHTS,
             "unet": out / CHECKPOINTS[4]}
    for i, (component, path) in enumerate(files.items()):
        shapes, module = module_shapes(component)
        if component in ("unet", "vae", "taesdxl"):
            module.save_config(str(path.parent if component == "taesdxl" else out / component))
        else:
            (out / component).mkdir(parents=True, exist_ok=True)
            module.config.to_json_file(str(out / component / "config.json"))
        dtype = torch.float32 if component in ("vae", "taesdxl") else torch.float16
        size = write_safetensors(path, shapes, dtype, pool, seed + i)
        log.info("%-14s %6.3f B parameters, %5.2f GB %s", component,
                 sum(math.prod(s) for s in shapes.values()) / 1e9, size / 1e9,
                 path.relative_to(out))
    (out / MARKER).write_text(json.dumps({"seed": seed}))
    log.info("full-size model written to %s in %.1f s", out, time.perf_counter() - started)
    return out


def verify(out: Path) -> None:
    """Load the folder with the worker's own loader (CPU, fp16) and compare every key set."""
    from safetensors import safe_open

    import pipeline

    started = time.perf_counter()
    engine = pipeline.Engine.load(SPEC, out, torch.device("cpu"), torch.float16)
    pipe = engine.pipes[4]
    for component, path in (("unet", out / CHECKPOINTS[4]),
                            ("vae", out / "vae" / VAE_WEIGHTS),
                            ("taesdxl", out / TAESD_DIR / VAE_WEIGHTS),
                            ("text_encoder", out / "text_encoder" / "model.fp16.safetensors"),
                            ("text_encoder_2", out / "text_encoder_2" / "model.fp16.safetensors")):
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
        module = engine.taesd if component == "taesdxl" else getattr(pipe, component)
        if keys != set(module.state_dict()):
            raise RuntimeError(f"{component}: the file's keys differ from the module's")
        log.info("verified %-14s %4d tensors, %s", component, len(keys),
                 next(module.parameters()).dtype)
    if len(pipe.tokenizer) != VOCAB_SIZE or len(pipe.tokenizer_2) != VOCAB_SIZE:
        raise RuntimeError("a tokenizer does not have 49408 tokens")
    log.info("pipeline.Engine.load(cpu, fp16) took %.1f s", time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--verify", action="store_true",
                        help="load it with pipeline.Engine.load")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(args.out_dir)
    if args.verify:
        verify(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
