"""LoRAs on the shared pipeline: read, check, merge into the weights for one batch, restore.

Why merging and not PEFT's wrapper layers: the CUDA path fuses each self-attention's Q/K/V into
one ``to_qkv`` projection (cross-attention K/V into ``to_kv``) and deletes the separate
``to_q``/``to_k``/``to_v`` (``loading.fuse_qkv``), so wrappers on those layers would be bypassed
or have nothing to wrap (/work/shared/notes/adapters.md section 4). Here a LoRA is a list of
low-rank factors per target weight; ``merged`` adds ``scale * alpha / rank * up @ down`` into
the weight in place (into the right row slice of ``to_qkv``/``to_kv`` when fused) for one batch
and copies the original rows back afterwards, in a ``finally``: bit for bit what was there, so
no job's adapters survive it. In place on the same storage, so a ``torch.compile``d UNet (which
reads its parameters as graph inputs) sees the merged weights without recompiling, and the
fused and unfused layouts give the same image within fp rounding.

Files: safetensors only (never pickle), diffusers/PEFT or kohya/A1111 keys (converted by
diffusers' own ``lora_state_dict``). A file that is no LoRA, a LyCORIS/DoRA variant, a LoRA
for another architecture or keys that match no layer is an ``InputError`` naming the file and
what was found. Loaded LoRAs (the factors, on the device) are kept in a small LRU (``LoraBank``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file

from worker.adapters.cache import Lru
from worker.engine.loading import FUSED_FOR_GOOD
from worker.errors import InputError, JobError, shown
from worker.plan import EmbeddingUse, LoraUse

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Loaded LoRAs kept on the device. A rank-32 SDXL LoRA's factors are ~93 MB in fp16 (notes,
# section 2); 8 of them is under 1 GB next to a 5 GB UNet, and livepeer keeps 12 resident.
MEMORY_SLOTS = 8
MEMORY_BYTES = 4e9  # the LoRA bank's GPU memory: ~4 GB beside a 24 GB card's 7 GB of weights
# Key endings of the LoRA formats diffusers' loader emits or reads, and which factor each is.
_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"),
          (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
          (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
          (".lora_down.weight", "down"), (".lora_up.weight", "up"))
_UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "dora_scale": "DoRA",
                "oft_": "OFT", ".diff": "full-weight difference"}
# diffusers' old attention-processor names -> the layers they adapt, per component.
_PROCESSOR = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                       "to_out": "out_proj"}}
# Cross-attention input width (attn2.to_k) of the architectures LoRAs are usually made for.
_CONTEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 4096: "a T5-conditioned model"}


@dataclass(frozen=True)
class Factor:
    """One adapted weight: where it lives and the scaled low-rank factors of its delta."""

    component: str
    weight: torch.nn.Parameter
    rows: slice | None  # the slice of a fused to_qkv/to_kv weight, or None: the whole weight
    up: torch.Tensor  # (out, rank), alpha / rank folded in
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)

    def delta(self, scale: float) -> torch.Tensor:
        if self.down.dim() == 4:  # conv LoRA: (out, r) @ (r, in*kh*kw)
            flat = self.up.flatten(1) @ self.down.flatten(1)
            return (flat * scale).reshape(flat.shape[0], *self.down.shape[1:])
        return (self.up @ self.down) * scale


@dataclass(frozen=True)
class LoadedLora:
    name: str  # the path as the caller gave it: error messages
    factors: tuple[Factor, ...]
    nbytes: int


def _fail(name: str, what: str) -> InputError:
    return InputError(f"invalid input: loras file {shown(name, 80)} {what}")


def read_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors (safetensors only: pickle never runs caller code here)."""
    if not path.exists():  # resolved when the job was prepared, evicted from the cache since
        raise JobError(f"the LoRA {shown(name, 80)} left the download cache while the job was "
                       f"queued (LORA_CACHE_GB is too small for the LoRAs in use); try again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _fail(name, f"is not a safetensors file ({shown(str(exc), 80)}); only "
                          f".safetensors LoRAs are accepted") from None


