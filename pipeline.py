"""The engine: the only owner of torch and diffusers objects, from model folder to checked images.

``Engine.load(spec, folder, device)`` loads what a ``ModelSpec`` names with the Lightning recipe
(``worker/engine/loading.py``): one pipeline per checkpoint, all sharing the text encoders and
the VAE, so a second checkpoint costs only its UNet. ``engine.generate(plans, on_step)`` runs
plans of one shape as one batch and owns the generation policy:

- one prompt row and one ``torch.Generator`` per image, so an image is the same (within fp
  rounding) alone or batched, and never depends on the global RNG;
- each job's scheduler in its own pipeline view, so no job changes the shared pipelines;
- out of GPU memory with several images: free the cache and run them one at a time, once, then
  fail the job with ``GpuMemoryError``; both outside the ``except`` block, so the failed
  attempt's frames (and the activations they hold) are gone before the retry or the error;
- a checked decode (``worker/engine/decode.py``): no NaN or black image reaches a caller;
- images the safety checker flags are withheld (``None``), never blacked out.

Also ``engine.count_tokens`` (thread-safe, for the truncation warning), ``engine.warm_up``,
``engine.compile`` (``worker/engine/compiler.py``) and ``engine.resident_bytes`` (what the weights
hold, per checkpoint). Out of memory while loading is a ``ModelMemoryError`` saying how much the
weights take and what the GPU has, not a corrupt model folder.
"""

from __future__ import annotations

from worker import runtime

runtime.configure_libraries()  # before diffusers and transformers read their environment

import copy
import gc
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image
from safetensors import SafetensorError

from schemas import MIN_SIDE
from worker.engine import adapters, base_model, compiler, loading, safety, weighting
from worker.engine.decode import decode_latents, preview_jpeg
from worker.errors import JobError, ModelFolderError, StartupError
from worker.plan import BatchStep, Plan, warmup_plan
from worker.spec import CHECKPOINTS, ModelSpec

log = logging.getLogger(__name__)

# Scheduler choices (schemas.SCHEDULERS), each built from the checkpoint's own scheduler config,
# so each keeps trailing timesteps and, for the 1-step checkpoint, x0-prediction. UNet
# evaluations at 4 steps (counted by the tests): Heun 7, PNDM 5, the rest 4. KarrasDPM moves the
# timesteps off the distilled trajectory (999, 687, 146, 0); ancestral/SDE add noise.
SCHEDULERS: dict[str, tuple[type, dict[str, object]]] = {
    "K_EULER": (EulerDiscreteScheduler, {}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    # The real DPM++ 2M SDE (Replicate's "DPM++2MSDE" runs KDPM2-ancestral, 7 evaluations).
    "DPM++2MSDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++",
                                                 "solver_order": 2}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS, as Stable Diffusion configures it
}
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "inpaint": StableDiffusionXLInpaintPipeline,
}
# Warm-up at the smallest allowed size: it initialises CUDA, cuBLAS and every checkpoint's
# kernels for a fraction of a real image's cost.
WARMUP_SIZES = ((MIN_SIDE, MIN_SIDE),)


class GpuMemoryError(JobError):
    """The GPU ran out of memory for a job, even one image at a time."""


class ModelMemoryError(StartupError):
    """The GPU ran out of memory loading the model: the worker cannot serve on it."""


def memory_text(count: float) -> str:
    """Bytes in the README's decimal units: "5.14 GB", "167.3 MB" (the tiny model's modules
    are megabytes, the real ones gigabytes)."""
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def free_gpu_cache() -> None:
    """Give the allocator's cached blocks back, once nothing holds a failed attempt: the
    collection breaks any reference cycle through its frames, whose tensors would otherwise
    stay allocated and cached blocks would stay in use."""
    gc.collect()
    torch.cuda.empty_cache()


