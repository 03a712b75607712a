"""Turn a validated request into the exact parameters a generation uses, and say what changed.

Pure functions, no torch: the snapping, clamping, step resolution and seed assignment that the
API table promises, each change reported as a human-readable warning. The result, ``Plan``, is
what ``pipeline.generate`` runs and what the response echoes under ``parameters``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import model_files
from schemas import MAX_SIDE, MIN_SIDE, SEED_LIMIT, SIDE_MULTIPLE, GenerateRequest

# diffusers runs classifier-free guidance only when guidance_scale > 1; at or below it the
# negative prompt is never encoded and the value changes nothing.
CFG_THRESHOLD = 1.0


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

    @property
    def checkpoint(self) -> str:
        return model_files.CHECKPOINTS[self.steps]

    def parameters(self) -> dict[str, object]:
        """The ``parameters`` block of the response: the values actually used."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "width": self.width, "height": self.height,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
                "seed": self.seeds[0], "num_images": len(self.seeds),
                "model": model_files.MODEL_NAME, "checkpoint": self.checkpoint}


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


def _guidance(req: GenerateRequest) -> tuple[float, str | None, list[str]]:
    """Effective guidance and negative prompt, with a warning for each one that has no effect."""
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


def resolve(req: GenerateRequest, available_steps: tuple[int, ...],
            new_seed: Callable[[], int] = draw_seed) -> tuple[Plan, list[str]]:
    """The plan for ``req`` on a worker with ``available_steps`` loaded, and its warnings."""
    width, w_warn = snap_side("width", req.width)
    height, h_warn = snap_side("height", req.height)
    steps, s_warn = resolve_steps(req.num_inference_steps, available_steps)
    guidance, negative, g_warnings = _guidance(req)
    first = new_seed() if req.seed is None else req.seed
    # Image i uses seed + i, wrapped so every reported seed is itself a valid input.
    seeds = tuple((first + i) % SEED_LIMIT for i in range(req.num_images))
    plan = Plan(prompt=req.prompt, negative_prompt=negative, width=width, height=height,
                steps=steps, guidance_scale=guidance, seeds=seeds)
    return plan, [w for w in (w_warn, h_warn, s_warn) if w] + g_warnings
