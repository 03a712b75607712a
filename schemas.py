"""The worker's contract: the job input, its bounds and error messages, and the settings.

Pydantic v2 models only; no torch import, so this module loads in milliseconds and is tested alone.
Every default and bound of the API lives here. Snapping and clamping (which change a value and
say so in ``warnings``) live in ``resolve.py``; what is rejected outright is decided here.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import model_files

# Lightning was distilled at 1024 px (SDXL's ~1 MP buckets); below 512 SDXL falls apart and above
# 1536 memory and time grow with no training behind it. diffusers needs multiples of 8 (the VAE).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 512, 1536, 8
MAX_IMAGES = 4  # Replicate's cap; larger batches belong in a bucket, not a JSON result
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
# An encoded image: base64 (raw or data URI), an https URL, or Cloudflare's array of byte values.
# Only the JSON type is checked here; image_inputs.py decodes it with its size and safety limits.
ImageValue = Annotated[str, Field(strict=True)] | Annotated[list[Any], Field(strict=True)]

# Replicate's scheduler names (the API users know). The default is what Lightning was distilled
# for; pipeline.SCHEDULERS builds each, on trailing timesteps, and README lists their cost.
SCHEDULERS = ("K_EULER", "K_EULER_ANCESTRAL", "DDIM", "DPMSolverMultistep", "KarrasDPM",
              "DPM++2MSDE", "HeunDiscrete", "PNDM")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # inpainting repaints the masked area fully

# Other providers' names for our fields (Cloudflare Workers AI, Replicate/Eachlabs, Runflow), so
# their clients work unchanged apart from the URL.
ALIASES = {"num_steps": "num_inference_steps", "steps": "num_inference_steps",
           "guidance": "guidance_scale", "num_outputs": "num_images", "image_b64": "image"}

# What each field accepts, in words: every error message quotes it.
RULES: dict[str, str] = {
    "prompt": f"a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"a string of at most {MAX_PROMPT_CHARS} characters, or null",
    "height": f"a positive integer (snapped to a multiple of {SIDE_MULTIPLE}, "
              f"clamped to {MIN_SIDE}-{MAX_SIDE}), or null",
    "width": f"a positive integer (snapped to a multiple of {SIDE_MULTIPLE}, "
             f"clamped to {MIN_SIDE}-{MAX_SIDE}), or null",
    "num_inference_steps": "an integer >= 1 (resolved to a loaded Lightning checkpoint)",
    "guidance_scale": f"a number from 0 to {MAX_GUIDANCE:g}",
    "seed": f"an integer from 0 to {SEED_LIMIT - 1}, or null for a random seed",
    "num_images": f"an integer from 1 to {MAX_IMAGES}",
    "image": "an encoded PNG/JPEG/WebP image: base64 (raw or data URI), an https URL, or an "
             "array of byte values",
    "mask": "an encoded image like `image` (white = repaint); requires `image`",
    "strength": "a number > 0 and <= 1 (img2img default 0.8, inpainting 1.0)",
    "scheduler": ", ".join(SCHEDULERS),
    "output_format": ", ".join(OUTPUT_FORMATS) + " (jpg = jpeg)",
    "quality": "an integer from 1 to 100 (jpeg and webp)",
    "disable_safety_checker": "true or false",
}


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _scheduler_name(value: Any) -> Any:
    """Scheduler names match case-insensitively, as clients spell them variously."""
    if isinstance(value, str):
        by_key = {name.lower(): name for name in SCHEDULERS}
        return by_key.get(value.strip().lower(), value)
    return value


class GenerateRequest(BaseModel):
    """``job["input"]`` as the caller sent it (aliases merged, before snapping)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Text
    negative_prompt: Text | None = None
    height: Int | None = Field(None, ge=1)  # None: 1024, or the init image's height
    width: Int | None = Field(None, ge=1)
    num_inference_steps: Int = Field(4, ge=1)
    guidance_scale: Float = Field(0.0, ge=0.0, le=MAX_GUIDANCE)
    seed: Int | None = Field(None, ge=0, lt=SEED_LIMIT)
    num_images: Int = Field(1, ge=1, le=MAX_IMAGES)
    image: ImageValue | None = None
    mask: ImageValue | None = None
    strength: Float | None = Field(None, gt=0.0, le=1.0)
    scheduler: Annotated[Literal[SCHEDULERS], BeforeValidator(_scheduler_name)] = "K_EULER"
    output_format: Annotated[Literal[OUTPUT_FORMATS],
                             BeforeValidator(lambda v: "jpeg" if _lower(v) == "jpg"
                                             else _lower(v))] = "png"
    quality: Int = Field(90, ge=1, le=100)
    disable_safety_checker: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty or blank")
        return value

    @model_validator(mode="after")
    def _mask_needs_image(self) -> GenerateRequest:
        if self.mask is not None and self.image is None:
            raise ValueError("mask needs an init image: set `image` too")
        return self

    @property
    def mode(self) -> str:
        """txt2img, img2img (an init image) or inpaint (an init image and a mask)."""
        if self.image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"


