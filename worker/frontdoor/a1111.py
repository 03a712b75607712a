"""AUTOMATIC1111's ``/sdapi/v1`` on our job contract: its field names in, its response out.

Pure translation, no I/O. ``job_input`` maps a txt2img or img2img body to our job input
(validated afterwards by ``schemas`` like any job); ``images_response`` builds A1111's
``{"images": [raw base64], "parameters": <the request>, "info": <a JSON string>}``; the
``*_listing`` functions answer the read-only routes clients probe on connect. A1111 ignores
unknown keys; here an unknown key is an error naming it, a known A1111 feature we do not run
(hires fix, face restoration, scripts...) is a warning in ``info``, and plumbing fields
(``send_images``, ``eta``, ``hr_*`` while the hires fix is off...) are accepted silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from schemas import MAX_IMAGES
from worker.errors import InputError, shown
from worker.outputs import encoding
from worker.spec import CHECKPOINTS, MODEL_NAME

log = logging.getLogger(__name__)

# A1111's sampler names (v1.9+, and the legacy k-diffusion ids) for our schedulers.
SAMPLERS: dict[str, str] = {
    "Euler": "K_EULER", "Euler a": "K_EULER_ANCESTRAL", "DDIM": "DDIM",
    "DPM++ 2M": "DPMSolverMultistep", "DPM++ 2M Karras": "KarrasDPM",
    "DPM++ 2M SDE": "DPM++2MSDE", "Heun": "HeunDiscrete", "PLMS": "PNDM",
}
SAMPLER_ALIASES: dict[str, str] = {
    "k_euler": "Euler", "k_euler_a": "Euler a", "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_ka": "DPM++ 2M Karras", "k_dpmpp_2m_sde": "DPM++ 2M SDE", "k_heun": "Heun",
    "ddim": "DDIM", "plms": "PLMS",
}
NAME_OF = {ours: name for name, ours in SAMPLERS.items()}  # what ran, in A1111's words
# A1111's schedule names: ours all run trailing timesteps (what A1111 calls sgm_uniform, the
# schedule Lightning needs); "karras" exists for DPM++ 2M only.
SCHEDULES = ("automatic", "sgm_uniform", "karras")
DEFAULT_SAMPLER = "Euler"

MAPPED = frozenset({"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height",
                    "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
                    "denoising_strength", "init_images", "mask", "inpainting_mask_invert"})
# A1111 features this worker does not run, with the value that means "off": any other value is
# reported in info's warnings (the caller asked for something that did not happen).
FEATURES: dict[str, Any] = {
    "enable_hr": False, "restore_faces": False, "tiling": False, "styles": [],
    "subseed_strength": 0, "alwayson_scripts": {}, "script_name": None, "script_args": [],
    "override_settings": {}, "refiner_checkpoint": None,
}
# Plumbing and knobs of features that are off: accepted and ignored silently.
PLUMBING = frozenset({
    "send_images", "save_images", "do_not_save_samples", "do_not_save_grid",
    "override_settings_restore_afterwards", "eta", "s_churn", "s_tmax", "s_tmin", "s_noise",
    "s_min_uncond", "subseed", "seed_resize_from_h", "seed_resize_from_w", "firstphase_width",
    "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
    "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt", "hr_additional_modules", "resize_mode", "image_cfg_scale", "mask_blur",
    "mask_blur_x", "mask_blur_y", "mask_round", "inpainting_fill", "inpaint_full_res",
    "inpaint_full_res_padding", "include_init_images", "initial_noise_multiplier",
    "refiner_switch_at", "disable_extra_networks", "comments", "force_task_id", "infotext",
    "latent_mask", "sampler_index", "user", "clip_skip",
})
IMG2IMG_STRENGTH = 0.75  # A1111's denoising_strength default


def _sampler(body: Mapping[str, Any]) -> str:
    """Our scheduler for A1111's ``sampler_name`` (or ``sampler_index``) and ``scheduler``."""
    given = body.get("sampler_name") or body.get("sampler_index") or DEFAULT_SAMPLER
    if not isinstance(given, str):
        raise InputError(f"invalid input: sampler_name={shown(given)} is invalid; allowed: "
                         f"{', '.join(SAMPLERS)}")
    name = SAMPLER_ALIASES.get(given.strip().lower(), given.strip())
    by_lower = {key.lower(): key for key in SAMPLERS}
    name = by_lower.get(name.lower(), name)
    if name not in SAMPLERS:  # A1111 falls back to Euler silently; a different image is worse
        raise InputError(f"invalid input: sampler_name={shown(given)} is not available here; "
                         f"allowed: {', '.join(SAMPLERS)}")
    schedule = body.get("scheduler") or "automatic"
    if not isinstance(schedule, str) or schedule.strip().lower() not in SCHEDULES:
        raise InputError(f"invalid input: scheduler={shown(schedule)} is not available here; "
                         f"allowed: {', '.join(SCHEDULES)} (every sampler runs trailing "
                         f"timesteps, as Lightning needs)")
    if schedule.strip().lower() == "karras":
        if name not in ("DPM++ 2M", "DPM++ 2M Karras"):
            raise InputError(f"invalid input: scheduler 'karras' is available with sampler "
                             f"'DPM++ 2M' only, not {shown(name)}")
        name = "DPM++ 2M Karras"
    return SAMPLERS[name]


