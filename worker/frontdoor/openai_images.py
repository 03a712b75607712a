"""OpenAI Images on our job contract: requests to our ``input`` object, our output back.

Pure translation, no I/O: ``generation_input`` and ``edit_input`` turn a
``POST /v1/images/generations`` JSON body or a ``POST /v1/images/edits`` form into our job
input (validated afterwards by ``schemas`` like any job), ``images_response`` turns our output
into OpenAI's ``{"created", "data": [...]}``, and ``error_body`` builds OpenAI's error object.
OpenAI fields we cannot honour are an ``OpenAIFieldError`` (an ``InputError`` naming the field
as OpenAI's ``param``); ones we adjust or ignore come back as warnings (the response header).
Our own fields (``seed``, ``negative_prompt``, ``guidance_scale``, ...) pass through.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from schemas import MAX_IMAGES, RULES
from worker.errors import InputError, shown
from worker.outputs import encoding
from worker.spec import MODEL_NAME

log = logging.getLogger(__name__)

# Fields OpenAI defines that we map or accept (``user`` is an end-user id: ignored by design).
OPENAI_FIELDS = ("prompt", "model", "n", "size", "quality", "response_format", "output_format",
                 "output_compression", "background", "moderation", "style", "stream",
                 "partial_images", "user", "input_fidelity")
# OpenAI's quality levels, as our step counts: more steps where a checkpoint has them (each is
# resolved to the nearest loaded Lightning checkpoint, with a warning when it differs).
QUALITY_STEPS = {"low": 2, "medium": 4, "standard": 4, "auto": None, "high": 8, "hd": 8}
RESPONSE_FORMATS = ("b64_json", "url")
SIZE_RE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")
# Multipart fields arrive as strings (the SDK sends n="2", stream="false"): these are numbers
# or booleans in the JSON API, so a form value is read as JSON when it parses as one.
FORM_SCALARS = ("n", "seed", "guidance_scale", "num_inference_steps", "strength",
                "output_compression", "stream", "partial_images",
                "disable_safety_checker", "num_images", "width", "height")
MODEL_CREATED = 1708387200  # 2024-02-20: ByteDance published SDXL-Lightning


class OpenAIFieldError(InputError):
    """A request OpenAI's API would accept but this worker cannot serve; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_size(value: Any) -> tuple[int, int] | None:
    """``"WxH"`` as (width, height); ``auto`` or absent: None (our default size)."""
    if value is None or value == "auto":
        return None
    match = SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise OpenAIFieldError("size", f"invalid input: size={shown(value)} is invalid; "
                                       f"allowed: \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or "
                                       f"\"auto\"")
    return int(match.group(1)), int(match.group(2))


def generation_input(body: Any, has_bucket: bool) -> tuple[dict[str, Any], str, list[str]]:
    """An images.generate body as (our job input, response_format, warnings)."""
    if not isinstance(body, Mapping):
        raise OpenAIFieldError("", f"invalid input: expected a JSON object, got "
                                   f"{type(body).__name__}")
    fields = dict(body)
    warnings: list[str] = []
    job: dict[str, Any] = {}
    if "prompt" in fields:
        job["prompt"] = fields.pop("prompt")
    fields.pop("user", None)  # an end-user id for OpenAI's abuse tracking: nothing to do here
    model = fields.pop("model", None)
    if model is not None and model != MODEL_NAME:
        warnings.append(f"model {shown(model)} was ignored: this endpoint serves {MODEL_NAME}")
    if (n := fields.pop("n", None)) is not None:
        if type(n) is not int or not 1 <= n <= MAX_IMAGES:
            raise OpenAIFieldError("n", f"invalid input: n={shown(n)} is invalid; allowed: an "
                                        f"integer from 1 to {MAX_IMAGES}")
        job["num_images"] = n
    if (size := parse_size(fields.pop("size", None))) is not None:
        job["width"], job["height"] = size
    _quality(fields.pop("quality", None), fields, job, warnings)
    response_format = fields.pop("response_format", None) or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise OpenAIFieldError("response_format", f"invalid input: response_format="
                               f"{shown(response_format)} is invalid; allowed: b64_json, url")
    if response_format == "url" and not has_bucket:
        raise OpenAIFieldError("response_format", "invalid input: response_format=url needs a "
                               "bucket on this worker (BUCKET_* settings); use b64_json")
    if (fmt := fields.pop("output_format", None)) is not None:
        job["output_format"] = fmt
    if (compression := fields.pop("output_compression", None)) is not None:
        if type(compression) is not int or not 0 <= compression <= 100:
            raise OpenAIFieldError("output_compression", f"invalid input: output_compression="
                                   f"{shown(compression)} is invalid; allowed: 0 to 100")
        job["quality"] = max(compression, 1)  # our JPEG/WebP quality starts at 1
    background = fields.pop("background", None)
    if background not in (None, "auto", "opaque"):
        raise OpenAIFieldError("background", f"invalid input: background={shown(background)} "
                               f"cannot be served (SDXL renders opaque images); allowed: auto, "
                               f"opaque")
    for name in ("moderation", "style", "input_fidelity"):
        if fields.pop(name, None) is not None:
            warnings.append(f"{name} was ignored: it has no SDXL-Lightning counterpart")
    if fields.pop("stream", False) or fields.pop("partial_images", 0):
        raise OpenAIFieldError("stream", "invalid input: streaming is served on POST "
                                         "/v1/generate with \"stream\": true, not here")
    _ours(fields, job)
    return job, response_format, warnings


