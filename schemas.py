"""The job contract: the request model, its bounds, aliases, rules and error text.

Pydantic v2 only; no torch import, so this module loads in milliseconds and is tested alone.
Every default and bound of the API lives here, and ``parse_request`` turns whatever a caller
sent into a ``GenerateRequest`` or an ``InputError`` naming every bad field, its value and what
is allowed. Snapping and clamping (which change a value and say so in ``warnings``) live in
``worker/plan.py``; what is rejected outright is decided here. The worker's own settings are in
``worker/settings.py``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from itertools import compress
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.errors import InputError, shown

# Lightning was distilled at 1024 px (SDXL's ~1 MP buckets); below 512 SDXL falls apart and above
# 1536 memory and time grow with no training behind it. diffusers needs multiples of 8 (the VAE).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 512, 1536, 8
MAX_IMAGES = 4  # Replicate's cap; larger batches belong in a bucket, not a JSON result
MAX_GUIDANCE = 20.0
SEED_LIMIT = 2**32  # torch accepts 64-bit seeds; 32 bits is what every client can round-trip
MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens; anything this long is a mistake or an attack
CLIP_MAX_TOKENS = 77
SHOWN_CHARS = 60  # how much of a bad value an error quotes (field names: errors.shown's 40)


def _not_bool(value: Any) -> Any:
    """Pydantic's lax mode reads true/false as 1/0; for this API a boolean is never a number."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Text = Annotated[str, Field(strict=True, max_length=MAX_PROMPT_CHARS)]
# An encoded image: base64 (raw or data URI), an https URL, or Cloudflare's array of byte values.
# Only the JSON type is checked here; worker/inputs/images.py decodes it within its limits.
ImageValue = Annotated[str, Field(strict=True)] | Annotated[list[Any], Field(strict=True)]

# Replicate's scheduler names (the API users know). The default is what Lightning was distilled
# for; pipeline.SCHEDULERS builds each, on trailing timesteps, and README lists their cost.
SCHEDULERS = ("K_EULER", "K_EULER_ANCESTRAL", "DDIM", "DPMSolverMultistep", "KarrasDPM",
              "DPM++2MSDE", "HeunDiscrete", "PNDM")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# Which mask pixels repaint: ours and A1111's (white), A1111's inverted (black), OpenAI's
# (fully transparent: the mask must have an alpha channel).
MASK_MODES = ("white", "black", "transparent")
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # inpainting repaints the masked area fully

# Other providers' names for our fields (Cloudflare Workers AI, Replicate/Eachlabs, Runflow), so
# their clients work unchanged apart from the URL.
ALIASES = {"num_steps": "num_inference_steps", "steps": "num_inference_steps",
           "guidance": "guidance_scale", "num_outputs": "num_images", "image_b64": "image"}

# Per-job LoRAs (fal's field names, so its clients carry over). The list may be longer than the
# worker's MAX_LORAS (cut, with a warning, by worker/adapters/store.py) but not unbounded; scales
# outside LORA_SCALES are clamped there too: past +-2..4 a LoRA only burns the image.
MAX_LORA_ENTRIES = 16
LORA_SCALES = (-2.0, 4.0)
MAX_LORA_PATH_CHARS = 2048


# Textual-inversion embeddings (fal's field names): SDXL files hold one vector set per encoder.
MAX_EMBEDDINGS = 4
DEFAULT_EMBEDDING_TOKENS = ("<s0>", "<s1>")  # what fal's and Replicate's SDXL trainers write
MAX_TOKEN_CHARS = 64

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
    "mask_mode": "which mask pixels repaint: white (default), black, or transparent (alpha 0; "
                 "the mask needs an alpha channel)",
    "preview": "true or false: a small JPEG of each step's estimate in the progress updates",
    "loras": f"a list of at most {MAX_LORA_ENTRIES} objects {{\"path\": a .safetensors file "
             f"name in LORA_DIR or an https URL, \"scale\": a number, default 1, "
             f"{LORA_SCALES[0]:g} to {LORA_SCALES[1]:g}}}; the worker uses at most MAX_LORAS",
    "embeddings": f"a list of at most {MAX_EMBEDDINGS} objects {{\"path\": an SDXL "
                  f"textual-inversion .safetensors (clip_l and clip_g) in LORA_DIR or an https "
                  f"URL, \"tokens\": the words that stand for its vectors, default "
                  f"[\"<s0>\", \"<s1>\"]}}",
    "prompt_weighting": "true (default) or false: A1111 syntax (word:1.3), (word), [word], \\( "
                        "for a literal bracket, and prompts past 77 CLIP tokens in 77-token "
                        "chunks; false: the text as written, cut at 77 tokens",
}