class _Estimate:
    """The scheduler's current x0 estimate, caught from ``step`` for previews (Euler, Heun and
    DDIM return it; DPM-Solver++ keeps it as its last model output; else None: the latents)."""

    def __init__(self, scheduler: Any) -> None:
        self.x0: torch.Tensor | None = None
        self._scheduler = scheduler
        step = scheduler.step

        def caught(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            # The SDXL pipelines ask for return_dict=False: (prev_sample, pred_original_sample).
            x0 = (out[1] if isinstance(out, tuple) and len(out) > 1
                  else getattr(out, "pred_original_sample", None))
            outputs = getattr(scheduler, "model_outputs", None)
            if x0 is None and outputs and "++" in str(getattr(scheduler.config,
                                                              "algorithm_type", "")):
                x0 = outputs[-1]
            self.x0 = x0
            return out

        scheduler.step = caught  # this view's scheduler; the GPU thread runs one batch at a time

    def release(self) -> None:
        del self._scheduler.step  # back to the class's method


class Engine:
    """The loaded model and every torch object of the worker; generation runs on one thread."""

    def __init__(self, spec: ModelSpec, pipes: dict[int, StableDiffusionXLPipeline],
                 device: torch.device, dtype: torch.dtype, *, taesd: AutoencoderTiny | None = None,
                 checker: safety.Checker | None = None,
                 previewer: AutoencoderTiny | None = None) -> None:
        self.spec, self.pipes, self.device, self.dtype = spec, pipes, device, dtype
        self.vae = next(iter(pipes.values())).vae  # shared by every checkpoint
        self.taesd = taesd  # TAESDXL, when the spec asks for the tiny decoder
        # TAESDXL decodes per-step previews (``"preview": true``): the tiny decoder when it is
        # the worker's decoder, else loaded beside the full VAE when the folder has it (the
        # Docker image always bakes it; ~10 MB).
        self.previewer = previewer or taesd
        self.checker = checker  # the safety checker, when the spec asks for it
        # BASE_MODEL: steps -> (parameters.model, parameters.checkpoint); None: SDXL-Lightning
        self.served: dict[int, tuple[str, str | None]] | None = None
        # (steps, mode, scheduler) -> a pipeline sharing every module of pipes[steps] but
        # holding its own scheduler, so no job changes the shared pipeline's state. Built on
        # first use (~16 ms each) and reused: generation runs on one thread at a time.
        self._views: dict[tuple[int, str, str], DiffusionPipeline] = {}
        # Token counting runs in request threads while the GPU thread encodes prompts; the Rust
        # tokenizer's padding/truncation state is per object, so counting uses its own copy.
        self._counter = copy.deepcopy(next(iter(pipes.values())).tokenizer)
        self._counter_lock = threading.Lock()
        # Per-job LoRAs, merged into the weights around each batch (worker/engine/adapters.py).
        self.loras = adapters.LoraBank(device, dtype)
        self._prompts: weighting.PromptEncoder | None = None  # compel, built on first use
        self.embeddings = adapters.EmbeddingBank()  # textual inversion, added per batch

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.pipes))

    @classmethod
    def load(cls, spec: ModelSpec, folder: Path, device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> Engine:
        """Load ``spec`` from ``folder`` onto ``device`` (default: CUDA if present, else the
        CPU) in ``dtype`` (default: the device's); ``ModelFolderError`` if it cannot."""
        if device is None:
            device, _ = loading.choose_device("auto")
        dtype = dtype or loading.DTYPES[device.type]
        if missing := spec.missing(folder):
            raise ModelFolderError(f"model folder {folder} is missing {', '.join(missing)}")
        before = loading.gpu_memory(device)  # (free, total), for an out-of-memory message
        try:
            if spec.own_model:  # BASE_MODEL and LIGHTNING_MODE: worker/engine/base_model.py
                pipes = base_model.load_pipes(spec, folder, device, dtype)
            else:
                pipes = cls._load_lightning(spec, folder, device, dtype)
            engine = cls(spec, pipes, device, dtype,
                         taesd=loading.load_tiny_decoder(folder, device, dtype)
                         if spec.tiny_decoder else None,
                         checker=safety.load_checker(folder, device, dtype)
                         if spec.safety_checker else None,
                         previewer=loading.load_tiny_decoder(folder, device, dtype)
                         if not spec.tiny_decoder and loading.has_tiny_decoder(folder)
                         else None)
            if spec.own_model:
                engine.served = cls._served(spec, folder)
            if device.type == "cuda":
                engine.optimize()
        except torch.OutOfMemoryError:  # a RuntimeError too: caught before the corrupt files
            raise ModelMemoryError(cls._memory_advice(spec, folder, device, dtype,
                                                      before)) from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # corrupt files
            raise ModelFolderError(f"{type(exc).__name__}: {exc}") from None
        return engine

    @staticmethod
    def _load_lightning(spec: ModelSpec, folder: Path, device: torch.device,
                        dtype: torch.dtype) -> dict[int, StableDiffusionXLPipeline]:
        """SDXL base with ByteDance's Lightning UNet of each step count (the default)."""
        shared = loading.shared_components(folder, device, dtype)
        pipes = {}
        for steps in spec.steps:
            pipe = StableDiffusionXLPipeline(
                **shared, unet=loading.load_unet(folder, steps, device, dtype),
                scheduler=loading.scheduler_for(folder, steps),
                add_watermarker=False)  # watermarking is a CPU round trip
            pipe.set_progress_bar_config(disable=True)
            pipes[steps] = pipe
        return pipes

    @staticmethod
    def _served(spec: ModelSpec, folder: Path) -> dict[int, tuple[str, str | None]]:
        """Per step count, what ``parameters.model`` and ``checkpoint`` report."""
        name = base_model.identity(spec, folder)
        return {steps: (name, base_model.checkpoint_label(spec, steps)) for steps in spec.steps}

    def distinct_pipes(self) -> list[StableDiffusionXLPipeline]:
        """Each loaded pipeline once (a Lightning merge serves every step count with one)."""
        return list({id(pipe): pipe for pipe in self.pipes.values()}.values())

    @staticmethod
    def _memory_advice(spec: ModelSpec, folder: Path, device: torch.device, dtype: torch.dtype,
                       before: tuple[int, int] | None) -> str:
        """Out of memory loading: what the weights take, what the GPU has, what to do."""
        sizes = loading.weights_bytes(folder, spec, dtype)
        need = sum(sizes.values())  # BASE_MODEL's own weights are not among spec.files()
        unet = max(sizes.get(CHECKPOINTS.get(s, ""), 0) for s in spec.steps)
        has = "" if before is None else (f", the GPU has {memory_text(before[1])} "
                                         f"({memory_text(before[0])} of it free before loading)")
        return (f"out of GPU memory loading {spec.describe()} on {device}: the weights take "
                f"{memory_text(need)} in {str(dtype).removeprefix('torch.')}{has}, and "
                f"generating needs more on top. Use a GPU with more memory, fewer "
                f"LIGHTNING_STEPS (each checkpoint is a {memory_text(unet)} UNet) or "
                f"SAFETY_CHECKER=false, or stop whatever else holds memory on the GPU")

    def optimize(self) -> None:
        """channels_last and fused QKV, the unfused projections freed (applied on CUDA; tests
        force it on the CPU). Idempotent."""
        loading.optimize_for_cuda([pipe.unet for pipe in self.distinct_pipes()] + [self.vae] + (
            [self.taesd] if self.taesd is not None else []))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes the weights hold on the device: ``"N-step UNet"`` per checkpoint, then
        ``"shared (...)"``: text encoders, VAE, and the tiny decoder and checker if loaded."""
        first = next(iter(self.pipes.values()))
        names = ["text encoders", "VAE"]
        shared = [first.text_encoder, first.text_encoder_2, self.vae]
        if self.taesd is not None:
            names.append("tiny decoder")
            shared.append(self.taesd)
        if self.checker is not None:
            names.append("safety checker")
            shared.append(self.checker[0])
        if len(self.distinct_pipes()) < len(self.pipes):  # a merge: one UNet for every count
            unets = {f"UNet (steps {self.steps[0]}-{self.steps[-1]})":
                     loading.resident_bytes(first.unet)}
        else:
            unets = {f"{steps}-step UNet": loading.resident_bytes(pipe.unet)
                     for steps, pipe in sorted(self.pipes.items())}
        return unets | {
            f"shared ({', '.join(names)})": sum(map(loading.resident_bytes, shared))}

    def count_tokens(self, text: str) -> int:
        """How many CLIP tokens ``text`` takes, start and end tokens included (thread-safe)."""
        with self._counter_lock:
            return len(self._counter(text, truncation=False).input_ids)

    def view(self, steps: int, mode: str, scheduler: str) -> DiffusionPipeline:
        """The pipeline for one (checkpoint, mode, scheduler): shared modules, its own scheduler."""
        key = (steps, mode, scheduler)
        if key not in self._views:
            base = self.pipes[steps]
            cls, kwargs = SCHEDULERS[scheduler]
            # dtype: from_pipe casts every (shared!) module to float32 unless told otherwise.
            pipe = PIPELINE_CLASSES[mode].from_pipe(
                base, scheduler=cls.from_config(base.scheduler.config, **kwargs),
                dtype=self.dtype)
            pipe.set_progress_bar_config(disable=True)
            self._views[key] = pipe
        return self._views[key]

    def generate(self, plans: Sequence[Plan],
                 on_step: BatchStep | None = None) -> list[list[Image.Image | None]]:
        """Plans of one ``shape_key`` as one batch, with the policy of the module docstring:
        image j of plan i at ``[i][j]``, ``None`` where the safety checker withheld it."""
        count = sum(len(plan.seeds) for plan in plans)
        try:
            results = self._run_with_fallback(plans, on_step, count)
            for plan, images in zip(plans, results, strict=True):
                if plan.safety_check:
                    images[:] = self._withhold_flagged(images)
            return results
        except torch.cuda.OutOfMemoryError:
            pass  # raised below: an error raised in here would carry the OOM as its context
        free_gpu_cache()
        raise GpuMemoryError(f"out of GPU memory generating {count} image(s) at "
                             f"{plans[0].width}x{plans[0].height}: try fewer images or a "
                             f"smaller size")

    def _run_with_fallback(self, plans: Sequence[Plan], on_step: BatchStep | None,
                           count: int) -> list[list[Image.Image]]:
        """One batch; out of GPU memory with several images, free the cache and run them one
        at a time, once (each image has its own generator: the images are the same)."""
        try:
            return self.run_batch(plans, on_step)
        except torch.cuda.OutOfMemoryError:
            if count == 1:
                raise
        # The retry runs out here: inside the except block the exception's traceback keeps the
        # failed batch's frames, and every activation they hold, allocated during the retry.
        log.warning("out of GPU memory for %d image(s): retrying one image at a time", count)
        free_gpu_cache()
        return [[self.run_batch([replace(plan, seeds=(seed,))])[0][0]
                 for seed in plan.seeds] for plan in plans]

    def _withhold_flagged(self, images: list[Image.Image]) -> list[Image.Image | None]:
        if self.checker is None:
            raise RuntimeError("the safety checker is not loaded (SAFETY_CHECKER=false)")
        flags = safety.nsfw_flags(self.checker, images, self.device, self.dtype)
        return [None if flagged else image for image, flagged in zip(images, flags, strict=True)]

    def run_batch(self, plans: Sequence[Plan],
                  on_step: BatchStep | None = None) -> list[list[Image.Image]]:
        """One pass through the pipeline for plans of one ``shape_key``, no fallback: image j
        of plan i comes from its own prompt row and generator seeded ``plans[i].seeds[j]``."""
        first = plans[0]
        if any(p.shape_key != first.shape_key for p in plans):
            raise ValueError("plans of different shapes cannot share a batch")
        rows = [(p, seed) for p in plans for seed in p.seeds]
        kwargs: dict[str, object] = dict(
            prompt=[p.prompt for p, _ in rows], num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale, num_images_per_prompt=1, output_type="latent",
            generator=[torch.Generator(self.device).manual_seed(seed) for _, seed in rows])
        if first.negative_prompt is not None:  # else diffusers uses zero embeddings (SDXL's rule)
            kwargs["negative_prompt"] = [p.negative_prompt for p, _ in rows]
        if first.mode != "img2img":  # img2img takes its size from the init image
            kwargs.update(width=first.width, height=first.height)
        if first.mode != "txt2img":
            kwargs.update(image=[p.init_image for p, _ in rows], strength=first.strength)
        if first.mode == "inpaint":
            kwargs["mask_image"] = [p.mask_image for p, _ in rows]
        pipe = self.view(first.steps, first.mode, first.scheduler)
        # The scheduler's step is wrapped only when a preview is wanted: progress alone needs
        # nothing from it.
        previewer = (self.previewer if on_step is not None and any(p.preview for p in plans)
                     else None)
        estimate = _Estimate(pipe.scheduler) if previewer is not None else None
        if on_step is not None:
            def callback(pipe_: DiffusionPipeline, i: int, t: object, tensors: dict) -> dict:
                latents = None if estimate is None else (
                    estimate.x0 if estimate.x0 is not None else tensors["latents"])
                on_step(i + 1, pipe_.num_timesteps, None if latents is None else (
                    lambda index: preview_jpeg(previewer, latents[index:index + 1])))
                return tensors

            kwargs["callback_on_step_end"] = callback
        try:
            # The batch's LoRAs (one set: shape_key) live in the weights only inside this block.
            with self.loras.merged(first.steps, self.pipes[first.steps], first.loras), \
                    self.embeddings.added(self.pipes[first.steps], first.embeddings), \
                    torch.inference_mode():
                if first.weighted:  # after the merge: text-encoder LoRAs act on the encoding
                    kwargs.update(self._weighted_prompts(first, len(rows)))
                images = decode_latents(self.taesd or pipe.vae, pipe(**kwargs).images)
        finally:
            if estimate is not None:
                estimate.release()
        out, start = [], 0
        for p in plans:
            out.append(images[start:start + len(p.seeds)])
            start += len(p.seeds)
        return out

    def _weighted_prompts(self, plan: Plan, rows: int) -> dict[str, object]:
        """Compel's conditioning for a batch of one weighted prompt (``Plan.shape_key``), in
        place of the prompt strings (``worker/engine/weighting.py``)."""
        if self._prompts is None:
            self._prompts = weighting.PromptEncoder(next(iter(self.pipes.values())), self.dtype)
        encoded = self._prompts.encode(plan.prompt, plan.negative_prompt,
                                       guided=plan.guidance_scale > 1)
        out: dict[str, object] = {"prompt": None, "negative_prompt": None,
                                  "prompt_embeds": encoded.embeds.repeat(rows, 1, 1),
                                  "pooled_prompt_embeds": encoded.pooled.repeat(rows, 1)}
        if encoded.negative_embeds is not None:
            out["negative_prompt_embeds"] = encoded.negative_embeds.repeat(rows, 1, 1)
            out["negative_pooled_prompt_embeds"] = encoded.negative_pooled.repeat(rows, 1)
        return out

    def warm_up(self, sizes: Sequence[tuple[int, int]] = WARMUP_SIZES) -> None:
        """One image of each size with each checkpoint, before any job arrives (a merge's one
        pipeline at its smallest step count). Out of memory here is a ``ModelMemoryError``: the
        weights fit, one image at that size does not."""
        failed: tuple[int, int, int] | None = None
        for steps in ([self.steps[0]] if len(self.distinct_pipes()) < len(self.pipes)
                      else self.steps):
            for width, height in sizes:
                try:
                    self.run_batch([warmup_plan(steps, width, height)])
                except torch.OutOfMemoryError:
                    failed = (steps, width, height)
                    break
            if failed:
                break
        if failed is None:
            return
        free_gpu_cache()  # outside the except block: the failed attempt's tensors are gone
        steps, width, height = failed
        raise ModelMemoryError(
            f"out of GPU memory warming up one {width}x{height} image with the {steps}-step "
            f"checkpoint on {self.device}: the weights loaded, a generation does not fit. Load "
            f"fewer checkpoints (LIGHTNING_STEPS), compile smaller sizes (COMPILE_SIZES), or use "
            f"a GPU with more memory")

    def compile(self, sizes: Sequence[tuple[int, int]], cache_dir: Path | None,
                backend: compiler.Backend = "inductor") -> float:
        """``torch.compile`` every UNet in place and warm each size (this is the warm-up: a
        compiled UNet compiles again for each new size); returns seconds. A compile that
        fails is a ``compiler.CompileError`` (a ``StartupError``) naming the cause and the fix."""
        started = time.perf_counter()
        shown = ", ".join(f"{width}x{height}" for width, height in sizes)
        try:
            compiler.compile_in_place([pipe.unet for pipe in self.distinct_pipes()], cache_dir,
                                      backend)
            self.warm_up(sizes)  # dynamo compiles lazily: the first call at each size
        except ModelMemoryError:
            raise  # the warm-up's own: memory, not the compiler
        except Exception as exc:  # noqa: BLE001 - any failure here stops the start: say why
            log.debug("torch.compile failed", exc_info=exc)  # the full story, at DEBUG only
            if isinstance(compiler.innermost(exc), torch.OutOfMemoryError):
                raise ModelMemoryError(
                    f"out of GPU memory compiling the UNet for {shown}: the weights loaded, "
                    f"compiling does not fit. Compile fewer or smaller sizes (COMPILE_SIZES), "
                    f"set COMPILE=false, or use a GPU with more memory") from None
            raise compiler.CompileError(exc, shown) from None
        compiler.save_cache(cache_dir)
        seconds = time.perf_counter() - started
        log.info("compiled %d UNet(s) (%s) with %s for %s, batch size 1: %.1f s",
                 len(self.pipes), ", ".join(f"{s}-step" for s in self.steps),
                 getattr(backend, "__name__", backend), shown, seconds)
        return seconds
