"""The worker's contract: the job input, its bounds and error messages, and the settings.

Pydantic v2 models only; no torch import, so this module loads in milliseconds and is tested alone.
Every default and bound of the API lives here. Snapping and clamping (which change a value and
say so in ``warnings``) live in ``resolve.py``; what is rejected outright is decided here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

import model_files

# Lightning was distilled at 1024 px (SDXL's ~1 MP buckets); below 512 SDXL falls apart and above
# 1536 memory and time grow with no training behind it. diffusers needs multiples of 8 (the VAE).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 512, 1536, 8
MAX_IMAGES = 4  # four 1024² PNGs as base64 stay under RunPod's 10 MB /run result limit
MAX_GUIDANCE = 20.0
SEED_LIMIT = 2**32  # torch accepts 64-bit seeds; 32 bits is what every client can round-trip
MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens; anything this long is a mistake or an attack
CLIP_MAX_TOKENS = 77


def _not_bool(value: Any) -> Any:
    """Pydantic's lax mode reads true/false as 1/0; for this API a boolean is never a number."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True, max_length=MAX_PROMPT_CHARS)]

# What each field accepts, in words: every error message quotes it.
RULES: dict[str, str] = {
    "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters, or null",
    "height": f"a positive integer (snapped to a multiple of {SIDE_MULTIPLE}, "
              f"clamped to {MIN_SIDE}-{MAX_SIDE})",
    "width": f"a positive integer (snapped to a multiple of {SIDE_MULTIPLE}, "
             f"clamped to {MIN_SIDE}-{MAX_SIDE})",
    "num_inference_steps": "an integer >= 1 (resolved to a loaded Lightning checkpoint)",
    "guidance_scale": f"a number from 0 to {MAX_GUIDANCE:g}",
    "seed": f"an integer from 0 to {SEED_LIMIT - 1}, or null for a random seed",
    "num_images": f"an integer from 1 to {MAX_IMAGES}",
}


class GenerateRequest(BaseModel):
    """``job["input"]`` for text-to-image, as the caller sent it (before snapping)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Text
    negative_prompt: Text | None = None
    height: Int = Field(1024, ge=1)
    width: Int = Field(1024, ge=1)
    num_inference_steps: Int = Field(4, ge=1)
    guidance_scale: Float = Field(0.0, ge=0.0, le=MAX_GUIDANCE)
    seed: Int | None = Field(None, ge=0, lt=SEED_LIMIT)
    num_images: Int = Field(1, ge=1, le=MAX_IMAGES)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty or blank")
        return value


def _shown(value: Any, limit: int = 60) -> str:
    """A short repr of a bad value: enough to recognise it, never a whole prompt or image."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _describe(error: Mapping[str, Any]) -> str:
    field = str(error["loc"][0]) if error["loc"] else "input"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, RULES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field '{field}': {hint}allowed fields are {', '.join(RULES)}"
    if error["type"] == "missing":
        return f"{field} is required: {RULES.get(field, 'a value')}"
    reason = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}={_shown(error['input'])} is invalid ({reason}); allowed: " \
           f"{RULES.get(field, 'see the API table')}"


def format_validation_error(exc: ValidationError) -> str:
    """One line naming every bad field, its value and what is allowed."""
    seen: dict[str, None] = {}  # one message per field, in order (a union reports each branch)
    for error in exc.errors(include_url=False):
        seen.setdefault(_describe(error), None)
    return "invalid input: " + "; ".join(seen)


def parse_request(raw: Any) -> GenerateRequest:
    """Validate ``job["input"]``; raises ``ValueError`` with a caller-facing message."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"invalid input: expected a JSON object, got {type(raw).__name__}")
    try:
        return GenerateRequest.model_validate(dict(raw))
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc)) from None


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(part) for part in text.replace(" ", "").split(",") if part}))
    except ValueError:
        steps = ()
    if not steps or any(s not in model_files.CHECKPOINTS for s in steps):
        raise ValueError(f"LIGHTNING_STEPS={text!r} is invalid: a comma-separated subset of "
                         f"{sorted(model_files.CHECKPOINTS)}")
    return steps


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name}={text!r} is invalid: use true or false")


class Settings(BaseModel):
    """Worker settings, read once at start from environment variables."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path | None = None  # None: search the locations in model_location.py
    lightning_steps: tuple[int, ...] = (4,)
    warmup: bool = True
    download_missing: bool = True

    # Environment variable -> field. The README and hub.json list exactly these.
    ENV: ClassVar[Mapping[str, str]] = {
        "MODEL_DIR": "model_dir", "LIGHTNING_STEPS": "lightning_steps", "WARMUP": "warmup",
        "DOWNLOAD_MISSING_WEIGHTS": "download_missing"}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Build settings from ``env``; raises ``ValueError`` naming a bad variable."""
        values: dict[str, Any] = {}
        if env.get("MODEL_DIR"):
            values["model_dir"] = Path(env["MODEL_DIR"]).expanduser()
        if env.get("LIGHTNING_STEPS"):
            values["lightning_steps"] = _parse_steps(env["LIGHTNING_STEPS"])
        if env.get("WARMUP"):
            values["warmup"] = _parse_bool("WARMUP", env["WARMUP"])
        if env.get("DOWNLOAD_MISSING_WEIGHTS"):
            values["download_missing"] = _parse_bool("DOWNLOAD_MISSING_WEIGHTS",
                                                     env["DOWNLOAD_MISSING_WEIGHTS"])
        return cls(**values)
