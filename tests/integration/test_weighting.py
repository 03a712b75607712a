"""Weighted and long prompts through compel on the tiny model (``worker/engine/weighting``):
unweighted, compel gives diffusers' own conditioning; weights and chunks change the image; a
plain prompt's bytes are unchanged; LoRAs on the text encoders act on compel's encoding too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from builder import make_tiny_model
from pipeline import Engine
from tests.integration.test_loras import use
from worker.engine.weighting import PromptEncoder
from worker.plan import Plan
from worker.spec import ModelSpec


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)


def plan(prompt: str, weighted: bool = True, **fields: object) -> Plan:
    job = Plan(prompt=prompt, negative_prompt=None, width=512, height=512, steps=4,
               guidance_scale=0.0, seeds=(3,), weighted=weighted)
    return replace(job, **fields)


def pixels(engine: Engine, job: Plan) -> np.ndarray:
    return np.asarray(engine.generate([job])[0][0], np.int16)


class TestCompel:
    def test_an_unweighted_prompt_gives_diffusers_own_conditioning(self, engine: Engine) -> None:
        pipe = engine.pipes[4]
        with torch.inference_mode():
            ours = PromptEncoder(pipe, engine.dtype).encode("a cat on a mat", None, False)
            embeds, _, pooled, _ = pipe.encode_prompt("a cat on a mat", device=engine.device,
                                                      do_classifier_free_guidance=False)
        torch.testing.assert_close(ours.embeds, embeds)
        torch.testing.assert_close(ours.pooled, pooled)
        assert np.abs(pixels(engine, plan("a cat on a mat"))
                      - pixels(engine, plan("a cat on a mat", weighted=False))).max() <= 1

    def test_a_weight_changes_the_conditioning_and_weight_one_does_not(
            self, engine: Engine) -> None:
        """At the conditioning: the tiny UNet's images barely follow the text at all."""
        with torch.inference_mode():
            encoder = PromptEncoder(engine.pipes[4], engine.dtype)
            base = encoder.encode("a cat", None, False).embeds
            same = encoder.encode("a (cat:1.0)", None, False).embeds
            heavy = encoder.encode("a (cat:1.8)", None, False).embeds
            light = encoder.encode("a [cat]", None, False).embeds
        torch.testing.assert_close(same, base)
        assert (heavy - base).abs().max() > 0.1 and (light - base).abs().max() > 0.01
        assert not torch.allclose(heavy, light)
        assert np.abs(pixels(engine, plan("a (cat:1.0)"))
                      - pixels(engine, plan("a cat", weighted=False))).max() <= 1

    def test_a_long_prompt_is_encoded_in_chunks_not_cut(self, engine: Engine) -> None:
        pipe = engine.pipes[4]
        long = "a cat " * 45 + "the dog"
        with torch.inference_mode():
            encoded = PromptEncoder(pipe, engine.dtype).encode(long, "a dog " * 50, True)
            cut = PromptEncoder(pipe, engine.dtype).encode(long.replace("the dog", "a bird"),
                                                           None, False)
        assert encoded.embeds.shape[1] == encoded.negative_embeds.shape[1] == 2 * 77
        assert cut.embeds.shape[1] == 2 * 77
        # the tail past token 77 is read: only the second chunk differs
        torch.testing.assert_close(encoded.embeds[:, :77], cut.embeds[:, :77])
        assert (encoded.embeds[:, 77:] - cut.embeds[:, 77:]).abs().max() > 0.01
        assert pixels(engine, plan(long)).shape == (512, 512, 3)

    def test_guidance_with_a_weighted_negative_prompt_runs(self, engine: Engine) -> None:
        guided = plan("a (cat:1.3)", guidance_scale=2.0, negative_prompt="[blurry] " * 40)
        other = replace(guided, negative_prompt="sharp")
        # the tiny UNet follows its text weakly; fp rounding alone moves ~0.001 on average
        assert np.abs(pixels(engine, guided) - pixels(engine, other)).mean() > 0.1

    def test_a_text_encoder_lora_acts_on_a_weighted_prompt(self, engine: Engine,
                                                            tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
        lora = make_tiny_model.write_kohya_lora(tmp_path / "te.safetensors", tiny_model_dir,
                                                seed=3, text_encoders=True,
                                                only=("q_proj", "k_proj", "v_proj", "out_proj"))
        job = plan("a (cat:1.3)")
        assert np.abs(pixels(engine, replace(job, loras=(use(lora),)))
                      - pixels(engine, job)).mean() > 0.1