def _count(body: Mapping[str, Any]) -> int | None:
    batch, rounds = body.get("batch_size", 1), body.get("n_iter", 1)
    if body.get("batch_size") is None and body.get("n_iter") is None:
        return None
    for name, value in (("batch_size", batch), ("n_iter", rounds)):
        if type(value) is not int or value < 1:
            raise InputError(f"invalid input: {name}={shown(value)} is invalid; allowed: an "
                             f"integer >= 1 (batch_size x n_iter images, at most {MAX_IMAGES})")
    if batch * rounds > MAX_IMAGES:
        raise InputError(f"invalid input: batch_size {batch} x n_iter {rounds} = "
                         f"{batch * rounds} images; at most {MAX_IMAGES} per request")
    return batch * rounds


def job_input(body: Any, mode: str) -> tuple[dict[str, Any], list[str]]:
    """An A1111 ``txt2img`` or ``img2img`` body as (our job input, warnings)."""
    if not isinstance(body, Mapping):
        raise InputError(f"invalid input: expected a JSON object, got {type(body).__name__}")
    unknown = [key for key in body if key not in MAPPED | PLUMBING | set(FEATURES)]
    if unknown:
        raise InputError(f"invalid input: unknown field(s) {', '.join(map(shown, unknown[:5]))}"
                         f" for /sdapi/v1/{mode}: A1111's fields are accepted, see the README")
    warnings = [f"{name} was ignored: this worker does not run it" for name, off in
                FEATURES.items() if body.get(name, off) not in (off, None)]
    job: dict[str, Any] = {"prompt": body.get("prompt", "")}
    if body.get("sampler_name") or body.get("sampler_index") or body.get("scheduler") not in (
            None, "", "automatic"):  # else the worker's own default (DEFAULT_SCHEDULER) applies
        job["scheduler"] = _sampler(body)
    if body.get("negative_prompt"):
        job["negative_prompt"] = body["negative_prompt"]
    seed = body.get("seed", -1)
    if seed != -1:  # -1: a random seed, as in A1111; anything else is validated as ours
        job["seed"] = seed
    for ours, theirs in (("num_inference_steps", "steps"), ("guidance_scale", "cfg_scale"),
                         ("width", "width"), ("height", "height")):
        if body.get(theirs) is not None:
            job[ours] = body[theirs]
    if (count := _count(body)) is not None:
        job["num_images"] = count
    if mode == "img2img":
        _img2img(body, job)
    return job, warnings


def _img2img(body: Mapping[str, Any], job: dict[str, Any]) -> None:
    images = body.get("init_images")
    if not images or not isinstance(images, list):
        raise InputError("invalid input: init_images is required for img2img: a list with one "
                         "base64 image")
    if len(images) > 1:
        raise InputError(f"invalid input: init_images holds {len(images)} images; this worker "
                         f"takes one per request")
    job["image"] = images[0]
    job["strength"] = body.get("denoising_strength", IMG2IMG_STRENGTH)
    if body.get("mask"):
        job["mask"] = body["mask"]
        invert = body.get("inpainting_mask_invert", 0)
        if invert not in (0, 1, False, True):
            raise InputError(f"invalid input: inpainting_mask_invert={shown(invert)} is "
                             f"invalid; allowed: 0 (repaint white) or 1 (repaint black)")
        job["mask_mode"] = "black" if invert else "white"