class LoraInput(BaseModel):
    """One entry of ``loras``: a file name inside LORA_DIR or an https URL, and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_LORA_PATH_CHARS)]
    scale: Float = 1.0


Token = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_TOKEN_CHARS,
                             pattern=r"^\S+$")]


class EmbeddingInput(BaseModel):
    """One entry of ``embeddings``: the file and the prompt words that stand for its vectors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_LORA_PATH_CHARS)]
    tokens: tuple[Token, ...] = Field(DEFAULT_EMBEDDING_TOKENS, min_length=1, max_length=16)


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
    mask_mode: Annotated[Literal[MASK_MODES], BeforeValidator(_lower)] = "white"
    preview: bool = False
    loras: tuple[LoraInput, ...] = Field((), max_length=MAX_LORA_ENTRIES)
    embeddings: tuple[EmbeddingInput, ...] = Field((), max_length=MAX_EMBEDDINGS)
    prompt_weighting: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty or blank")
        return value

    @model_validator(mode="after")
    def _tokens_are_distinct(self) -> GenerateRequest:
        tokens = [token for entry in self.embeddings for token in entry.tokens]
        if len(set(tokens)) != len(tokens):
            raise ValueError("embeddings: each token may stand for one embedding only; "
                             "give each embedding its own tokens")
        return self

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


# Fields whose entries are objects: their keys, for errors inside an entry.
NESTED = {"loras": tuple(LoraInput.model_fields),
          "embeddings": tuple(EmbeddingInput.model_fields)}


def merge_aliases(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Rename other providers' field names to ours; two names for one field must agree."""
    merged: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name in merged and merged[name] != value:
            given = [k for k in raw if ALIASES.get(k, k) == name]
            raise InputError(f"invalid input: {' and '.join(given)} name the same field "
                             f"({name}) with different values: "
                             f"{', '.join(shown(raw[k], SHOWN_CHARS) for k in given)}")
        merged[name] = value
    return merged


def _describe(error: Mapping[str, Any]) -> str:
    if not error["loc"]:  # a rule across fields (model validator)
        return str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0])
    if len(error["loc"]) > 1 and field in NESTED:  # inside a list entry: name the entry's key
        where = field + "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                                for part in error["loc"][1:])
        if error["type"] == "extra_forbidden":
            return f"unknown field {shown(where, SHOWN_CHARS)}: an entry of {field} takes " \
                   f"{', '.join(NESTED[field])}"
        reason = str(error["msg"]).removeprefix("Value error, ")
        return f"{where}={shown(error['input'], SHOWN_CHARS)} is invalid ({reason}); " \
               f"allowed: {RULES[field]}"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field[:100], RULES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field {shown(field)}: {hint}allowed fields are {', '.join(RULES)}"
    if error["type"] == "missing":
        return f"{field} is required: {RULES.get(field, 'a value')}"
    reason = str(error["msg"]).removeprefix("Value error, ")
    return f"{field}={shown(error['input'], SHOWN_CHARS)} is invalid ({reason}); allowed: " \
           f"{RULES.get(field, 'see the API table')}"


# No field needs more than one level (Cloudflare's byte-array image is a flat list of numbers);
# the limit leaves room for structured fields. Deeper values are refused before anything walks
# them recursively: pydantic's error repr and the alias comparison hit Python's 1,000-frame limit
# (RecursionError) at ~1,000 levels.
MAX_NESTING = 8
_CONTAINER = frozenset({dict, list, tuple}).__contains__  # exact types: what JSON decodes to


def nests_deeper(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` has lists/objects more than ``limit`` levels inside each other.

    Level by level, without recursion; a flat list is scanned at C speed (``map``/``compress``),
    so a 5-million-entry byte array costs a fraction of a second, not a Python loop per entry.
    """
    level = [value] if _CONTAINER(type(value)) else []
    for _ in range(limit):
        inner: list[Any] = []
        for item in level:
            children = list(item.values()) if isinstance(item, dict) else item
            inner.extend(compress(children, map(_CONTAINER, map(type, children))))
        if not inner:
            return False
        level = inner
    return bool(level)


MAX_NAMED_UNKNOWN = 5  # a job of a million junk keys must still get a short error


def _unknown_fields(names: list[str]) -> str:
    if len(names) == 1:
        return _describe({"loc": (names[0],), "type": "extra_forbidden"})
    named = ", ".join(shown(name) for name in names[:MAX_NAMED_UNKNOWN])
    more = f" and {len(names) - MAX_NAMED_UNKNOWN} more" if len(names) > MAX_NAMED_UNKNOWN else ""
    return f"unknown fields {named}{more}: allowed fields are {', '.join(RULES)}"


def format_validation_error(exc: ValidationError) -> str:
    """One line naming every bad field, its value and what is allowed."""
    messages: dict[str, None] = {}  # one message per field, in order (unions report branches)
    fields: set[str] = set()
    unknown: list[str] = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            unknown.append(field)
        elif not field or field not in fields:
            fields.add(field)
            messages.setdefault(_describe(error), None)
    if unknown:
        messages[_unknown_fields(unknown)] = None
    return "invalid input: " + "; ".join(messages)


def parse_request(raw: Any) -> GenerateRequest:
    """Validate ``job["input"]``; raises ``InputError`` with a caller-facing message."""
    if not isinstance(raw, Mapping):
        raise InputError(f"invalid input: expected a JSON object, got {type(raw).__name__}")
    for key, value in raw.items():
        if nests_deeper(value):
            raise InputError(f"invalid input: {shown(key)} nests lists or objects more than "
                             f"{MAX_NESTING} levels deep; no field takes more than one level "
                             f"(see the API table)")
    merged = merge_aliases(raw)
    try:
        return GenerateRequest.model_validate(merged)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None
