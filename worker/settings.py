"""The worker's settings: every environment variable it reads, parsed once at start.

``Settings.ENV`` is the one list of variable names (``.runpod/hub.json`` lists exactly these, a
test holds them equal; the README's settings table lists them and runpod's RUNPOD_LOG_LEVEL).
Precedence: a variable that is set and non-empty wins; otherwise the field's default. A bad
value raises ``StartupError`` naming the variable, its value and what is allowed: the worker
stops before taking a job. Pure: pydantic and the model spec only, no torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas import MAX_GUIDANCE, MAX_LORA_ENTRIES, MAX_SIDE, MIN_SIDE, SCHEDULERS, SIDE_MULTIPLE
from worker.errors import StartupError
from worker.plan import schedulers_for
from worker.spec import CHECKPOINTS, LORAS, ModelSpec

log = logging.getLogger(__name__)

# Jobs one worker holds at once. 2 keeps the GPU busy while the previous job is decoded,
# encoded and sent, at about twice a lone job's latency; on the CPU (bench/RESULTS.md,
# "Throughput") 4 and 8 only queued longer. Whether larger GPU batches are cheaper per image
# at 1024² needs `python -m bench.throughput --device cuda`: raise it where they are.
DEFAULT_CONCURRENCY = 2
# RunPod's bucket convention (rp_upload): the worker's own upload target, read by outputs/upload.
BUCKET_ENV = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY",
              "BUCKET_NAME")
# Variables that were renamed, old -> new: an endpoint still setting the old name keeps its
# value (with a warning in the log) rather than silently running with the default.
RENAMED = {"COMPILE_BUCKETS": "COMPILE_SIZES"}


def _parse_steps(name: str, text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(part) for part in text.replace(" ", "").split(",") if part}))
    except ValueError:
        steps = ()
    if not steps or any(s not in CHECKPOINTS for s in steps):
        raise StartupError(f"{name}={text!r} is invalid: a comma-separated subset of "
                           f"{sorted(CHECKPOINTS)}")
    return steps


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise StartupError(f"{name}={text!r} is invalid: use true or false")


def _parse_safety(name: str, text: str) -> str:
    if text.strip().lower() == "always":
        return "always"
    try:
        return "on" if _parse_bool(name, text) else "off"
    except StartupError:
        raise StartupError(f"{name}={text!r} is invalid: use false, true or always") from None


def _parse_sizes(name: str, text: str) -> tuple[tuple[int, int], ...]:
    """``1024x1024,832x1216``: sizes the worker can serve, multiples of 8 within the range."""
    sizes = []
    for part in filter(None, text.replace(" ", "").lower().split(",")):
        try:
            width, height = (int(side) for side in part.split("x"))
        except ValueError:
            width = height = 0
        if not all(MIN_SIDE <= side <= MAX_SIDE and side % SIDE_MULTIPLE == 0
                   for side in (width, height)):
            raise StartupError(f"{name}={text!r} is invalid: WIDTHxHEIGHT pairs, comma-"
                               f"separated, multiples of {SIDE_MULTIPLE} from {MIN_SIDE} to "
                               f"{MAX_SIDE}")
        sizes.append((width, height))
    if not sizes:
        raise StartupError(f"{name}={text!r} is invalid: name at least one WIDTHxHEIGHT")
    return tuple(dict.fromkeys(sizes))


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise StartupError(f"{name}={text!r} is invalid: one of {', '.join(choices)}")
        return value

    return parse


def _int_range(low: int, high: int) -> Callable[[str, str], int]:
    def parse(name: str, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise StartupError(f"{name}={text!r} is invalid: an integer from {low} to {high}")
        return value

    return parse


def _path(name: str, text: str) -> Path:
    return Path(text).expanduser()


def lora_env() -> dict[str, str]:
    """The per-job LoRA variables (worker/adapters) -> Settings fields."""
    return {"LORA_DIR": "lora_dir", "LORA_CACHE_DIR": "lora_cache_dir",
            "LORA_CACHE_GB": "lora_cache_gb", "LORA_MAX_MB": "lora_max_mb",
            "MAX_LORAS": "max_loras", "ALLOW_LORA_URLS": "allow_lora_urls"}


def lora_parsers() -> dict[str, Callable[[str, str], Any]]:
    return {"lora_dir": _path, "lora_cache_dir": _path,
            "lora_cache_gb": lambda name, text: float(_int_range(1, 10_000)(name, text)),
            "lora_max_mb": _int_range(1, 16_384), "max_loras": _int_range(0, MAX_LORA_ENTRIES),
            "allow_lora_urls": _parse_bool}


def _parse_step_range(name: str, text: str) -> tuple[int, int]:
    """``4-8`` (or ``6``): the step counts a Lightning merge (LIGHTNING_MODE=none) accepts."""
    low, _, high = text.replace(" ", "").partition("-")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1] <= MAX_MERGE_STEPS:
        raise StartupError(f"{name}={text!r} is invalid: LOW-HIGH step counts from 1 to "
                           f"{MAX_MERGE_STEPS}, e.g. 4-8")
    return bounds


def _parse_float(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            value = float("nan")
        if not low <= value <= high:  # NaN fails too
            raise StartupError(f"{name}={text!r} is invalid: a number from {low:g} to {high:g}")
        return value

    return parse


def _parse_scheduler(name: str, text: str) -> str:
    by_lower = {s.lower(): s for s in SCHEDULERS}
    if text.strip().lower() not in by_lower:
        raise StartupError(f"{name}={text!r} is invalid: one of {', '.join(SCHEDULERS)}")
    return by_lower[text.strip().lower()]


# A Lightning merge's allowed steps, when STEPS_RANGE is unset: merges recommend 4-8 (their
# cards); 1-12 also takes the 2- and 10-step advice some give, and 12 steps is still seconds.
DEFAULT_MERGE_RANGE = (1, 12)
MAX_MERGE_STEPS = 50  # past that a "Lightning" model is not one; also bounds warm-up


class Settings(BaseModel):
    """Worker settings, read once at start from environment variables."""

    model_config = ConfigDict(frozen=True)

    model_dir: Path | None = None  # None: search the locations in worker/location.py
    lightning_steps: tuple[int, ...] = (4,)
    warmup: bool = True
    download_missing: bool = True
    max_concurrency: int = DEFAULT_CONCURRENCY
    max_batch_images: int = 8  # images per GPU batch: bounds activation memory on 24 GB cards
    safety_mode: Literal["off", "on", "always"] = "off"  # on: callers may disable it per job
    # RunPod drops results over 10 MB on /run (20 MB on /runsync): refuse clearly instead.
    max_response_mb: float = 10.0
    # All of a job's uploads together (outputs/delivery.UPLOAD_DEADLINE_S says why a minute).
    upload_deadline_s: float = 60.0
    vae_decoder: Literal["full", "tiny"] = "full"  # tiny: TAESDXL, for previews and speed
    device: Literal["auto", "cuda", "cpu"] = "auto"  # the image sets cuda: no GPU, no jobs
    compile: bool = False  # torch.compile the UNet; see worker/engine/compiler.py for the cost
    compile_sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    compile_cache_dir: Path | None = None
    bucket_env: Mapping[str, str] = {}  # the BUCKET_* variables that are set (outputs/upload)
    # HTTP mode (RunPod load-balancing endpoints): see worker/frontdoor. RunPod's default PORT
    # is 80, and PORT_HEALTH defaults to PORT.
    worker_mode: Literal["queue", "http"] = "queue"
    host: str = "0.0.0.0"  # noqa: S104 - RunPod's proxy reaches the container on its address
    port: int = 80
    port_health_setting: int | None = None
    # Requests that may wait for a slot beyond MAX_CONCURRENCY; the next one gets 429 at once
    # (load-balancing endpoints have no queue of their own: waiting longer only times out).
    max_waiting: int = 8
    api_key: str | None = Field(None, repr=False)  # a secret: never in a repr or a log line
    # Per-job LoRAs (worker/adapters). None: /runpod-volume/loras when the network volume is
    # mounted, else <model folder>/loras (worker/adapters/store.default_lora_dir).
    lora_dir: Path | None = None
    lora_cache_dir: Path | None = None  # None: <temp dir>/lora-cache
    lora_cache_gb: float = 10.0  # the disk cache of downloaded LoRAs; LRU beyond it
    lora_max_mb: int = 1024  # one download; SDXL LoRAs are 10-900 MB (rank 4-256)
    max_loras: int = 4  # per job: each adds a merge per batch
    allow_lora_urls: bool = True  # false: only files on the volume (LORA_DIR)
    # Your own model (worker/engine/base_model.py): BASE_MODEL is an SDXL diffusers folder or
    # single .safetensors file; LIGHTNING_MODE unet/lora/none (None: unet for SDXL base, lora
    # for BASE_MODEL). The DEFAULT_* fill a request's unset fields (a merge's own
    # recommendations); STEPS_RANGE is what a merge (mode none) accepts.
    base_model: str | None = None
    lightning_mode: Literal["unet", "lora", "none"] | None = None
    lora_scale: float = 1.0
    default_steps: int | None = None
    default_guidance: float | None = None
    default_scheduler: str | None = None
    steps_range: tuple[int, int] | None = None

    # Environment variable -> field. The README and hub.json list exactly these.
    ENV: ClassVar[Mapping[str, str]] = {
        "MODEL_DIR": "model_dir", "LIGHTNING_STEPS": "lightning_steps", "WARMUP": "warmup",
        "DOWNLOAD_MISSING_WEIGHTS": "download_missing", "MAX_CONCURRENCY": "max_concurrency",
        "MAX_BATCH_IMAGES": "max_batch_images", "SAFETY_CHECKER": "safety_mode",
        "MAX_RESPONSE_MB": "max_response_mb", "UPLOAD_DEADLINE_S": "upload_deadline_s",
        "VAE_DECODER": "vae_decoder",
        "COMPILE": "compile", "COMPILE_SIZES": "compile_sizes",
        "COMPILE_CACHE_DIR": "compile_cache_dir", "DEVICE": "device",
        "WORKER_MODE": "worker_mode", "HOST": "host", "PORT": "port",
        "PORT_HEALTH": "port_health_setting", "MAX_WAITING": "max_waiting", "API_KEY": "api_key",
        **lora_env(),
        "BASE_MODEL": "base_model", "LIGHTNING_MODE": "lightning_mode",
        "LIGHTNING_LORA_SCALE": "lora_scale", "DEFAULT_STEPS": "default_steps",
        "DEFAULT_GUIDANCE": "default_guidance", "DEFAULT_SCHEDULER": "default_scheduler",
        "STEPS_RANGE": "steps_range",
        **{name: "bucket_env" for name in BUCKET_ENV}}
    _PARSE: ClassVar[Mapping[str, Callable[[str, str], Any]]] = {
        "model_dir": _path, "lightning_steps": _parse_steps, "warmup": _parse_bool,
        "download_missing": _parse_bool, "safety_mode": _parse_safety,
        "max_concurrency": _int_range(1, 64), "max_batch_images": _int_range(1, 64),
        "max_response_mb": lambda name, text: float(_int_range(1, 1024)(name, text)),
        "upload_deadline_s": lambda name, text: float(_int_range(1, 3600)(name, text)),
        "vae_decoder": _choice("full", "tiny"), "device": _choice("auto", "cuda", "cpu"),
        "compile": _parse_bool, "compile_sizes": _parse_sizes, "compile_cache_dir": _path,
        "worker_mode": _choice("queue", "http"), "host": lambda name, text: text.strip(),
        "port": _int_range(1, 65535), "port_health_setting": _int_range(1, 65535),
        "max_waiting": _int_range(0, 1024), "api_key": lambda name, text: text.strip(),
        **lora_parsers(),
        "base_model": lambda name, text: text.strip(),
        "lightning_mode": _choice("unet", "lora", "none"),
        # 2: the DMD2 authors ran their distillation LoRA at 0.75 on fine-tunes, users 0.5;
        # past 2 the distilled update overshoots.
        "lora_scale": _parse_float(0.0, 2.0), "default_steps": _int_range(1, MAX_MERGE_STEPS),
        "default_guidance": _parse_float(0.0, MAX_GUIDANCE),
        "default_scheduler": _parse_scheduler, "steps_range": _parse_step_range,
    }

    @property
    def port_health(self) -> int:
        return self.port_health_setting or self.port

    @property
    def model_spec(self) -> ModelSpec:
        """The checkpoints and optional components these settings make the worker load."""
        if self.base_model is not None or self.lightning_mode not in (None, "unet"):
            return self._own_model_spec()
        return ModelSpec(steps=self.lightning_steps, safety_checker=self.safety_mode != "off",
                         tiny_decoder=self.vae_decoder == "tiny")

    @property
    def mode(self) -> str:
        """LIGHTNING_MODE in effect: unset means unet on SDXL base, lora on BASE_MODEL."""
        return self.lightning_mode or ("unet" if self.base_model is None else "lora")

    def _own_model_spec(self) -> ModelSpec:
        """BASE_MODEL's spec; a mode that cannot work is a ``StartupError`` naming why."""
        mode = self.mode
        if self.base_model is None:
            raise StartupError(
                f"LIGHTNING_MODE={mode} needs BASE_MODEL (your SDXL model): on SDXL base itself "
                f"the full Lightning UNets are better (ByteDance's model card), which "
                f"LIGHTNING_MODE=unet serves")
        if mode == "lora" and (bad := [s for s in self.lightning_steps if s not in LORAS]):
            raise StartupError(
                f"LIGHTNING_MODE=lora cannot serve LIGHTNING_STEPS "
                f"{','.join(map(str, bad))}: ByteDance publishes Lightning LoRAs for "
                f"{', '.join(map(str, LORAS))} steps only (there is no 1-step LoRA); set "
                f"LIGHTNING_STEPS to a subset of {','.join(map(str, LORAS))}, or use "
                f"LIGHTNING_MODE=unet for the 1-step UNet")
        if mode == "none":
            low, high = self.steps_range or DEFAULT_MERGE_RANGE
            steps = tuple(range(low, high + 1))
        else:
            if self.steps_range is not None:
                raise StartupError(f"STEPS_RANGE applies to LIGHTNING_MODE=none (a Lightning "
                                   f"merge) only; LIGHTNING_MODE={mode} serves LIGHTNING_STEPS")
            steps = self.lightning_steps
        return ModelSpec(steps=steps, safety_checker=self.safety_mode != "off",
                         tiny_decoder=self.vae_decoder == "tiny", base_model=self.base_model,
                         lightning_mode=mode, lora_scale=self.lora_scale)

    def request_defaults(self) -> dict[str, object]:
        """Request fields the operator's DEFAULT_* set (a merge's own recommendations), filled
        in where a request leaves them unset."""
        return {field: value for field, value in (
            ("num_inference_steps", self.default_steps),
            ("guidance_scale", self.default_guidance),
            ("scheduler", self.default_scheduler)) if value is not None}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Build settings from ``env``; raises ``StartupError`` naming a bad variable."""
        env = dict(env)
        for old, new in RENAMED.items():
            if not env.get(old):
                continue
            if env.get(new) and env[new] != env[old]:
                raise StartupError(f"{old} and {new} are both set, to different values: {old} "
                                   f"is the old name of {new}; set only {new}")
            log.warning("%s is deprecated: it was renamed %s (read as %s)", old, new, new)
            env[new] = env[old]
        values: dict[str, Any] = {"bucket_env": {n: env[n] for n in BUCKET_ENV if env.get(n)}}
        for name, key in cls.ENV.items():
            if env.get(name) and key in cls._PARSE:
                values[key] = cls._PARSE[key](name, env[name])
        settings = cls(**values)
        settings.check_model()
        return settings

    def check_model(self) -> None:
        """A model setting that cannot work (LIGHTNING_MODE, DEFAULT_STEPS) stops the start."""
        steps = self.model_spec.steps  # raises for a mode that cannot work
        if self.default_steps is not None and self.default_steps not in steps:
            allowed = (f"STEPS_RANGE {steps[0]}-{steps[-1]}" if self.mode == "none"
                       else f"LIGHTNING_STEPS {','.join(map(str, steps))}")
            raise StartupError(f"DEFAULT_STEPS={self.default_steps} is not served: it must be "
                               f"within {allowed}")
        if self.default_scheduler is not None and self.mode == "unet":
            cannot = [s for s in steps if self.default_scheduler not in schedulers_for(s)]
            if cannot:  # else every job that leaves the scheduler unset would be refused
                raise StartupError(f"DEFAULT_SCHEDULER={self.default_scheduler} cannot run the "
                                   f"{cannot[0]}-step checkpoint these LIGHTNING_STEPS load; "
                                   f"use one of {', '.join(schedulers_for(cannot[0]))}")