def images_response(body: Mapping[str, Any], output: Mapping[str, Any],
                    warnings: Sequence[str]) -> dict[str, Any]:
    """Our output as A1111's response: raw base64 images, the request, ``info`` as JSON text."""
    params = output["parameters"]
    kept = [item for item in output["images"] if item["image"] is not None]
    if not kept:
        raise InputError("every image was withheld by the safety checker")
    warnings = [*warnings, *(f"image with seed {item['seed']} was withheld by the safety "
                             f"checker" for item in output["images"] if item["image"] is None)]
    seeds = [item["seed"] for item in kept]
    sampler = NAME_OF[params["scheduler"]]
    negative = params["negative_prompt"] or ""
    infotext = (f"{params['prompt']}\nNegative prompt: {negative}\nSteps: "
                f"{params['num_inference_steps']}, Sampler: {sampler}, Schedule type: "
                f"{'Karras' if sampler.endswith('Karras') else 'SGM Uniform'}, CFG scale: "
                f"{params['guidance_scale']:g}, Seed: {{seed}}, Size: {params['width']}x"
                f"{params['height']}, Model: {params['checkpoint'] or params['model']}")
    info = {
        "prompt": params["prompt"], "all_prompts": [params["prompt"]] * len(seeds),
        "negative_prompt": negative, "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": params["width"], "height": params["height"],
        "sampler_name": sampler, "cfg_scale": params["guidance_scale"],
        "steps": params["num_inference_steps"], "batch_size": len(seeds),
        "restore_faces": False, "sd_model_name": params["checkpoint"] or params["model"],
        "sd_model_hash": None,
        "denoising_strength": params["strength"], "styles": [], "clip_skip": 1,
        "infotexts": [infotext.replace("{seed}", str(seed)) for seed in seeds],
        "version": MODEL_NAME, "warnings": [*warnings, *output.get("warnings", [])],
    }
    echoed = {**body, "init_images": None, "mask": None} if "init_images" in body else dict(body)
    # A1111 clients b64decode the string as it is: no ``data:`` prefix.
    return {"images": [encoding.base64_payload(item["image"]) for item in kept],
            "parameters": echoed, "info": json.dumps(info)}



def sd_models(steps: Sequence[int],
              served: dict[int, tuple[str, str | None]] | None = None) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: one entry per loaded Lightning checkpoint; with BASE_MODEL
    (``served``, ``pipeline.Engine.served``) the model and its Lightning file (a merge: once)."""
    if served is None:
        names = [CHECKPOINTS[s] for s in steps]
    else:
        names = list(dict.fromkeys(f"{served[s][0]} + {served[s][1]}" if served[s][1]
                                   else served[s][0] for s in steps))
    return [{"title": name.removesuffix(".safetensors"),
             "model_name": name.removesuffix(".safetensors"), "hash": None,
             "sha256": None, "filename": name, "config": None} for name in names]


def options(steps: Sequence[int],
            served: dict[int, tuple[str, str | None]] | None = None) -> dict[str, Any]:
    """``GET /sdapi/v1/options``: what clients read on connect (the current checkpoint)."""
    return {"sd_model_checkpoint": sd_models(steps, served)[-1]["title"],
            "sd_checkpoint_hash": None,
            "samples_format": "png", "CLIP_stop_at_last_layers": 1}


def samplers() -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {}
    for alias, name in SAMPLER_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    return [{"name": name, "aliases": aliases.get(name, []), "options": {}} for name in SAMPLERS]


def schedulers() -> list[dict[str, Any]]:
    return [{"name": name, "label": name.replace("_", " ").title(), "aliases": None,
             "default_rho": -1, "need_inner_model": False} for name in SCHEDULES]


def progress() -> dict[str, Any]:
    """``GET /sdapi/v1/progress``: idle (clients poll it to wait for the server to be ready)."""
    return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
            "state": {"skipped": False, "interrupted": False, "job": "", "job_count": 0,
                      "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                      "sampling_steps": 0}}


def error_body(message: str, status: int) -> dict[str, Any]:
    """A1111's error shape (``{"error", "detail", "body", "errors"}``)."""
    kind = "BadRequest" if status < 500 else "InternalServerError"
    return {"error": kind, "detail": message, "body": "", "errors": message}