def _quality(quality: Any, fields: dict[str, Any], job: dict[str, Any],
             warnings: list[str]) -> None:
    if quality is None:
        return
    if not isinstance(quality, str) or quality not in QUALITY_STEPS:
        raise OpenAIFieldError("quality", f"invalid input: quality={shown(quality)} is invalid; "
                                          f"allowed: {', '.join(QUALITY_STEPS)}")
    steps = QUALITY_STEPS[quality]
    if steps is not None and "num_inference_steps" in fields:
        warnings.append(f"quality {quality} was ignored: num_inference_steps is set")
    elif steps is not None:
        job["num_inference_steps"] = steps
        warnings.append(f"quality {quality} runs the {steps}-step checkpoint (or the nearest "
                        f"one loaded)")


def _ours(fields: dict[str, Any], job: dict[str, Any]) -> None:
    """Whatever is left must be one of our own fields; schemas validates and names the rest."""
    for name, value in fields.items():
        if name in job:
            raise OpenAIFieldError(name, f"invalid input: {shown(name)} is set twice (OpenAI's "
                                         f"name and ours)")
        job[name] = value


def edit_input(form: Mapping[str, Any], images: list[bytes], mask: bytes | None,
               has_bucket: bool) -> tuple[dict[str, Any], str, list[str]]:
    """An images.edit form (scalars as strings, files as bytes) as our job input."""
    if not images:
        raise OpenAIFieldError("image", "invalid input: image is required: the picture to edit")
    if len(images) > 1:
        raise OpenAIFieldError("image", f"invalid input: {len(images)} images were sent; this "
                                        f"endpoint edits one image per request")
    body = {name: _form_value(name, value) for name, value in form.items()}
    if "mask_mode" in body:
        raise OpenAIFieldError("mask_mode", "invalid input: mask_mode cannot be set on edits: "
                                            "OpenAI's mask convention (transparent = edit) "
                                            "applies")
    job, response_format, warnings = generation_input(body, has_bucket)
    job["image"] = base64.b64encode(images[0]).decode("ascii")
    if mask is not None:  # OpenAI's convention: fully transparent pixels are the area to edit
        job["mask"] = base64.b64encode(mask).decode("ascii")
        job["mask_mode"] = "transparent"
    return job, response_format, warnings


def _form_value(name: str, value: Any) -> Any:
    if name in FORM_SCALARS and isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
            return value
    return value


def images_response(output: Mapping[str, Any], response_format: str,
                    created: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Our output as OpenAI's images response, and a warning per image the safety checker
    withheld (they are left out); ``OpenAIFieldError`` when it withheld them all."""
    params = output["parameters"]
    data, withheld = [], []
    for item in output["images"]:
        uri = item["image"]
        if uri is None:
            withheld.append(f"image with seed {item['seed']} was withheld by the safety checker")
        elif response_format == "url":
            data.append({"url": uri})
        else:  # b64_json: raw base64, without our data-URI prefix
            data.append({"b64_json": encoding.base64_payload(uri)})
    if not data:
        raise OpenAIFieldError("prompt", "every image was withheld by the safety checker "
                                         "(content_policy_violation)")
    body = {"created": int(time.time()) if created is None else created, "data": data,
            "output_format": params["output_format"], "background": "opaque",
            "size": f"{params['width']}x{params['height']}"}
    return body, withheld


def models_list(served: Mapping[int, tuple[str, str | None]] | None = None) -> dict[str, Any]:
    """``GET /v1/models``: the model this endpoint serves (BASE_MODEL's name when one is set:
    ``pipeline.Engine.served``, step count -> (model, Lightning file))."""
    names = list(dict.fromkeys(model for model, _ in served.values())) if served else [
        MODEL_NAME]
    return {"object": "list", "data": [{"id": name, "object": "model", "created": MODEL_CREATED,
                                        "owned_by": "bytedance" if name == MODEL_NAME
                                        else "operator"} for name in names]}


def param_of(message: str) -> str | None:
    """The field our validation message names first (OpenAI's ``param``), if any."""
    known = "|".join(map(re.escape, sorted({*RULES, *OPENAI_FIELDS}, key=len, reverse=True)))
    found = re.search(rf"\b({known})\b", message)
    return found.group(1) if found else None


def error_body(message: str, *, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: the SDK raises it as ``.message``, ``.type``, ``.param``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
