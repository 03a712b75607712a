"""From a validated request to the plan the GPU runs: decoded images attached, warnings said.

Decodes the init image (``images``), resolves the exact parameters (``plan.resolve``, which
needs the init image's size), resizes the init image to the output size and loads the mask at
that size, and warns when a prompt runs past what CLIP reads. Blocking (decoding, resizing):
the handler awaits ``prepare_async``, which runs it on the decode pool's threads with the images
decoded in the pool's processes, within the job's CPU-time budget (``inputs/pool``); cancelling
the awaiting task kills a decode in progress. Caller mistakes raise ``InputError``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import replace

from PIL import Image

from schemas import CLIP_MAX_TOKENS, GenerateRequest
from worker.adapters.store import LoraStore
from worker.adapters.weighting import has_syntax
from worker.errors import InputError
from worker.inputs.images import Decoder, decode_flat, load_image, load_mask
from worker.inputs.pool import DecodePool, shared_pool
from worker.plan import Plan, resolve


async def prepare_async(request: GenerateRequest, steps: tuple[int, ...], safety_mode: str,
                        count_tokens: Callable[[str], int], pool: DecodePool | None = None,
                        loras: LoraStore | None = None) -> tuple[Plan, list[str]]:
    """``prepare`` on ``pool``'s threads (the worker's shared pool by default), its images
    decoded in the pool's processes; if the awaiting task is cancelled, so is the decode."""
    pool = pool or shared_pool()
    decoder = pool.job()
    work = functools.partial(prepare, request, steps, safety_mode, count_tokens, decoder,
                             loras=loras)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool.threads, work)
    except asyncio.CancelledError:
        decoder.cancel()  # the thread returns as soon as its decoder process is killed
        raise


def prepare(request: GenerateRequest, steps: tuple[int, ...], safety_mode: str,
            count_tokens: Callable[[str], int], decoder: Decoder = decode_flat, *,
            loras: LoraStore | None = None) -> tuple[Plan, list[str]]:
    """The plan for ``request`` on a worker with checkpoints ``steps`` loaded and
    ``SAFETY_CHECKER=safety_mode``, and every warning about what changed or went unused.
    Images are decoded by ``decoder`` (in this thread by default)."""
    init = (load_image(request.image, "image", decoder=decoder)
            if request.image is not None else None)
    plan, warnings = resolve(request, steps, safety_mode=safety_mode,
                             image_size=init.size if init else None)
    if init is not None:
        size = (plan.width, plan.height)
        init = init if init.size == size else init.resize(size, Image.Resampling.LANCZOS)
        mask = (load_mask(request.mask, "mask", size, decoder=decoder, repaint=request.mask_mode)
                if request.mask is not None else None)
        plan = plan.with_images(init, mask)
    if request.mask is None and "mask_mode" in request.model_fields_set:
        warnings.append("mask_mode was ignored: it applies only with a mask")
    plan, adapter_warnings = attach_loras(plan, request, loras)
    plan = replace(plan, weighted=needs_weighting(plan, request, count_tokens))
    return plan, warnings + adapter_warnings + truncation_warnings(plan, count_tokens)


def attach_loras(plan: Plan, request: GenerateRequest,
                 loras: LoraStore | None) -> tuple[Plan, list[str]]:
    """The job's LoRAs and embeddings, found or downloaded (``worker/adapters/store``)."""
    if not (request.loras or request.embeddings):
        return plan, []
    if loras is None:
        raise InputError("invalid input: loras, embeddings: this worker serves no adapters")
    uses, warnings = loras.resolve(request.loras)
    embeddings, embedding_warnings = loras.resolve_embeddings(
        request.embeddings, (plan.prompt, plan.negative_prompt))
    return replace(plan, loras=uses, embeddings=embeddings), warnings + embedding_warnings


def needs_weighting(plan: Plan, request: GenerateRequest,
                    count_tokens: Callable[[str], int]) -> bool:
    """Whether the prompts go through compel: weighting syntax, or too long for one chunk."""
    return request.prompt_weighting and any(
        has_syntax(text) or count_tokens(text) > CLIP_MAX_TOKENS
        for text in (plan.prompt, plan.negative_prompt) if text)


def truncation_warnings(plan: Plan, count_tokens: Callable[[str], int]) -> list[str]:
    """CLIP reads 77 tokens; say so when a prompt that is used runs past them (not when it is
    encoded in chunks: ``plan.weighted``)."""
    warnings = []
    if plan.weighted:
        return warnings
    for name, text in (("prompt", plan.prompt), ("negative_prompt", plan.negative_prompt)):
        if text and (count := count_tokens(text)) > CLIP_MAX_TOKENS:
            warnings.append(f"{name} is {count} CLIP tokens; only the first {CLIP_MAX_TOKENS} "
                            f"were used")
    return warnings
