"""Turn a validated request into the exact parameters a generation uses, and say what changed.

Pure functions, no torch: the snapping, clamping, step resolution, strength quantisation, seed
assignment and safety-checker decision that the API table promises, each change reported as a
human-readable warning. The result, ``Plan``, is what the GPU queue batches, what
``pipeline.Engine`` runs and what the response echoes under ``parameters``. Decoded init images
are attached by ``worker/inputs/prepare.py``, not here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from schemas import (
    DEFAULT_STRENGTH,
    MAX_SIDE,
    MIN_SIDE,
    SCHEDULERS,
    SEED_LIMIT,
    SIDE_MULTIPLE,
    GenerateRequest,
)
from worker.errors import InputError
from worker.spec import CHECKPOINTS, MODEL_NAME, X0_PREDICTION_STEPS

# A JPEG of the current estimate of a job's first image, made only when called (it costs a
# TAESDXL decode on the GPU thread); None where no preview can be made.
Preview = Callable[[], bytes]
# Per-step progress of one job: (steps done, steps in this run, its preview or None).
StepCallback = Callable[[int, int, "Preview | None"], None]
# The engine's per-step report for a whole batch: the preview takes the image's index in it.
BatchStep = Callable[[int, int, "Callable[[int], bytes] | None"], None]

# diffusers runs classifier-free guidance only when guidance_scale > 1; at or below it the
# negative prompt is never encoded and the value changes nothing.
CFG_THRESHOLD = 1.0
# Lightning is distilled for guidance 0 (ByteDance's card); up to ~2 with a negative prompt still
# looks right, past that the distilled steps over-saturate. Other APIs default to 7.5 (Cloudflare).
HIGH_GUIDANCE = 2.0
DEFAULT_SIDE = 1024  # Lightning's training resolution
# Schedulers that cannot step an x0-prediction (prediction_type "sample") checkpoint: diffusers'
# EulerAncestralDiscreteScheduler raises NotImplementedError and PNDMScheduler ValueError for it.
# tests/integration/test_modes.py runs every scheduler with every checkpoint to keep this true.
X0_UNSUPPORTED = frozenset({"K_EULER_ANCESTRAL", "PNDM"})


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a job, resolved: the path as the caller gave it, the local file, its sha256
    (what identifies it: caches, batching, the response) and the effective scale."""

    path: str
    file: str
    sha256: str
    scale: float

    def echo(self) -> dict[str, object]:
        return {"path": self.path, "scale": self.scale, "sha256": self.sha256}


@dataclass(frozen=True)
class EmbeddingUse:
    """One textual-inversion embedding of a job, resolved like a ``LoraUse``."""

    path: str
    file: str
    sha256: str
    tokens: tuple[str, ...]

    def echo(self) -> dict[str, object]:
        return {"path": self.path, "tokens": list(self.tokens), "sha256": self.sha256}


