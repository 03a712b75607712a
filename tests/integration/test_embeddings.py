"""Textual-inversion embeddings per job on the tiny model: a token acts where it appears, in
plain and weighted prompts; no token or vector survives the batch; bad files are clear errors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from builder import make_tiny_model
from pipeline import Engine
from tests.integration.conftest import Run
from worker.errors import InputError
from worker.plan import EmbeddingUse, Plan
from worker.spec import ModelSpec


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(ModelSpec(steps=(4,)), tiny_model_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embeddings")
    return {"two": make_tiny_model.write_sdxl_embedding(folder / "two.safetensors", 2, seed=1),
            "one": make_tiny_model.write_sdxl_embedding(folder / "one.safetensors", 1, seed=2),
            "sd15": make_tiny_model.write_sd15_embedding(folder / "sd15.safetensors"),
            "wide": make_tiny_model.write_sdxl_embedding(folder / "wide.safetensors", 2,
                                                         widths=(768, 1280))}


def use(path: Path, tokens: tuple[str, ...] = ("<s0>", "<s1>")) -> EmbeddingUse:
    return EmbeddingUse(path=path.name, file=str(path),
                        sha256=hashlib.sha256(path.read_bytes()).hexdigest(), tokens=tokens)


def plan(prompt: str, *embeddings: EmbeddingUse, weighted: bool = False) -> Plan:
    return Plan(prompt=prompt, negative_prompt=None, width=512, height=512, steps=4,
                guidance_scale=0.0, seeds=(2,), embeddings=embeddings, weighted=weighted)


def pixels(engine: Engine, job: Plan) -> np.ndarray:
    return np.asarray(engine.generate([job])[0][0], np.int16)


def conditioning(engine: Engine, prompt: str, *embeddings: EmbeddingUse) -> torch.Tensor:
    pipe = engine.pipes[4]
    with engine.embeddings.added(pipe, embeddings), torch.inference_mode():
        return pipe.encode_prompt(prompt, device=engine.device,
                                  do_classifier_free_guidance=False)[0]


# The tiny UNet follows its text weakly: an embedding moves the image ~0.1 level on average,
# fp rounding alone ~0.001; the conditioning shows the token's effect plainly.
MOVED = 0.02


def state(engine: Engine) -> tuple:
    pipe = engine.pipes[4]
    return (len(pipe.tokenizer), len(pipe.tokenizer_2),
            pipe.text_encoder.get_input_embeddings().weight.clone(),
            pipe.text_encoder_2.get_input_embeddings().weight.clone())


def same_state(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


class TestEmbeddings:
    def test_a_token_acts_where_it_appears_and_leaves_nothing_behind(
            self, engine: Engine, files: dict[str, Path]) -> None:
        before, plain = state(engine), pixels(engine, plan("a photo of <s0> <s1>"))
        styled = pixels(engine, plan("a photo of <s0> <s1>", use(files["two"])))
        assert np.abs(styled - plain).mean() > MOVED
        with_token = conditioning(engine, "a photo of <s0> <s1>", use(files["two"]))
        without = conditioning(engine, "a photo of <s0> <s1>")
        assert (with_token - without).abs().max() > 0.1
        # the token's own positions change; the words before it do not (causal attention)
        torch.testing.assert_close(with_token[:, :4], without[:, :4])
        assert same_state(state(engine), before)
        assert np.array_equal(pixels(engine, plan("a photo of <s0> <s1>")), plain)

    def test_one_token_for_a_multi_vector_file_and_weighted_prompts(
            self, engine: Engine, files: dict[str, Path]) -> None:
        before = state(engine)
        plain = pixels(engine, plan("a photo of <style>"))
        one = use(files["two"], ("<style>",))  # two vectors behind one token: <style> <style>_1
        for weighted in (False, True):
            prompt = "a photo of (<style>:1.2)" if weighted else "a photo of <style>"
            image = pixels(engine, plan(prompt, one, weighted=weighted))
            assert np.abs(image - plain).mean() > MOVED
        assert same_state(state(engine), before)

    def test_an_unweighted_compel_encoding_matches_diffusers_with_an_embedding(
            self, engine: Engine, files: dict[str, Path]) -> None:
        embedding = use(files["one"], ("<x>",))
        diffusers = pixels(engine, plan("a <x> cat", embedding))
        compel = pixels(engine, replace(plan("a <x> cat", embedding), weighted=True))
        assert np.abs(diffusers - compel).max() <= 1

    @pytest.mark.parametrize(("name", "tokens", "says"), [
        ("sd15", ("<s0>", "<s1>"), "SD 1.x embedding"),
        ("wide", ("<s0>", "<s1>"), "this model's encoder takes 32-wide vectors"),
        ("two", ("<a>", "<b>", "<c>"), "holds 2 vector(s) per encoder; give 2 token(s)"),
        ("one", ("cat</w>",), "already a word of the vocabulary"),
    ])
    def test_a_bad_embedding_is_the_callers_error_and_leaves_nothing(
            self, engine: Engine, files: dict[str, Path], name: str, tokens: tuple,
            says: str) -> None:
        before = state(engine)
        with pytest.raises(InputError, match="embeddings") as caught:
            engine.generate([plan("a cat", use(files["one"], ("<ok>",)),
                                  use(files[name], tokens))])
        assert says in str(caught.value)
        assert same_state(state(engine), before)


    def test_tokens_that_clash_with_anothers_expansion_are_the_callers_error(
            self, engine: Engine, files: dict[str, Path]) -> None:
        # Found in review: "<x>_1" beside a 2-vector "<x>" (which expands to <x> <x>_1) made
        # diffusers raise ValueError on the GPU thread: an internal error and a new worker.
        before = state(engine)
        with pytest.raises(InputError, match="clash with another embedding's"):
            engine.generate([plan("a <x>_1 and <x>", use(files["one"], ("<x>_1",)),
                                  use(files["two"], ("<x>",)))])
        assert same_state(state(engine), before)


class TestThroughTheWorker:
    def test_echo_warning_and_plain_jobs_unchanged(self, job_runner: Callable[..., Run],
                                                   tiny_model_dir: Path,
                                                   files: dict[str, Path]) -> None:
        folder = tiny_model_dir / "loras"  # the handler's LORA_DIR
        folder.mkdir(exist_ok=True)
        (folder / "style.safetensors").write_bytes(files["two"].read_bytes())
        run = job_runner("embedding-job", prompt="a photo of <s0>", width=512, height=512,
                         seed=8)
        before = run()["images"][0]["image"]
        response = run(embeddings=[{"path": "style.safetensors"}])
        assert response["parameters"]["embeddings"] == [{
            "path": "style.safetensors", "tokens": ["<s0>", "<s1>"],
            "sha256": hashlib.sha256(files["two"].read_bytes()).hexdigest()}]
        assert response["warnings"] == ["embeddings[0]: token '<s1>' appears in no prompt, so "
                                        "the embedding does nothing there"]
        assert response["images"][0]["image"] != before
        assert run()["images"][0]["image"] == before
        error = run(embeddings=[{"path": "style.safetensors", "tokens": ["<a>", "<b>", "<c>"]}])
        assert set(error) == {"error"} and "give 2 token(s)" in error["error"]
        error = run(embeddings=[{"path": "style.safetensors", "tokens": ["two words"]}])
        assert set(error) == {"error"} and "embeddings[0].tokens[0]" in error["error"]
