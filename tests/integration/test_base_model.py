"""BASE_MODEL: a tiny "fine-tune" loaded in each LIGHTNING_MODE, through the very code real
files use (``worker/engine/base_model.py``), against diffusers' own recipe as the reference;
and every model that is not SDXL refused at start with one clear line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from builder import make_tiny_model
from builder.tiny_finetune import FINETUNE_DIR, FINETUNE_FILE
from pipeline import Engine
from worker import startup
from worker.engine import base_model
from worker.errors import StartupError
from worker.plan import warmup_plan
from worker.settings import Settings
from worker.spec import CHECKPOINTS, LORAS, ModelSpec, sha256_of

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base config folder with the Lightning UNets (2, 4, 8), the tiny fine-tune in
    both layouts and its Lightning LoRAs: every mode can load from it."""
    spec = ModelSpec(steps=(2, 4, 8), base_model=FINETUNE_DIR, lightning_mode="unet")
    return make_tiny_model.build(tmp_path_factory.mktemp("own") / "model", spec)


def load(folder: Path, base: str, mode: str, steps: tuple[int, ...] = (4,),
         scale: float = 1.0) -> Engine:
    return Engine.load(ModelSpec(steps=steps, base_model=base, lightning_mode=mode,
                                 lora_scale=scale), folder, CPU)


def image(engine: Engine, steps: int = 4) -> np.ndarray:
    return np.asarray(engine.run_batch([warmup_plan(steps, 512, 512)])[0][0]).astype(int)