@dataclass(frozen=True)
class Plan:
    """Everything one generation needs, after every adjustment."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    strength: float | None = None  # effective: denoising steps run / steps
    scheduler: str = "K_EULER"
    output_format: str = "png"
    quality: int = 90
    safety_check: bool = False  # this job's images go through the safety checker
    preview: bool = False  # per-step previews of the estimate, for progress updates
    init_image: Any = None  # PIL images at (width, height), attached by inputs/prepare.py
    mask_image: Any = None
    loras: tuple[LoraUse, ...] = ()  # attached by inputs/prepare.py (worker/adapters/store.py)
    # Prompts encoded by compel (weighting syntax, or past 77 tokens: chunked), set by
    # inputs/prepare.py; False: diffusers' own encoding, today's exact bytes.
    weighted: bool = False
    embeddings: tuple[EmbeddingUse, ...] = ()  # attached like loras
    # BASE_MODEL: what ran, as reported (``with_served``); None: SDXL-Lightning's own names.
    served: tuple[str, str | None] | None = None

    @property
    def checkpoint(self) -> str:
        return CHECKPOINTS[self.steps]

    def with_images(self, init_image: Any, mask_image: Any) -> Plan:
        return replace(self, init_image=init_image, mask_image=mask_image)

    def with_served(self, served: dict[int, tuple[str, str | None]] | None) -> Plan:
        """This plan with the worker's own model's (name, Lightning file) for its steps."""
        return self if served is None else replace(self, served=served[self.steps])

    @property
    def shape_key(self) -> tuple[object, ...]:
        """Plans with equal keys can run as one batch on the GPU."""
        return (self.mode, self.width, self.height, self.steps, self.guidance_scale,
                self.negative_prompt is None, self.scheduler, self.strength,
                self.adapter_key)

    @property
    def adapter_key(self) -> tuple[object, ...]:
        """Only jobs with identical adapters share a batch: they run on the same weights."""
        # Weighted prompts batch only with the very same prompts: their conditioning may be
        # several 77-token chunks long, and padding a row changes its image.
        texts = (self.prompt, self.negative_prompt) if self.weighted else ()
        return (tuple((lora.sha256, lora.scale) for lora in self.loras) + texts
                + tuple((e.sha256, e.tokens) for e in self.embeddings))

    def parameters(self) -> dict[str, object]:
        """The ``parameters`` block of the response: the values actually used."""
        lossy = self.output_format != "png"
        # Adapters only where a job used some: a plain job's response is what it always was.
        adapters = {"loras": [lora.echo() for lora in self.loras]} if self.loras else {}
        if self.embeddings:
            adapters["embeddings"] = [embedding.echo() for embedding in self.embeddings]
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "width": self.width, "height": self.height,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "seed": self.seeds[0], "num_images": len(self.seeds), "mode": self.mode,
                "strength": self.strength, "scheduler": self.scheduler,
                "output_format": self.output_format, "quality": self.quality if lossy else None,
                "safety_checker": self.safety_check,
                **self._model()} | adapters

    def _model(self) -> dict[str, str | None]:
        model, checkpoint = self.served or (MODEL_NAME, self.checkpoint)
        return {"model": model, "checkpoint": checkpoint}


def snap_side(name: str, value: int) -> tuple[int, str | None]:
    """Snap to the nearest multiple of 8 (halves round up), then clamp to the allowed range."""
    snapped = (value + SIDE_MULTIPLE // 2) // SIDE_MULTIPLE * SIDE_MULTIPLE
    clamped = min(max(snapped, MIN_SIDE), MAX_SIDE)
    if clamped != snapped:
        return clamped, f"{name} {value} was clamped to {clamped} (allowed {MIN_SIDE}-{MAX_SIDE})"
    if snapped != value:
        return snapped, f"{name} {value} was snapped to {snapped} (a multiple of {SIDE_MULTIPLE})"
    return value, None


def resolve_steps(requested: int, available: tuple[int, ...]) -> tuple[int, str | None]:
    """The loaded checkpoint nearest to ``requested``; ties go to more steps (better quality)."""
    chosen = min(available, key=lambda s: (abs(s - requested), -s))
    if chosen == requested:
        return chosen, None
    return chosen, (f"num_inference_steps {requested} was resolved to {chosen}: each Lightning "
                    f"checkpoint runs only its own step count (loaded: "
                    f"{', '.join(map(str, available))})")


def schedulers_for(steps: int) -> tuple[str, ...]:
    """The schedulers that run the ``steps`` checkpoint, in the API's order."""
    refused = X0_UNSUPPORTED if steps in X0_PREDICTION_STEPS else frozenset()
    return tuple(name for name in SCHEDULERS if name not in refused)


def check_scheduler(scheduler: str, steps: int) -> None:
    """Refuse a scheduler the resolved checkpoint cannot run, naming the pair and the choices."""
    if scheduler not in schedulers_for(steps):
        raise InputError(f"invalid input: scheduler {scheduler!r} cannot run the {steps}-step "
                         f"checkpoint ({CHECKPOINTS[steps]}, x0-prediction); with {steps} "
                         f"step(s) use one of: {', '.join(schedulers_for(steps))}")


def _guidance(req: GenerateRequest) -> tuple[float, str | None, list[str]]:
    """Effective guidance and negative prompt, with a warning for each one that has no effect."""
    if req.guidance_scale > HIGH_GUIDANCE:
        return req.guidance_scale, req.negative_prompt, [
            f"guidance_scale {req.guidance_scale:g} is far above what SDXL-Lightning was "
            f"distilled for (0): expect over-saturated, burnt-looking images and twice the GPU "
            f"time; use 0, or up to {HIGH_GUIDANCE:g} with a negative prompt"]
    if req.guidance_scale > CFG_THRESHOLD:
        return req.guidance_scale, req.negative_prompt, []
    warnings = []
    if req.guidance_scale != 0.0:
        warnings.append(f"guidance_scale {req.guidance_scale:g} acts as 0: classifier-free "
                        f"guidance only runs above {CFG_THRESHOLD:g}")
    if req.negative_prompt:
        warnings.append(f"negative_prompt was ignored: it only takes effect with "
                        f"guidance_scale > {CFG_THRESHOLD:g} (Lightning is distilled for 0)")
    return 0.0, None, warnings


def draw_seed() -> int:
    """A fresh seed from the whole 32-bit range (not the 2-byte seeds some workers use)."""
    return secrets.randbelow(SEED_LIMIT)