def normalise(state: dict[str, torch.Tensor], unet_config: Any, name: str,
              ) -> dict[tuple[str, str], dict[str, torch.Tensor | float]]:
    """(component, module path) -> {"down", "up", "alpha"?}, whatever layout the file has."""
    if not state:
        raise _fail(name, "holds no tensors")
    for marker, kind in _UNSUPPORTED.items():
        if any(marker in key for key in state):
            raise _fail(name, f"is a {kind} file, not a plain LoRA; only LoRA (lora_up/"
                              f"lora_down, lora_A/lora_B) files are supported")
    if any(key.startswith(("transformer.", "lora_transformer_", "double_blocks", "single_blocks",
                           "diffusion_model.double")) for key in state):
        raise _fail(name, "is a LoRA for a transformer model (Flux, SD3), not for SDXL's UNet")
    kohya_alphas = {key[:-len(".alpha")]: float(value) for key, value in state.items()
                    if key.endswith(".alpha")}
    try:
        converted, network_alphas = StableDiffusionXLPipeline.lora_state_dict(
            state, unet_config=unet_config)
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        raise _fail(name, f"could not be read as a LoRA ({shown(str(exc), 120)})") from None
    found: dict[tuple[str, str], dict[str, torch.Tensor | float]] = {}
    unknown = []
    for key, tensor in converted.items():
        split = _split(key)
        if split is None:
            if not key.endswith(".alpha"):
                unknown.append(key)
            continue
        component, path, role = split
        found.setdefault((component, path), {})[role] = tensor
    for key, alpha in {**(network_alphas or {}), **kohya_alphas}.items():
        split = _split(key.removesuffix(".alpha")) or _split(key.removesuffix(".alpha")
                                                               + ".lora_A.weight")
        if split is not None and (split[0], split[1]) in found:
            found[(split[0], split[1])]["alpha"] = float(alpha)
    if unknown:
        raise _fail(name, f"has {len(unknown)} key(s) that are no LoRA weights (e.g. "
                          f"{shown(unknown[0], 80)})")
    incomplete = [path for (_, path), parts in found.items() if not {"up", "down"} <= set(parts)]
    if incomplete or not found:
        raise _fail(name, "holds no complete LoRA pair (up and down weights)" if not found else
                    f"has a LoRA layer without its up or down weight ({shown(incomplete[0], 80)})")
    return found


def _split(key: str) -> tuple[str, str, str] | None:
    """``unet.down_blocks.1...attn1.to_q.lora_A.weight`` -> ("unet", "down_blocks...to_q",
    "down"); None if ``key`` is no LoRA factor."""
    component = "unet"
    for prefix in ("unet.", "text_encoder_2.", "text_encoder."):
        if key.startswith(prefix):
            component, key = prefix[:-1], key[len(prefix):]
            break
    suffix, role = next(((end, part) for end, part in _ROLES if key.endswith(end)), ("", ""))
    if not suffix:
        return None
    path = key[:-len(suffix)]
    kind = "unet" if component == "unet" else "text"
    match = re.fullmatch(r"(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)", path)
    if match and suffix.startswith("_lora"):
        path = f"{match.group(1)}.{_PROCESSOR[kind][match.group(2)]}"
    return component, path, role


def _locate(module: torch.nn.Module, path: str) -> tuple[torch.nn.Parameter, slice | None] | None:
    """The weight a LoRA layer adapts, or its rows in a fused projection (fused QKV)."""
    candidates = [path] + ([path.removeprefix("text_model.")] if path.startswith("text_model.")
                           else [])
    for candidate in candidates:
        with contextlib.suppress(AttributeError):
            return module.get_submodule(candidate).weight, None
        parent_path, _, leaf = candidate.rpartition(".")
        try:
            parent = module.get_submodule(parent_path) if parent_path else module
        except AttributeError:
            continue
        for fused, order in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
            if leaf in order and hasattr(parent, fused):
                weight = getattr(parent, fused).weight
                size = weight.shape[0] // len(order)
                index = order.index(leaf)
                return weight, slice(index * size, (index + 1) * size)
    return None


def _architecture_hint(found: dict[tuple[str, str], dict]) -> str:
    for (component, path), parts in found.items():
        if component == "unet" and path.endswith("attn2.to_k"):
            width = parts["down"].shape[-1]
            return f"; its cross-attention takes {width}-wide text features " \
                   f"({_CONTEXT_WIDTH.get(width, 'an unknown model')})"
    return ""


def build_factors(pipe: StableDiffusionXLPipeline, found: dict, name: str, device: torch.device,
                  dtype: torch.dtype) -> LoadedLora:
    """Match every LoRA layer to a weight of ``pipe``; a layer that matches none, or whose
    shape differs, is the caller's error (another architecture), never silently dropped."""
    factors, missing, nbytes = [], [], 0
    for (component, path), parts in found.items():
        module = getattr(pipe, component, None)
        target = _locate(module, path) if module is not None else None
        if target is None:
            missing.append(f"{component}.{path}")
            continue
        weight, rows = target
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        shape = tuple(weight.shape) if rows is None else (rows.stop - rows.start,
                                                          *weight.shape[1:])
        expected = (up.shape[0], *down.shape[1:])
        if down.dim() == 2 and len(shape) == 4:
            expected = (*expected, 1, 1)  # a 1x1 conv adapted by a linear LoRA
        if tuple(expected) != shape or up.shape[-1 if up.dim() == 2 else 1] != rank:
            raise _fail(name, f"does not fit SDXL-Lightning: layer {component}.{path} is "
                              f"{list(shape)} here, the LoRA makes it {list(expected)}"
                              f"{_architecture_hint(found)}")
        alpha = float(parts.get("alpha", rank))
        up = (up.to(torch.float32) * (alpha / rank)).to(device)
        down = down.to(torch.float32).to(device)
        if down.dim() == 2 and len(shape) == 4:
            down = down[:, :, None, None]
        if up.dim() == 4:
            up = up.flatten(1)
        factors.append(Factor(component, weight, rows, up, down))
        nbytes += (up.numel() + down.numel()) * 4
    if missing:
        raise _fail(name, f"does not fit SDXL-Lightning: {len(missing)} of its {len(found)} "
                          f"layers match no layer of the model (e.g. {shown(missing[0], 90)})"
                          f"{_architecture_hint(found)}")
    del dtype  # factors stay fp32: the delta is added in fp32, then cast once
    return LoadedLora(name, tuple(factors), nbytes)


