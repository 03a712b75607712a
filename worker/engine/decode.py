"""Latents to images, checked: the VAE decode and the guard against NaN or black output.

The classic fp16 SDXL failure is a VAE that overflows to NaN (or black). The fp16-fix VAE avoids
it; this module makes sure it can never reach a caller anyway: each image is decoded on its own
(bounding a batch's decode memory), checked, decoded again in fp32 if it is broken, and refused
with ``BadOutputError`` (a ``JobError``) if even that fails. Works with the full VAE and with
TAESDXL. Also the per-step previews: the current estimate as a small JPEG, by TAESDXL.
"""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image

from worker.errors import JobError
from worker.outputs import encoding

log = logging.getLogger(__name__)


class BadOutputError(JobError):
    """The VAE decoded NaN or an all-black image, even in full precision."""

    def __init__(self) -> None:
        super().__init__("the model produced an invalid (NaN or all-black) image even after a "
                         "full-precision decode: try another seed or prompt")


def _decode(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Latents to pixels in [0, 1], NCHW (SDXL's VAE has no latents mean/std, only a scale;
    TAESDXL's scale is 1: it decodes the scaled latents directly)."""
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (pixels / 2 + 0.5).clamp(0, 1)


def _usable(pixels: torch.Tensor) -> bool:
    """NaN (clamp keeps it) or all zeros: the classic fp16 VAE failure, never a real image."""
    return not bool(torch.isnan(pixels).any()) and bool((pixels > 0).any())


def _decode_fp32(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Decode in full precision, then put the VAE back in its own dtype whatever happens."""
    dtype = vae.dtype
    try:
        return _decode(vae.to(torch.float32), latents.float())
    finally:
        vae.to(dtype)


def decode_latents(vae: AutoencoderKL | AutoencoderTiny,
                   latents: torch.Tensor) -> list[Image.Image]:
    """Decode one image at a time (bounds a batch's decode memory), each checked.

    A NaN or all-black image from a half-precision VAE is decoded again in fp32; if that fails
    too, ``BadOutputError``: such an image is never returned as a success.
    """
    images = []
    for one in latents.split(1):
        pixels = _decode(vae, one)
        if not _usable(pixels) and vae.dtype != torch.float32:
            log.warning("VAE output in %s was NaN or black: decoding again in fp32", vae.dtype)
            pixels = _decode_fp32(vae, one)
        if not _usable(pixels):
            raise BadOutputError
        images.append(_to_image(pixels))
    return images


def _to_image(pixels: torch.Tensor) -> Image.Image:
    """One image's pixels in [0, 1], NCHW, as an 8-bit RGB image."""
    return Image.fromarray(
        (pixels[0] * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


# Previews are for watching an image form, not for use: a small, quickly encoded JPEG.
PREVIEW_SIDE = 256
PREVIEW_QUALITY = 70


def preview_jpeg(decoder: AutoencoderTiny, latents: torch.Tensor) -> bytes:
    """One image's latents (the current estimate) as a JPEG of at most 256 px a side, by
    TAESDXL (a few ms on a GPU; never the full VAE, which would cost as much as the step)."""
    with torch.inference_mode():
        image = _to_image(_decode(decoder, latents))
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.BILINEAR)
    return encoding.encode(image, "jpeg", PREVIEW_QUALITY)
