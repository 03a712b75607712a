"""Weighted and long prompts encoded with compel for SDXL's two text encoders.

A1111 syntax is parsed by ``worker/adapters/weighting.py`` (pure) into fragments and weights,
which go to compel as a ``FlattenedPrompt``: compel's own string syntax (``word+``, ``.and()``)
is never read, so ``+``/``-`` stay literal as in A1111. Each encoder gives its penultimate hidden
states, un-normalised (what diffusers' SDXL ``encode_prompt`` uses), in 77-token chunks when the
prompt is longer (``truncate_long_prompts=False``); the pooled embedding comes from encoder 2 on
the prompt without its syntax, truncated to 77 tokens as diffusers does. Positive and negative
are padded to one length with the empty prompt's conditioning (compel's padding), never zeros.
Only prompts that need it come here (``Plan.weighted``): a plain prompt keeps diffusers' path
and its exact bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from compel import Compel, DiffusersTextualInversionManager, ReturnedEmbeddingsType
from compel.prompt_parser import FlattenedPrompt, Fragment
from diffusers import StableDiffusionXLPipeline

from worker.adapters.weighting import parse_attention, plain_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """What ``StableDiffusionXLPipeline`` takes instead of prompt strings, for one row."""

    embeds: torch.Tensor  # (1, 77 * chunks, 2048)
    pooled: torch.Tensor  # (1, 1280)
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None


class PromptEncoder:
    """Compel over the pipelines' shared text encoders (LoRAs merged into them apply)."""

    def __init__(self, pipe: StableDiffusionXLPipeline, dtype: torch.dtype) -> None:
        common = dict(returned_embeddings_type=
                      ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                      truncate_long_prompts=False, device=str(pipe.text_encoder.device),
                      dtype_for_device_getter=lambda device: dtype,
                      # expands a multi-vector embedding's token to T T_1 ..., as diffusers does
                      textual_inversion_manager=DiffusersTextualInversionManager(pipe))
        self._first = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, **common)
        self._second = Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2,
                              requires_pooled=True, **common)

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = FlattenedPrompt([Fragment(piece, weight)
                                  for piece, weight in parse_attention(text)])
        (left, _), _ = self._first.build_conditioning_tensor_for_prompt_object(prompt)
        (right, _), _ = self._second.build_conditioning_tensor_for_prompt_object(prompt)
        left, right = (c if c.dim() == 3 else c.unsqueeze(0) for c in (left, right))
        if left.shape[1] != right.shape[1]:  # the tokenizers split the text differently
            longest = max(left.shape[1], right.shape[1])
            left = _pad(left, self._first(""), longest)
            right = _pad(right, self._second("")[0], longest)
        pooled = self._second.conditioning_provider.get_pooled_embeddings(
            [plain_text(text)], device=self._second.device)
        return torch.cat([left, right], dim=-1), pooled

    def encode(self, prompt: str, negative: str | None, guided: bool) -> Conditioning:
        """``negative`` None under guidance: zeros, diffusers' SDXL rule
        (``force_zeros_for_empty_prompt``); unguided, no negative at all."""
        embeds, pooled = self._encode(prompt)
        if not guided:
            return Conditioning(embeds, pooled, None, None)
        if negative is None:
            return Conditioning(embeds, pooled, torch.zeros_like(embeds),
                                torch.zeros_like(pooled))
        negative_embeds, negative_pooled = self._encode(negative)
        if negative_embeds.shape[1] != embeds.shape[1]:
            empty = self._empty()
            longest = max(embeds.shape[1], negative_embeds.shape[1])
            embeds, negative_embeds = (_pad(c, empty, longest) for c in (embeds,
                                                                         negative_embeds))
        return Conditioning(embeds, pooled, negative_embeds, negative_pooled)

    def _empty(self) -> torch.Tensor:
        return self._encode("")[0]


def _pad(conditioning: torch.Tensor, empty: torch.Tensor, length: int) -> torch.Tensor:
    while conditioning.shape[1] < length:
        conditioning = torch.cat([conditioning, empty], dim=1)
    return conditioning
