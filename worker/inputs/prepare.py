"""From a validated request to the plan the GPU runs: decoded images attached, warnings said.

Decodes the init image (``images``), resolves the exact parameters (``plan.resolve``, which
needs the init image's size), resizes the init image to the output size and loads the mask at
that size, and warns when a prompt runs past what CLIP reads. Blocking (decoding, resizing):
the handler runs it in a thread. Caller mistakes raise ``InputError``.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from schemas import CLIP_MAX_TOKENS, GenerateRequest
from worker.inputs.images import load_image, load_mask
from worker.plan import Plan, resolve


def prepare(request: GenerateRequest, steps: tuple[int, ...], safety_mode: str,
            count_tokens: Callable[[str], int]) -> tuple[Plan, list[str]]:
    """The plan for ``request`` on a worker with checkpoints ``steps`` loaded and
    ``SAFETY_CHECKER=safety_mode``, and every warning about what changed or went unused."""
    init = load_image(request.image, "image") if request.image is not None else None
    plan, warnings = resolve(request, steps, safety_mode=safety_mode,
                             image_size=init.size if init else None)
    if init is not None:
        size = (plan.width, plan.height)
        init = init if init.size == size else init.resize(size, Image.Resampling.LANCZOS)
        mask = load_mask(request.mask, "mask", size) if request.mask is not None else None
        plan = plan.with_images(init, mask)
    return plan, warnings + truncation_warnings(plan, count_tokens)


def truncation_warnings(plan: Plan, count_tokens: Callable[[str], int]) -> list[str]:
    """CLIP reads 77 tokens; say so when a prompt that is used runs past them."""
    warnings = []
    for name, text in (("prompt", plan.prompt), ("negative_prompt", plan.negative_prompt)):
        if text and (count := count_tokens(text)) > CLIP_MAX_TOKENS:
            warnings.append(f"{name} is {count} CLIP tokens; only the first {CLIP_MAX_TOKENS} "
                            f"were used")
    return warnings
