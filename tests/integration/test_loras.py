"""Per-job LoRAs on the tiny model: they act, in both file layouts, on the unfused and the fused
(CUDA, forced on the CPU) layout and under torch.compile, and leave no trace in the shared
pipeline; a file that is not an SDXL LoRA is the caller's error naming it.

The LoRAs are built here by ``builder.make_tiny_model`` (random factors on every attention and
feed-forward layer of the tiny UNet, and of both text encoders where asked).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from builder import make_tiny_model
from pipeline import Engine
from tests.integration.conftest import Run
from worker.errors import InputError
from worker.gpu_queue import GpuWorker
from worker.plan import LoraUse, Plan
from worker.spec import ModelSpec

SPEC = ModelSpec(steps=(4,))


@pytest.fixture(scope="module")
def lora_files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    build = make_tiny_model
    return {
        "a": build.write_diffusers_lora(folder / "a.safetensors", tiny_model_dir, seed=1),
        "a_kohya": build.write_kohya_lora(folder / "a_kohya.safetensors", tiny_model_dir,
                                          seed=1),
        "a_half": build.write_kohya_lora(folder / "a_half.safetensors", tiny_model_dir, seed=1,
                                         alpha=1.0),  # alpha = rank / 2: the delta halved
        "a_sgm": build.write_kohya_lora(folder / "a_sgm.safetensors", tiny_model_dir, seed=1,
                                        sgm=True),  # SDXL block names, as sd-scripts writes
        "conv": build.write_locon_lora(folder / "conv.safetensors", tiny_model_dir, seed=5),
        "b": build.write_diffusers_lora(folder / "b.safetensors", tiny_model_dir, seed=2),
        "text": build.write_kohya_lora(folder / "text.safetensors", tiny_model_dir, seed=3,
                                       text_encoders=True),
        "qkv": build.write_diffusers_lora(folder / "qkv.safetensors", tiny_model_dir, seed=4,
                                          only=("attn1.to_q", "attn1.to_k", "attn1.to_v")),
        **{kind: build.write_foreign_lora(folder / f"{kind}.safetensors", kind)
           for kind in ("sd15", "flux", "loha", "nolora")},
    }


def use(path: Path, scale: float = 1.0) -> LoraUse:
    return LoraUse(path=path.name, file=str(path),
                   sha256=hashlib.sha256(path.read_bytes()).hexdigest(), scale=scale)


def plan(*loras: LoraUse, seeds: tuple[int, ...] = (5,), prompt: str = "a cat") -> Plan:
    return Plan(prompt=prompt, negative_prompt=None, width=512, height=512, steps=4,
                guidance_scale=0.0, seeds=seeds, loras=tuple(loras))


def pixels(engine: Engine, job: Plan) -> np.ndarray:
    return np.stack([np.asarray(image, np.int16) for image in engine.generate([job])[0]])


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    pipe = engine.pipes[4]
    return {f"{name}.{key}": value.clone() for name in ("unet", "text_encoder", "text_encoder_2")
            for key, value in getattr(pipe, name).state_dict().items()}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(SPEC, tiny_model_dir)


@pytest.fixture(scope="module")
def fused(tiny_model_dir: Path) -> Engine:
    fused = Engine.load(SPEC, tiny_model_dir)
    fused.optimize()  # the CUDA path: fused QKV (to_q/to_k/to_v deleted), channels_last
    return fused


class TestLoraActs:
    def test_a_lora_changes_the_image_and_scale_zero_is_no_lora(
            self, engine: Engine, lora_files: dict[str, Path]) -> None:
        plain = pixels(engine, plan())
        with_lora = pixels(engine, plan(use(lora_files["a"])))
        assert np.abs(with_lora - plain).mean() > 2  # a real change, not rounding
        assert np.array_equal(pixels(engine, plan(use(lora_files["a"], 0.0))), plain)

    def test_kohya_layout_equals_the_diffusers_layout(
            self, engine: Engine, lora_files: dict[str, Path]) -> None:
        diffusers = pixels(engine, plan(use(lora_files["a"])))
        kohya = pixels(engine, plan(use(lora_files["a_kohya"])))
        assert np.abs(diffusers - kohya).max() <= 1
        sgm = pixels(engine, plan(use(lora_files["a_sgm"])))
        assert np.abs(diffusers - sgm).max() <= 1
        # alpha = rank/2 is the same LoRA at scale 0.5
        half = pixels(engine, plan(use(lora_files["a_half"])))
        assert np.abs(half - pixels(engine, plan(use(lora_files["a"], 0.5)))).max() <= 1

    def test_two_loras_at_once_differ_from_each_alone(
            self, engine: Engine, lora_files: dict[str, Path]) -> None:
        a, b = use(lora_files["a"]), use(lora_files["b"])
        both = pixels(engine, plan(a, b))
        assert np.abs(both - pixels(engine, plan(a))).mean() > 1
        assert np.abs(both - pixels(engine, plan(b))).mean() > 1
        assert np.abs(both - pixels(engine, plan(b, a))).max() <= 1  # order does not matter

    def test_a_conv_lora_acts_and_agrees_fused(self, engine: Engine, fused: Engine,
                                               lora_files: dict[str, Path]) -> None:
        job = plan(use(lora_files["conv"]))
        assert np.abs(pixels(engine, job) - pixels(engine, plan())).mean() > 1
        assert np.abs(pixels(engine, job) - pixels(fused, job)).max() <= 1

    def test_a_text_encoder_lora_acts_through_the_prompt(
            self, engine: Engine, lora_files: dict[str, Path]) -> None:
        assert np.abs(pixels(engine, plan(use(lora_files["text"])))
                      - pixels(engine, plan())).mean() > 1

    def test_a_loaded_lora_is_not_read_again(self, tiny_model_dir: Path,
                                             lora_files: dict[str, Path]) -> None:
        engine = Engine.load(SPEC, tiny_model_dir)
        for _ in range(3):
            engine.generate([plan(use(lora_files["a"]))])
        assert engine.loras.loads == 1


class TestIsolation:
    def test_weights_and_a_plain_image_are_unchanged_after_lora_jobs(
            self, tiny_model_dir: Path, lora_files: dict[str, Path]) -> None:
        engine = Engine.load(SPEC, tiny_model_dir)
        before, plain = weights(engine), pixels(engine, plan())
        engine.generate([plan(use(lora_files["a"]), use(lora_files["b"], -1.5))])
        engine.generate([plan(use(lora_files["text"], 3.0))])
        after = weights(engine)
        assert all(torch.equal(before[key], after[key]) for key in before)
        assert np.array_equal(pixels(engine, plan()), plain)

    def test_weights_are_restored_when_the_generation_fails(
            self, tiny_model_dir: Path, lora_files: dict[str, Path],
            monkeypatch: pytest.MonkeyPatch) -> None:
        engine = Engine.load(SPEC, tiny_model_dir)
        before = weights(engine)

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(engine.pipes[4].unet, "forward", broken)
        with pytest.raises(RuntimeError, match="boom"):
            engine.run_batch([plan(use(lora_files["a"]))])
        monkeypatch.undo()
        after = weights(engine)
        assert all(torch.equal(before[key], after[key]) for key in before)

    def test_plans_with_different_loras_never_share_a_batch(
            self, engine: Engine, lora_files: dict[str, Path]) -> None:
        a, b = plan(use(lora_files["a"])), plan(use(lora_files["b"]))
        assert a.shape_key != b.shape_key != plan().shape_key
        assert a.shape_key == plan(use(lora_files["a"]), prompt="a dog").shape_key
        assert a.shape_key != plan(use(lora_files["a"], 0.5)).shape_key
        with pytest.raises(ValueError, match="different shapes"):
            engine.run_batch([a, b])

    def test_a_job_alone_equals_it_queued_beside_jobs_with_other_loras(
            self, engine: Engine, lora_files: dict[str, Path]) -> None:
        job = plan(use(lora_files["a"]), seeds=(9,))
        alone = pixels(engine, job)
        batches: list[int] = []

        def run(plans: Sequence[Plan], on_step: object = None) -> list:
            batches.append(len(plans))
            return engine.generate(plans, on_step)

        gpu = GpuWorker(run, max_batch_images=8)
        others = [plan(), plan(use(lora_files["b"])), replace(job, seeds=(10,)),
                  plan(use(lora_files["a"], 2.0))]
        futures = [gpu.submit(p, None) for p in [*others, job]]
        images = [f.result(timeout=300).images for f in futures]
        gpu.close()
        assert np.abs(np.asarray(images[-1][0], np.int16) - alone[0]).max() <= 1
        assert len(batches) >= 4  # plain, b, a (two jobs at most together), a at 2.0


class TestFusedQkv:
    def test_images_with_a_lora_agree_fused_and_unfused(
            self, engine: Engine, fused: Engine, lora_files: dict[str, Path]) -> None:
        for name in ("a", "qkv", "text"):
            job = plan(use(lora_files[name]))
            assert np.abs(pixels(engine, job) - pixels(fused, job)).max() <= 1, name

    def test_a_self_attention_qkv_lora_acts_on_the_fused_projection(
            self, fused: Engine, lora_files: dict[str, Path]) -> None:
        """The layer PEFT's wrappers would miss once fused (to_q is gone)."""
        assert not hasattr(fused.pipes[4].unet.down_blocks[1].attentions[0]
                           .transformer_blocks[0].attn1, "to_q")
        assert np.abs(pixels(fused, plan(use(lora_files["qkv"])))
                      - pixels(fused, plan())).mean() > 1

    def test_the_fused_projection_gets_exactly_the_unfused_deltas(
            self, engine: Engine, fused: Engine, lora_files: dict[str, Path]) -> None:
        lora = [use(lora_files["a"], 1.5)]
        with engine.loras.merged(4, engine.pipes[4], lora), \
                fused.loras.merged(4, fused.pipes[4], lora):
            checked = 0
            for name, fused_block in fused.pipes[4].unet.named_modules():
                if not (hasattr(fused_block, "to_qkv") or hasattr(fused_block, "to_kv")):
                    continue
                unfused_block = engine.pipes[4].unet.get_submodule(name)
                checked += hasattr(fused_block, "to_qkv") + hasattr(fused_block, "to_kv")
                if hasattr(fused_block, "to_qkv"):
                    merged = torch.cat([unfused_block.to_q.weight, unfused_block.to_k.weight,
                                        unfused_block.to_v.weight])
                    assert torch.equal(merged, fused_block.to_qkv.weight)
                if hasattr(fused_block, "to_kv"):
                    merged = torch.cat([unfused_block.to_k.weight, unfused_block.to_v.weight])
                    assert torch.equal(merged, fused_block.to_kv.weight)
            assert checked > 0

    def test_fused_weights_are_restored(self, tiny_model_dir: Path,
                                        lora_files: dict[str, Path]) -> None:
        fused = Engine.load(SPEC, tiny_model_dir)
        fused.optimize()
        before, plain = weights(fused), pixels(fused, plan())
        fused.generate([plan(use(lora_files["a"]), use(lora_files["qkv"], 2.0))])
        after = weights(fused)
        assert all(torch.equal(before[key], after[key]) for key in before)
        assert np.array_equal(pixels(fused, plan()), plain)

    def test_a_lora_acts_under_torch_compile_without_recompiling(
            self, tiny_model_dir: Path, lora_files: dict[str, Path]) -> None:
        torch._dynamo.reset()
        graphs: list[int] = []

        def counting(graph: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs.append(1)
            return graph.forward

        compiled = Engine.load(SPEC, tiny_model_dir)
        compiled.optimize()
        compiled.compile(((512, 512),), None, backend=counting)
        count = len(graphs)
        job = plan(use(lora_files["a"]))
        eager = Engine.load(SPEC, tiny_model_dir)
        assert np.abs(pixels(compiled, job) - pixels(eager, job)).max() <= 1
        assert np.array_equal(pixels(compiled, plan()), pixels(eager, plan())) or \
            np.abs(pixels(compiled, plan()) - pixels(eager, plan())).max() <= 1
        assert len(graphs) == count  # in-place weights: the compiled graph is reused
        torch._dynamo.reset()


class TestBadFiles:
    @pytest.mark.parametrize(("kind", "says"), [
        ("sd15", "768-wide text features (SD 1.x)"),
        ("flux", "transformer model (Flux, SD3)"),
        ("loha", "LyCORIS LoHa"),
        ("nolora", "no LoRA weights"),
    ])
    def test_a_file_that_is_no_sdxl_lora_is_the_callers_error(
            self, engine: Engine, lora_files: dict[str, Path], kind: str, says: str) -> None:
        with pytest.raises(InputError, match=f"loras file '{kind}.safetensors'") as caught:
            engine.generate([plan(use(lora_files[kind]))])
        assert says in str(caught.value)

    def test_a_pickle_is_never_loaded(self, engine: Engine, tmp_path: Path) -> None:
        path = tmp_path / "evil.safetensors"
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
        with pytest.raises(InputError, match="is not a safetensors file"):
            engine.generate([plan(use(path))])

    @pytest.mark.parametrize("damage", ["alpha with two elements", "rank 0", "1-D factors"])
    def test_a_malformed_lora_is_the_callers_error_not_a_worker_bug(
            self, engine: Engine, tiny_model_dir: Path, tmp_path: Path, damage: str) -> None:
        # Found in review: these raised ValueError/ZeroDivisionError/IndexError on the GPU
        # thread: "internal error" and refresh_worker for any caller who sent such a file.
        from safetensors.torch import load_file, save_file

        path = make_tiny_model.write_kohya_lora(tmp_path / "bad.safetensors", tiny_model_dir)
        state = load_file(path)
        key = sorted(k for k in state if k.endswith(".lora_down.weight"))[0]
        stem = key.removesuffix(".lora_down.weight")
        if damage == "alpha with two elements":
            state[f"{stem}.alpha"] = torch.tensor([1.0, 2.0])
        elif damage == "rank 0":
            state[key] = state[key][:0]
            state[f"{stem}.lora_up.weight"] = state[f"{stem}.lora_up.weight"][:, :0]
        else:
            state[key] = state[key].flatten()
        save_file(state, path)
        with pytest.raises(InputError, match="loras file 'bad.safetensors'"):
            engine.generate([plan(use(path))])

    def test_a_file_evicted_while_queued_is_the_workers_failure_not_the_callers(
            self, engine: Engine, tiny_model_dir: Path, tmp_path: Path) -> None:
        from worker.errors import JobError

        path = make_tiny_model.write_kohya_lora(tmp_path / "gone.safetensors", tiny_model_dir,
                                                seed=9)
        job = plan(use(path))
        path.unlink()  # the download cache's eviction, between prepare and the GPU
        with pytest.raises(JobError, match="left the download cache while the job was queued"):
            engine.generate([job])

    def test_two_loras_on_one_fused_weight_restore_it_exactly(self, fused: Engine) -> None:
        # One at the Q rows of a fused to_qkv, one at the whole of it: row-slice backups
        # restored in turn used to leave the first LoRA's delta in the shared weights.
        from worker.engine import adapters

        weight = next(p for n, p in fused.pipes[4].unet.named_parameters()
                      if n.endswith("attn1.to_qkv.weight"))
        original = weight.detach().clone()
        rows, width = weight.shape[0] // 3, weight.shape[1]
        q_only = adapters.LoadedLora("q", (adapters.Factor(
            "unet", weight, slice(0, rows), torch.ones(rows, 1), torch.ones(1, width)),), 0)
        whole = adapters.LoadedLora("qkv", (adapters.Factor(
            "unet", weight, None, torch.ones(3 * rows, 1), torch.ones(1, width)),), 0)
        bank = adapters.LoraBank(fused.device, fused.dtype)
        loaded = {"q": q_only, "qkv": whole}
        bank.get = lambda steps, pipe, lora: loaded[lora.sha256]  # type: ignore[method-assign]
        uses = [LoraUse(path=n, file=n, sha256=n, scale=1.0) for n in ("q", "qkv")]
        with bank.merged(4, fused.pipes[4], uses):
            assert not torch.equal(weight, original)
        assert torch.equal(weight, original)

    def test_a_bad_file_leaves_the_pipeline_clean(self, tiny_model_dir: Path,
                                                  lora_files: dict[str, Path]) -> None:
        engine = Engine.load(SPEC, tiny_model_dir)
        before, plain = weights(engine), pixels(engine, plan())
        with pytest.raises(InputError):
            engine.generate([plan(use(lora_files["a"]), use(lora_files["sd15"]))])
        after = weights(engine)
        assert all(torch.equal(before[key], after[key]) for key in before)
        assert np.array_equal(pixels(engine, plan()), plain)


# ---- through the worker: the handler on the tiny model, LORA_DIR = <model folder>/loras ------

@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, lora_files: dict[str, Path]) -> Path:
    """The test LoRAs copied into the handler's default LORA_DIR (no network volume here)."""
    folder = tiny_model_dir / "loras"
    folder.mkdir(exist_ok=True)
    for name, path in lora_files.items():
        (folder / f"{name}.safetensors").write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def run(job_runner: Callable[..., Run]) -> Run:
    return job_runner("lora-job", prompt="a red fox", width=512, height=512, seed=21)