def merge_aliases(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Rename other providers' field names to ours; two names for one field must agree."""
    merged: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name in merged and merged[name] != value:
            given = [k for k in raw if ALIASES.get(k, k) == name]
            raise ValueError(f"invalid input: {' and '.join(given)} name the same field "
                             f"({name}) with different values: "
                             f"{', '.join(_shown(raw[k]) for k in given)}")
        merged[name] = value
    return merged


def _shown(value: Any, limit: int = 60) -> str:
    """A short repr of a bad value: enough to recognise it, never a whole prompt or image."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _describe(error: Mapping[str, Any]) -> str:
    if not error["loc"]:  # a rule across fields (model validator)
        return str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field[:100], RULES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field {_shown(field, 40)}: {hint}allowed fields are {', '.join(RULES)}"
    if error["type"] == "missing":
        return f"{field} is required: {RULES.get(field, 'a value')}"
    reason = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}={_shown(error['input'])} is invalid ({reason}); allowed: " \
           f"{RULES.get(field, 'see the API table')}"


MAX_NAMED_UNKNOWN = 5  # a job of a million junk keys must still get a short error


def _unknown_fields(names: list[str]) -> str:
    if len(names) == 1:
        return _describe({"loc": (names[0],), "type": "extra_forbidden"})
    shown = ", ".join(_shown(name, 40) for name in names[:MAX_NAMED_UNKNOWN])
    more = f" and {len(names) - MAX_NAMED_UNKNOWN} more" if len(names) > MAX_NAMED_UNKNOWN else ""
    return f"unknown fields {shown}{more}: allowed fields are {', '.join(RULES)}"


def format_validation_error(exc: ValidationError) -> str:
    """One line naming every bad field, its value and what is allowed."""
    messages: dict[str, None] = {}  # one message per field, in order (unions report branches)
    fields: set[str] = set()
    unknown: list[str] = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            unknown.append(field)
        elif not field or field not in fields:
            fields.add(field)
            messages.setdefault(_describe(error), None)
    if unknown:
        messages[_unknown_fields(unknown)] = None
    return "invalid input: " + "; ".join(messages)


def parse_request(raw: Any) -> GenerateRequest:
    """Validate ``job["input"]``; raises ``ValueError`` with a caller-facing message."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"invalid input: expected a JSON object, got {type(raw).__name__}")
    merged = merge_aliases(raw)
    try:
        return GenerateRequest.model_validate(merged)
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


def _parse_safety(text: str) -> str:
    if text.strip().lower() == "always":
        return "always"
    try:
        return "on" if _parse_bool("SAFETY_CHECKER", text) else "off"
    except ValueError:
        raise ValueError(f"SAFETY_CHECKER={text!r} is invalid: use false, true or always") from None


def _parse_buckets(name: str, text: str) -> tuple[tuple[int, int], ...]:
    """``1024x1024,832x1216``: sizes the worker can serve, multiples of 8 within the range."""
    buckets = []
    for part in filter(None, text.replace(" ", "").lower().split(",")):
        try:
            width, height = (int(side) for side in part.split("x"))
        except ValueError:
            width = height = 0
        if not all(MIN_SIDE <= side <= MAX_SIDE and side % SIDE_MULTIPLE == 0
                   for side in (width, height)):
            raise ValueError(f"{name}={text!r} is invalid: WIDTHxHEIGHT pairs, comma-separated, "
                             f"multiples of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}")
        buckets.append((width, height))
    if not buckets:
        raise ValueError(f"{name}={text!r} is invalid: name at least one WIDTHxHEIGHT")
    return tuple(dict.fromkeys(buckets))


def _parse_choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in choices:
        raise ValueError(f"{name}={text!r} is invalid: one of {', '.join(choices)}")
    return value


def _parse_int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ValueError(f"{name}={text!r} is invalid: an integer from {low} to {high}")
    return value


# Jobs one worker holds at once. 2 keeps the GPU busy while the previous job is decoded,
# encoded and sent, at about twice a lone job's latency; on the CPU (bench/RESULTS.md,
# "Throughput") 4 and 8 only queued longer. Whether larger GPU batches are cheaper per image
# at 1024² needs `bench/throughput.py --device cuda`: raise it where they are.
DEFAULT_CONCURRENCY = 2
BUCKET_ENV = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
              "BUCKET_NAME")