def sizes_from_image(req: GenerateRequest, image_size: tuple[int, int]) -> tuple[int, int]:
    """Output size for an init image: the image's, or its aspect ratio fitted to a given side.

    Sides the caller left out follow the image; an image outside 512-1536 is scaled, keeping
    its aspect ratio, into the range before the usual snapping and clamping.
    """
    img_w, img_h = image_size
    if req.width is not None and req.height is not None:
        return req.width, req.height
    # Integer arithmetic: a side may be any huge integer (clamped later); floats would overflow.
    if req.width is not None:
        return req.width, max(1, (2 * req.width * img_h + img_w) // (2 * img_w))
    if req.height is not None:
        return max(1, (2 * req.height * img_w + img_h) // (2 * img_h)), req.height
    scale = min(1.0, MAX_SIDE / max(img_w, img_h))
    if min(img_w, img_h) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(img_w, img_h)
    return max(1, round(img_w * scale)), max(1, round(img_h * scale))


def resolve_strength(req: GenerateRequest, steps: int) -> tuple[float | None, list[str]]:
    """Effective strength: diffusers runs int(steps * strength) of the checkpoint's steps."""
    if req.mode == "txt2img":
        if req.strength is None:
            return None, []
        return None, ["strength was ignored: it applies only with an init image"]
    strength = req.strength if req.strength is not None else DEFAULT_STRENGTH[req.mode]
    run = min(int(steps * strength), steps)  # the exact formula of diffusers' get_timesteps
    if run < 1:
        raise InputError(f"invalid input: strength={strength:g} runs no denoising step with the "
                         f"{steps}-step checkpoint; the smallest allowed is {1 / steps:g}")
    effective = run / steps
    if effective == strength:
        return effective, []
    return effective, [f"strength {strength:g} runs {run} of {steps} steps: effective strength "
                       f"{effective:g}"]


def resolve_safety(mode: str, req: GenerateRequest) -> tuple[bool, list[str]]:
    """Whether a job's images are checked under ``SAFETY_CHECKER=mode`` (off, on, always), and
    a warning when the caller's ``disable_safety_checker`` was overruled."""
    if mode == "off":
        return False, []
    if not req.disable_safety_checker:
        return True, []
    if mode == "on":
        return False, []
    return True, ["disable_safety_checker was ignored: this worker always runs the safety "
                  "checker (SAFETY_CHECKER=always)"]


def resolve(req: GenerateRequest, available_steps: tuple[int, ...], *, safety_mode: str = "off",
            image_size: tuple[int, int] | None = None,
            new_seed: Callable[[], int] = draw_seed) -> tuple[Plan, list[str]]:
    """The plan for ``req`` on a worker with ``available_steps`` loaded, and its warnings.

    ``safety_mode`` is the worker's ``SAFETY_CHECKER`` setting; ``image_size`` the decoded init
    image's size (img2img and inpainting). Raises ``InputError`` for a strength too small to
    run a single step and for a scheduler the resolved checkpoint cannot run.
    """
    warnings: list[str] = []
    if image_size is not None:
        width, height = sizes_from_image(req, image_size)
    else:
        width, height = req.width or DEFAULT_SIDE, req.height or DEFAULT_SIDE
    width, w_warn = snap_side("width", width)
    height, h_warn = snap_side("height", height)
    if image_size is not None and (width, height) != image_size and (
            req.width is None or req.height is None):
        w_warn, h_warn = (f"output size {width}x{height} follows the init image "
                          f"({image_size[0]}x{image_size[1]}), fitted to {MIN_SIDE}-{MAX_SIDE} "
                          f"in multiples of {SIDE_MULTIPLE}"), None
    steps, s_warn = resolve_steps(req.num_inference_steps, available_steps)
    check_scheduler(req.scheduler, steps)
    strength, strength_warnings = resolve_strength(req, steps)
    guidance, negative, g_warnings = _guidance(req)
    checked, safety_warnings = resolve_safety(safety_mode, req)
    first = new_seed() if req.seed is None else req.seed
    # Image i uses seed + i, wrapped so every reported seed is itself a valid input.
    seeds = tuple((first + i) % SEED_LIMIT for i in range(req.num_images))
    plan = Plan(prompt=req.prompt, negative_prompt=negative, width=width, height=height,
                steps=steps, guidance_scale=guidance, seeds=seeds, mode=req.mode,
                strength=strength, scheduler=req.scheduler, output_format=req.output_format,
                quality=req.quality, safety_check=checked, preview=req.preview)
    warnings += [w for w in (w_warn, h_warn, s_warn) if w] + strength_warnings + g_warnings
    if req.output_format == "png" and "quality" in req.model_fields_set:
        warnings.append("quality was ignored: png is lossless")
    return plan, warnings + safety_warnings


def with_defaults(req: GenerateRequest, defaults: dict[str, object]) -> GenerateRequest:
    """``req`` with the operator's DEFAULT_* (already validated by settings) in the fields the
    caller left unset; a field the caller set always wins."""
    unset = {k: v for k, v in defaults.items() if k not in req.model_fields_set}
    return req.model_copy(update=unset) if unset else req


def warmup_plan(steps: int, width: int, height: int) -> Plan:
    """One image of ``width`` x ``height`` with the ``steps`` checkpoint, to warm up or compile
    the kernels of that shape before any job arrives."""
    return Plan(prompt="warm-up", negative_prompt=None, width=width, height=height, steps=steps,
                guidance_scale=0.0, seeds=(0,))
