"""The optional safety checker: CompVis's CLIP-based NSFW classifier, run on generated images.

Loaded only when ``SAFETY_CHECKER`` is on (``ModelSpec.safety_checker``). It gives one verdict
per image; ``pipeline.Engine`` withholds flagged images (``"image": null, "nsfw": true``) rather
than returning the black pictures the checker itself would substitute.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor

Checker = tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]


def load_checker(model_dir: Path, device: torch.device, dtype: torch.dtype) -> Checker:
    """The checker and its image preprocessing, from the model folder."""
    checker = StableDiffusionSafetyChecker.from_pretrained(model_dir / "safety_checker",
                                                           dtype=dtype).to(device)
    return checker.eval(), CLIPImageProcessor.from_pretrained(model_dir / "feature_extractor")


def nsfw_flags(checker: Checker, images: Sequence[Image.Image], device: torch.device,
               dtype: torch.dtype) -> list[bool]:
    """The safety checker's verdict per image (one CLIP image pass each)."""
    model, processor = checker
    pixels = processor(list(images), return_tensors="pt").pixel_values
    with torch.inference_mode():
        # The checker also blacks out flagged images in the array it is given: hand it a dummy,
        # since the worker withholds flagged images instead of returning black pictures.
        _, flags = model(images=np.zeros((len(images), 1, 1, 3), np.float32),
                         clip_input=pixels.to(device, dtype))
    return [bool(flag) for flag in flags]