class Settings(BaseModel):
    """Worker settings, read once at start from environment variables."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path | None = None  # None: search the locations in model_location.py
    lightning_steps: tuple[int, ...] = (4,)
    warmup: bool = True
    download_missing: bool = True
    max_concurrency: int = DEFAULT_CONCURRENCY
    max_batch_images: int = 8  # images per GPU batch: bounds activation memory on 24 GB cards
    safety_checker: Literal["off", "on", "always"] = "off"  # on: callers may disable it per job
    # RunPod drops results over 10 MB on /run (20 MB on /runsync): refuse clearly instead.
    max_response_mb: float = 10.0
    vae_decoder: Literal["full", "tiny"] = "full"  # tiny: TAESDXL, for previews and speed
    device: Literal["auto", "cuda", "cpu"] = "auto"  # the image sets cuda: no GPU, no jobs
    compile: bool = False  # torch.compile the UNet; see compilation.py for the start-up cost
    compile_buckets: tuple[tuple[int, int], ...] = ((1024, 1024),)
    compile_cache_dir: Path | None = None
    bucket: Mapping[str, str] = {}  # the BUCKET_* variables that are set; upload.py reads them

    # Environment variable -> field. The README and hub.json list exactly these.
    ENV: ClassVar[Mapping[str, str]] = {
        "MODEL_DIR": "model_dir", "LIGHTNING_STEPS": "lightning_steps", "WARMUP": "warmup",
        "DOWNLOAD_MISSING_WEIGHTS": "download_missing", "MAX_CONCURRENCY": "max_concurrency",
        "MAX_BATCH_IMAGES": "max_batch_images", "SAFETY_CHECKER": "safety_checker",
        "MAX_RESPONSE_MB": "max_response_mb", "VAE_DECODER": "vae_decoder",
        "COMPILE": "compile", "COMPILE_BUCKETS": "compile_buckets",
        "COMPILE_CACHE_DIR": "compile_cache_dir", "DEVICE": "device",
        **{name: "bucket" for name in BUCKET_ENV}}
    _PARSE: ClassVar[Mapping[str, Callable[[str, str], Any]]] = {
        "model_dir": lambda name, text: Path(text).expanduser(),
        "lightning_steps": lambda name, text: _parse_steps(text),
        "warmup": _parse_bool, "download_missing": _parse_bool,
        "safety_checker": lambda name, text: _parse_safety(text),
        "max_concurrency": lambda name, text: _parse_int(name, text, 1, 64),
        "max_batch_images": lambda name, text: _parse_int(name, text, 1, 64),
        "max_response_mb": lambda name, text: float(_parse_int(name, text, 1, 1024)),
        "vae_decoder": lambda name, text: _parse_choice(name, text, ("full", "tiny")),
        "device": lambda name, text: _parse_choice(name, text, ("auto", "cuda", "cpu")),
        "compile": _parse_bool,
        "compile_buckets": _parse_buckets,
        "compile_cache_dir": lambda name, text: Path(text).expanduser(),
    }

    @property
    def load_safety_checker(self) -> bool:
        return self.safety_checker != "off"

    @property
    def tiny_decoder(self) -> bool:
        return self.vae_decoder == "tiny"

    def safety_for(self, request: GenerateRequest) -> tuple[bool, list[str]]:
        """Whether a job's images are checked, and a warning if its wish was overruled."""
        if self.safety_checker == "off":
            return False, []
        if not request.disable_safety_checker:
            return True, []
        if self.safety_checker == "on":
            return False, []
        return True, ["disable_safety_checker was ignored: this worker always runs the "
                      "safety checker (SAFETY_CHECKER=always)"]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Build settings from ``env``; raises ``ValueError`` naming a bad variable."""
        values: dict[str, Any] = {"bucket": {n: env[n] for n in BUCKET_ENV if env.get(n)}}
        for name, key in cls.ENV.items():
            if env.get(name) and key in cls._PARSE:
                values[key] = cls._PARSE[key](name, env[name])
        return cls(**values)