class LoraBank:
    """LoRAs loaded for the engine's pipelines, by file sha256, least recently used evicted.

    Factors point at the weights of one checkpoint's pipeline (its UNet, the shared text
    encoders), so the key includes the checkpoint's step count. Used on the GPU thread only.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype,
                 slots: int = MEMORY_SLOTS) -> None:
        self.device, self.dtype = device, dtype
        # Slots and bytes both bound the bank: factors are fp32 on the GPU (a 1 GB fp16 file
        # is ~2 GB here), so a count alone could hold tens of GB.
        self._loaded: Lru[tuple[int, bool, str], LoadedLora] = Lru(
            limit=slots, size=lambda lora: max(1.0, slots * lora.nbytes / MEMORY_BYTES))
        self.loads = 0  # files read and converted: what the tests and the benchmark count

    def get(self, steps: int, pipe: StableDiffusionXLPipeline, use: LoraUse) -> LoadedLora:
        # The layout is part of the key: optimize() fuses Q/K/V and deletes the weights that
        # factors loaded before it point at.
        key = (steps, bool(getattr(pipe.unet, FUSED_FOR_GOOD, False)), use.sha256)
        loaded = self._loaded.get(key)
        if loaded is None:
            try:
                # the config itself: diffusers reads SGM block names through its attributes
                found = normalise(read_state(Path(use.file), use.path), pipe.unet.config,
                                  use.path)
                loaded = build_factors(pipe, found, use.path, self.device, self.dtype)
            except (InputError, JobError, torch.OutOfMemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed file is the caller's
                # e.g. a multi-element alpha, a rank-0 pair, 1-D factors: never a worker bug
                raise _fail(use.path, f"could not be read as a LoRA ({type(exc).__name__}: "
                                      f"{shown(str(exc), 100)})") from None
            self.loads += 1
            self._loaded.put(key, loaded)
            log.info("LoRA %s… loaded: %d layers, %.1f MB", use.sha256[:12],
                     len(loaded.factors), loaded.nbytes / 1e6)
        return loaded

    @contextlib.contextmanager
    def merged(self, steps: int, pipe: StableDiffusionXLPipeline,
               uses: Sequence[LoraUse]) -> Iterator[None]:
        """``uses`` merged into the pipeline's weights inside the block, the originals copied
        back when it ends, however it ends. Scale 0 adds nothing (bit-identical to none)."""
        active = [(self.get(steps, pipe, use), use.scale) for use in uses if use.scale != 0]
        # One backup per weight, whole, taken before any delta touches it: two LoRAs may aim
        # at the same fused to_qkv (one at its Q rows, one at all of it), and row-slice
        # backups restored in turn would then put one LoRA's delta back.
        backups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            with torch.no_grad():
                for lora, scale in active:
                    for factor in lora.factors:
                        if id(factor.weight) not in backups:
                            backups[id(factor.weight)] = (factor.weight.data,
                                                          factor.weight.data.clone())
                        target = (factor.weight.data if factor.rows is None
                                  else factor.weight.data[factor.rows])
                        target.copy_((target.float() + factor.delta(scale).reshape(
                            target.shape)).to(target.dtype))
            yield
        finally:
            with torch.no_grad():
                for data, original in backups.values():
                    data.copy_(original)


def loaded_count(bank: LoraBank) -> int:
    """LoRAs resident in ``bank`` (tests, benchmark)."""
    return len(bank._loaded)  # noqa: SLF001 - a read-only peek for reports


# ---- textual-inversion embeddings ------------------------------------------------------------
# An SDXL embedding holds one vector set per text encoder (the kohya/A1111 and diffusers
# trainers both write these two keys); an SD 1.x file holds only 768-wide vectors.
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def read_embedding(use: EmbeddingUse, widths: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The file's two vector sets, checked against the encoders' widths and the tokens."""
    state = read_state(Path(use.file), use.path)
    name = use.path
    if not all(key in state for key in SDXL_EMBEDDING_KEYS):
        found = ", ".join(f"{k} {list(v.shape)}" for k, v in list(state.items())[:4])
        kind = (" (an SD 1.x embedding: 768-wide, one encoder)"
                if any(v.shape[-1] == 768 for v in state.values()) else "")
        raise InputError(f"invalid input: embeddings file {shown(name, 80)} is no SDXL "
                         f"textual-inversion embedding: it needs clip_l and clip_g vectors, it "
                         f"holds {found}{kind}")
    vectors = {}
    for key, width in zip(SDXL_EMBEDDING_KEYS, widths, strict=True):
        tensor = state[key]
        tensor = tensor.unsqueeze(0) if tensor.dim() == 1 else tensor
        if tensor.dim() != 2 or tensor.shape[-1] != width:
            raise InputError(f"invalid input: embeddings file {shown(name, 80)}: {key} is "
                             f"{list(tensor.shape)}, this model's encoder takes {width}-wide "
                             f"vectors")
        vectors[key] = tensor
    if vectors["clip_g"].shape[0] != vectors["clip_l"].shape[0]:
        raise InputError(f"invalid input: embeddings file {shown(name, 80)}: clip_l has "
                         f"{vectors['clip_l'].shape[0]} vectors, clip_g "
                         f"{vectors['clip_g'].shape[0]}: one set per encoder must match")
    return vectors