def image_bytes(response: dict) -> bytes:
    assert "images" in response, response
    return base64.b64decode(response["images"][0]["image"].split(",", 1)[1])


class TestThroughTheWorker:
    def test_a_lora_job_echoes_its_adapters_and_leaves_plain_jobs_unchanged(
            self, run: Run, served: Path) -> None:
        before = image_bytes(run())
        response = run(loras=[{"path": "a.safetensors", "scale": 0.75}])
        assert response["parameters"]["loras"] == [{
            "path": "a.safetensors", "scale": 0.75,
            "sha256": hashlib.sha256((served / "a.safetensors").read_bytes()).hexdigest()}]
        assert image_bytes(response) != before
        run(loras=[{"path": "b.safetensors", "scale": -1}, {"path": "text.safetensors"}])
        after = run()
        assert image_bytes(after) == before
        assert "loras" not in after["parameters"]

    def test_cut_and_clamped_adapters_are_warned_about(self, run: Run, served: Path) -> None:
        response = run(loras=[{"path": "a.safetensors", "scale": 7}] + [
            {"path": "b.safetensors"}] * 4)
        assert response["parameters"]["loras"][0]["scale"] == 4.0
        assert len(response["parameters"]["loras"]) == 4
        assert "loras: only the first 4 of 5 were used (MAX_LORAS=4)" in response["warnings"]
        assert "loras[0].scale 7 was clamped to 4 (allowed -2 to 4)" in response["warnings"]

    @pytest.mark.parametrize(("path", "says"), [
        ("sd15.safetensors", "SD 1.x"), ("flux.safetensors", "Flux"),
        ("nolora.safetensors", "no LoRA weights"), ("missing.safetensors", "no such file"),
        ("../model_index.json", "only .safetensors"),
    ])
    def test_a_bad_lora_is_a_clear_error_never_an_internal_one(
            self, run: Run, served: Path, path: str, says: str) -> None:
        response = run(loras=[{"path": path}])
        assert set(response) == {"error"}, response
        assert says in response["error"] and "internal" not in response["error"]

    def test_after_a_bad_lora_the_next_job_is_unchanged(self, run: Run, served: Path) -> None:
        before = image_bytes(run(seed=22))
        run(loras=[{"path": "a.safetensors"}, {"path": "sd15.safetensors"}], seed=22)
        assert image_bytes(run(seed=22)) == before