def reference(folder: Path, steps: int, lora: bool) -> Engine:
    """diffusers' own recipe by hand: the fine-tune folder, + load_lora_weights + fuse_lora
    (ByteDance's card), Euler with trailing timesteps."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / FINETUNE_DIR, dtype=torch.float32,
                                                     add_watermarker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(folder / "scheduler"), timestep_spacing="trailing")
    if lora:
        pipe.load_lora_weights(str(folder), weight_name=LORAS[steps])
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    spec = ModelSpec(steps=(steps,))
    return Engine(spec, {steps: pipe}, CPU, torch.float32)


class TestLoraMode:
    def test_equals_fusing_the_lora_by_hand_with_diffusers(self, own_dir: Path) -> None:
        ours = load(own_dir, FINETUNE_DIR, "lora")
        ref = reference(own_dir, 4, lora=True)
        mine = ours.pipes[4].unet.state_dict()
        fused = {name.replace(".base_layer", ""): tensor  # the card's recipe keeps the wrappers
                 for name, tensor in ref.pipes[4].unet.state_dict().items() if "lora_" not in name}
        assert set(fused) == set(mine)
        for name, tensor in fused.items():
            torch.testing.assert_close(mine[name], tensor)
        assert np.array_equal(image(ours), image(ref))

    def test_a_kohya_layout_lora_fuses_the_same(self, own_dir: Path, tmp_path: Path) -> None:
        """LoRA files also come in kohya's layout (lora_unet_*, lora_down/up, alpha): the same
        weights in it give the same images."""
        from safetensors.torch import save_file

        kohya = {}
        for key, tensor in load_file(own_dir / LORAS[4]).items():
            module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
            name = "lora_unet_" + module.replace(".", "_")
            down = kind.startswith("A")
            kohya[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = tensor
            if down:  # alpha = rank: scale 1, as the diffusers-format file has
                kohya[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]), dtype=tensor.dtype)
        for path in own_dir.iterdir():
            if path.name != LORAS[4]:
                (tmp_path / path.name).symlink_to(path)
        save_file(kohya, str(tmp_path / LORAS[4]))
        assert np.array_equal(image(load(tmp_path, FINETUNE_DIR, "lora")),
                              image(load(own_dir, FINETUNE_DIR, "lora")))

    def test_a_lora_that_matches_no_layer_stops_the_start(self, own_dir: Path,
                                                          tmp_path: Path) -> None:
        """diffusers only warns for a LoRA of another architecture (Flux keys here)."""
        from safetensors.torch import save_file

        for path in own_dir.iterdir():
            if path.name != LORAS[4]:
                (tmp_path / path.name).symlink_to(path)
        save_file({"transformer.single_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
                   "transformer.single_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)},
                  str(tmp_path / LORAS[4]))
        with pytest.raises(StartupError, match=f"{LORAS[4]} did not apply to BASE_MODEL's UNet"):
            load(tmp_path, FINETUNE_DIR, "lora")

    def test_differs_from_the_fine_tune_alone(self, own_dir: Path) -> None:
        fused = image(load(own_dir, FINETUNE_DIR, "lora"))
        alone = image(reference(own_dir, 4, lora=False))
        assert np.abs(fused - alone).mean() > 1

    def test_leaves_no_lora_layer_behind(self, own_dir: Path) -> None:
        engine = load(own_dir, FINETUNE_DIR, "lora", steps=(2, 4, 8))
        for pipe in engine.pipes.values():
            assert not [n for n, _ in pipe.unet.named_modules() if "lora" in n.lower()]

    def test_one_unet_per_step_count_each_the_size_of_the_model(self, own_dir: Path) -> None:
        engine = load(own_dir, FINETUNE_DIR, "lora", steps=(2, 4, 8))
        unets = {id(p.unet) for p in engine.pipes.values()}
        assert len(unets) == 3
        alone = base_model.load_model(ModelSpec(base_model=FINETUNE_DIR, lightning_mode="none"),
                                      own_dir, "folder", CPU, torch.float32)
        sizes = [v for k, v in engine.resident_bytes().items() if "UNet" in k]
        assert sizes == [sum(t.numel() * 4 for t in alone.unet.state_dict().values())] * 3

    def test_each_step_count_has_its_own_lora(self, own_dir: Path) -> None:
        engine = load(own_dir, FINETUNE_DIR, "lora", steps=(2, 4))
        assert not np.array_equal(image(engine, 2), image(engine, 4))
        first = next(iter(engine.pipes[2].unet.state_dict().values()))
        assert first.data_ptr() != next(iter(engine.pipes[4].unet.state_dict().values())).data_ptr()

    def test_the_scale_is_applied(self, own_dir: Path) -> None:
        assert not np.array_equal(image(load(own_dir, FINETUNE_DIR, "lora", scale=0.5)),
                                  image(load(own_dir, FINETUNE_DIR, "lora")))

    def test_fused_qkv_after_the_fuse_keeps_the_image(self, own_dir: Path) -> None:
        """optimize() (CUDA) fuses QKV and deletes the unfused projections: the LoRA was fused
        into them first, so the fused projections carry it."""
        engine = load(own_dir, FINETUNE_DIR, "lora")
        before = image(engine)
        lora_effect = np.abs(image(reference(own_dir, 4, lora=False)) - before).mean()
        engine.optimize()
        # Not bit-exact: the concatenated matmul sums in another order, and the tiny LoRA's
        # large deltas amplify that (mean 0.4 of 255, against 11.8 for the LoRA itself).
        assert np.abs(image(engine) - before).mean() < 0.1 * lora_effect


class TestLayouts:
    def test_single_file_and_folder_give_the_same_images(self, own_dir: Path) -> None:
        folder = image(load(own_dir, FINETUNE_DIR, "lora"))
        single = image(load(own_dir, FINETUNE_FILE, "lora"))
        assert np.array_equal(folder, single)

    def test_an_absolute_path_works(self, own_dir: Path) -> None:
        engine = load(own_dir, str(own_dir / FINETUNE_FILE), "none", steps=(4,))
        assert engine.steps == (4,)


class TestOtherModes:
    def test_unet_mode_swaps_in_the_lightning_unet(self, own_dir: Path) -> None:
        engine = load(own_dir, FINETUNE_DIR, "unet", steps=(2, 4))
        want = load_file(own_dir / CHECKPOINTS[4])
        got = engine.pipes[4].unet.state_dict()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor.float())
        ref = reference(own_dir, 4, lora=False).pipes[4]
        assert torch.equal(engine.pipes[4].text_encoder_2.text_projection.weight,
                           ref.text_encoder_2.text_projection.weight)  # the model's encoders

    def test_none_mode_runs_the_model_as_it_is_for_every_step_count(self,
                                                                    own_dir: Path) -> None:
        engine = load(own_dir, FINETUNE_DIR, "none", steps=(3, 4, 5, 6))
        assert engine.steps == (3, 4, 5, 6) and len(engine.distinct_pipes()) == 1
        assert np.array_equal(image(engine), image(reference(own_dir, 4, lora=False)))
        assert list(engine.resident_bytes())[0] == "UNet (steps 3-6)"
        engine.warm_up()  # once, at the smallest count: no error


class TestReporting:
    def test_parameters_name_the_model_its_hash_and_the_lightning_file(self,
                                                                       own_dir: Path) -> None:
        engine = load(own_dir, FINETUNE_FILE, "lora", steps=(2, 4), scale=0.75)
        digest = sha256_of(own_dir / FINETUNE_FILE)
        plan = warmup_plan(4, 512, 512).with_served(engine.served)
        params = plan.parameters()
        assert params["model"] == f"{FINETUNE_FILE} sha256:{digest}"
        assert params["checkpoint"] == "sdxl_lightning_4step_lora.safetensors (scale 0.75)"

    def test_a_recorded_source_is_reported_as_repo_at_revision(self, own_dir: Path,
                                                               tmp_path: Path) -> None:
        (own_dir / f"{FINETUNE_DIR}.source.json").write_text(json.dumps(
            {"name": "someone/tiny-xl", "revision": "0123abcd"}))
        try:
            engine = load(own_dir, FINETUNE_DIR, "none")
        finally:
            (own_dir / f"{FINETUNE_DIR}.source.json").unlink()
        params = warmup_plan(4, 512, 512).with_served(engine.served).parameters()
        assert params["model"] == "someone/tiny-xl@0123abcd" and params["checkpoint"] is None

    def test_start_up_from_the_environment(self, own_dir: Path) -> None:
        engine = startup.start(Settings.from_env({
            "MODEL_DIR": str(own_dir), "BASE_MODEL": FINETUNE_DIR, "LIGHTNING_STEPS": "2,8",
            "DEVICE": "cpu", "DOWNLOAD_MISSING_WEIGHTS": "false"}))
        assert engine.steps == (2, 8)
        assert engine.served[8][1] == LORAS[8]


def write_header(path: Path, keys: dict[str, list[int]]) -> Path:
    """A .safetensors file with these tensor names and shapes (zeros): enough for ``check``."""
    header, offset = {}, 0
    for name, shape in keys.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


U = "model.diffusion_model."


class TestNotSdxl:
    @pytest.mark.parametrize(("keys", "found"), [
        ({f"{U}input_blocks.0.0.weight": [1, 4, 1, 1],
          "cond_stage_model.transformer.text_model.final_layer_norm.weight": [1]},
         "Stable Diffusion 1.x"),
        ({f"{U}input_blocks.0.0.weight": [1, 4, 1, 1],
          "cond_stage_model.model.ln_final.weight": [1]}, "Stable Diffusion 2.x"),
        ({f"{U}joint_blocks.0.context_block.adaLN_modulation.1.bias": [1]},
         "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": [1]}, "Flux"),
        ({"encoder.conv_in.weight": [1], "decoder.conv_out.weight": [1]}, "a VAE alone"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [1]}, "a LoRA"),
        ({"conv_in.weight": [1], "down_blocks.0.resnets.0.conv1.weight": [1]}, "a UNet alone"),
        ({f"{U}input_blocks.0.0.weight": [1, 4, 1, 1],
          "conditioner.embedders.0.model.ln_final.weight": [1]}, "the SDXL refiner"),
        ({f"{U}input_blocks.0.0.weight": [1, 9, 1, 1], f"{U}label_emb.0.0.weight": [1],
          f"{U}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [1, 80],
          "conditioner.embedders.0.transformer.x": [1], "conditioner.embedders.1.model.x": [1],
          "first_stage_model.x": [1]}, "an SDXL inpainting model"),
    ])
    def test_a_single_file_that_is_not_sdxl_names_what_it_is(
            self, own_dir: Path, tmp_path: Path, keys: dict[str, list[int]], found: str) -> None:
        path = write_header(tmp_path / "model.safetensors", keys)
        with pytest.raises(StartupError) as caught:
            load(own_dir, str(path), "lora")
        message = str(caught.value)
        assert f"is {found} (" in message and "not an SDXL model" in message
        assert "\n" not in message

    @pytest.mark.parametrize(("index", "found"), [
        ({"_class_name": "StableDiffusionPipeline"}, "Stable Diffusion 1.x/2.x"),
        ({"_class_name": "FluxPipeline"}, "Flux"),
        ({"_class_name": "StableDiffusion3Pipeline"}, "Stable Diffusion 3"),
        ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]},
         "the SDXL refiner"),
    ])
    def test_a_folder_that_is_not_sdxl_names_what_it_is(
            self, own_dir: Path, tmp_path: Path, index: dict, found: str) -> None:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(StartupError, match=f"is {found} "):
            load(own_dir, str(tmp_path), "lora")

    def test_a_vae_folder_alone(self, own_dir: Path, tmp_path: Path) -> None:
        (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
        with pytest.raises(StartupError, match="is a AutoencoderKL alone"):
            load(own_dir, str(tmp_path), "none")

    def test_a_pickle_is_refused_before_it_is_read(self, own_dir: Path, tmp_path: Path) -> None:
        (tmp_path / "model.ckpt").write_bytes(b"not read")
        with pytest.raises(StartupError, match=r"is a \.ckpt file: only \.safetensors"):
            load(own_dir, str(tmp_path / "model.ckpt"), "lora")

    def test_a_missing_model_says_where_it_looked(self, own_dir: Path) -> None:
        with pytest.raises(StartupError, match="does not exist"):
            load(own_dir, "nowhere.safetensors", "lora")

    def test_the_worker_start_says_it_in_one_line(self, own_dir: Path, tmp_path: Path) -> None:
        path = write_header(tmp_path / "sd15.safetensors", {
            f"{U}input_blocks.0.0.weight": [1, 4, 1, 1],
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": [1]})
        with pytest.raises(StartupError, match="Stable Diffusion 1.x"):
            startup.start(Settings.from_env({"MODEL_DIR": str(own_dir), "BASE_MODEL": str(path),
                                             "DEVICE": "cpu"}))


REV = "0123456789abcdef0123456789abcdef01234567"


class TestBaked:
    @pytest.mark.parametrize("layout", ["folder", "file"])
    def test_the_downloader_bakes_a_model_the_engine_serves(
            self, own_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            layout: str) -> None:
        """A loopback hub holds the fine-tune as a diffusers repo (and its single file), the
        base configs and the LoRAs: ``download_weights --bake`` fills a fresh folder, and the
        engine serves from it what it serves from the original."""
        from builder import download_weights
        from tests.support.fake_hub import files_of, serving_hub

        spec = ModelSpec(steps=(4,), base_model="baked-model", lightning_mode="lora")
        files = files_of(own_dir, spec)
        repo = own_dir / FINETUNE_DIR
        names = [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()]
        files |= {f"/tiny/ft/resolve/{REV}/{n}": (repo / n).read_bytes() for n in names}
        files[f"/tiny/ft/resolve/{REV}/{FINETUNE_FILE}"] = (own_dir / FINETUNE_FILE).read_bytes()
        files[f"/api/models/tiny/ft/revision/{REV}"] = json.dumps(
            {"siblings": [{"rfilename": n} for n in names + [FINETUNE_FILE]]}).encode()
        source = f"tiny/ft@{REV}" + (f":{FINETUNE_FILE}" if layout == "file" else "")
        with serving_hub(files) as hub:
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            assert download_weights.main([str(tmp_path), "--steps", "4", "--bake", source]) == 0
        engine = Engine.load(spec, tmp_path, CPU)
        assert np.array_equal(image(engine), image(load(own_dir, FINETUNE_DIR, "lora")))
        name = "tiny/ft" if layout == "folder" else f"tiny/ft/{FINETUNE_FILE}"
        assert engine.served[4] == (f"{name}@{REV}", LORAS[4])


class TestJobFlow:
    def test_a_job_on_a_merge_gets_the_operators_defaults_and_reports_the_model(
            self, own_dir: Path) -> None:
        """Through the job flow both front doors serve from (worker/service.py)."""
        import asyncio

        service = startup.assemble(Settings.from_env({
            "MODEL_DIR": str(own_dir), "BASE_MODEL": FINETUNE_FILE, "LIGHTNING_MODE": "none",
            "STEPS_RANGE": "3-5", "DEFAULT_STEPS": "5", "DEFAULT_GUIDANCE": "1.5",
            "DEFAULT_SCHEDULER": "DDIM", "DEVICE": "cpu", "WARMUP": "false"}))
        try:
            defaults = asyncio.run(service.run(
                {"prompt": "a fox", "width": 512, "height": 512, "seed": 1}, None, "j1"))
            chosen = asyncio.run(service.run(
                {"prompt": "a fox", "width": 512, "height": 512, "seed": 1,
                 "num_inference_steps": 9, "scheduler": "K_EULER"}, None, "j2"))
        finally:
            service.gpu.close()
        params = defaults.reply["parameters"]
        assert (params["num_inference_steps"], params["guidance_scale"],
                params["scheduler"]) == (5, 1.5, "DDIM")
        digest = sha256_of(own_dir / FINETUNE_FILE)
        assert params["model"] == f"{FINETUNE_FILE} sha256:{digest}"
        assert params["checkpoint"] is None
        assert chosen.reply["parameters"]["num_inference_steps"] == 5  # 9 -> nearest served
        assert chosen.reply["parameters"]["scheduler"] == "K_EULER"
        assert any("resolved to 5" in w for w in chosen.reply["warnings"])