def check_tokens(use: EmbeddingUse, count: int) -> None:
    """One token per vector, or one token for them all (diffusers adds T, T_1, ...)."""
    if len(use.tokens) not in (1, count):
        raise InputError(f"invalid input: embeddings[].tokens: {shown(use.path, 80)} holds "
                         f"{count} vector(s) per encoder; give {count} token(s), one per "
                         f"vector, or one token for all (got {len(use.tokens)})")


class EmbeddingBank:
    """Embeddings added to the shared tokenizers and encoders for one batch, removed after.

    diffusers' ``load_textual_inversion`` adds the tokens and grows the embedding matrices;
    ``unload_textual_inversion`` restores vocabulary and matrices (notes, section 6): no token
    survives the batch, so one job's token never fires in another's prompt. The files' vectors
    are kept (by sha256, least recently used evicted) so a repeat does not read the file again.
    """

    def __init__(self, slots: int = MEMORY_SLOTS) -> None:
        self._vectors: Lru[str, dict[str, torch.Tensor]] = Lru(limit=slots, size=lambda _: 1)
        self.loads = 0

    @contextlib.contextmanager
    def added(self, pipe: StableDiffusionXLPipeline,
              uses: Sequence[EmbeddingUse]) -> Iterator[None]:
        encoders = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
        widths = tuple(encoder.get_input_embeddings().embedding_dim for encoder, _ in encoders)
        added: list[list[str]] = [[], []]
        vocab_before = [set(tokenizer.get_vocab()) for _, tokenizer in encoders]
        try:
            for use in uses:
                vectors = self._vectors.get(use.sha256)
                if vectors is None:
                    vectors = read_embedding(use, widths)
                    self.loads += 1
                    self._vectors.put(use.sha256, vectors)
                check_tokens(use, vectors["clip_l"].shape[0])
                tokens = list(use.tokens) if len(use.tokens) > 1 else use.tokens[0]
                for (encoder, tokenizer), key in zip(encoders, SDXL_EMBEDDING_KEYS,
                                                     strict=True):
                    if any(t in tokenizer.get_vocab() for t in use.tokens):
                        raise InputError(f"invalid input: embeddings: a token of "
                                         f"{shown(use.path, 80)} is already a word of the "
                                         f"vocabulary ({', '.join(map(shown, use.tokens))}); "
                                         f"choose tokens such as <name>")
                    try:
                        pipe.load_textual_inversion(vectors[key].to(encoder.dtype),
                                                    token=tokens, text_encoder=encoder,
                                                    tokenizer=tokenizer)
                    except ValueError as exc:  # e.g. "x_1" given and "x" (-> x_1, x_2) too
                        raise InputError(f"invalid input: embeddings: the tokens of "
                                         f"{shown(use.path, 80)} clash with another "
                                         f"embedding's ({shown(str(exc), 120)})") from None
            yield
        finally:
            # Whatever was added, even by a load that failed half way (the snapshot is older).
            for index, (_, tokenizer) in enumerate(encoders):
                added[index] = sorted(set(tokenizer.get_vocab()) - vocab_before[index])
            for (encoder, tokenizer), tokens in zip(encoders, added, strict=True):
                if tokens:
                    pipe.unload_textual_inversion(tokens, tokenizer=tokenizer,
                                                  text_encoder=encoder)
