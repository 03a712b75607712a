"""GPU memory the weights hold: fused QKV without the unfused copies, the per-checkpoint figure
the start-up log prints, and out of memory while loading said as such.

The CUDA path (``Engine.optimize``) is forced on the CPU: the tiny model has the real UNet's
attention layout (self-attention fused to ``to_qkv``, cross-attention to ``to_q`` + ``to_kv``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from pipeline import Engine, ModelMemoryError, memory_text
from worker.engine import loading
from worker.errors import ModelFolderError, StartupError
from worker.plan import Plan
from worker.spec import CHECKPOINTS, ModelSpec

SPEC = ModelSpec(steps=(4,))


@pytest.fixture
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(SPEC, tiny_model_dir)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def image(engine: Engine, seeds: tuple[int, ...] = (3, 4)) -> np.ndarray:
    plan = Plan(prompt="a cat", negative_prompt="a dog", width=512, height=512, steps=4,
                guidance_scale=2.0, seeds=seeds)
    return np.stack([np.asarray(i) for i in engine.generate([plan])[0]])


def diffusers_fusing(engine: Engine) -> None:
    """What optimize() did before: diffusers' fuse, which keeps to_q/to_k/to_v."""
    for module in (engine.pipes[4].unet, engine.vae):
        module.to(memory_format=torch.channels_last)
        module.fuse_qkv_projections()


class TestFusedQkv:
    def test_fused_models_hold_as_many_parameters_as_unfused_ones(self, engine: Engine) -> None:
        unet, vae = engine.pipes[4].unet, engine.vae
        before = parameters(unet), parameters(vae)
        engine.optimize()
        assert (parameters(unet), parameters(vae)) == before
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {
            "FusedAttnProcessor2_0"}
        attentions = [m for m in unet.modules() if isinstance(m, Attention)]
        kept = {(a.is_cross_attention, tuple(n for n in ("to_q", "to_k", "to_v", "to_qkv",
                                                            "to_kv") if hasattr(a, n)))
                for a in attentions}
        assert kept == {(False, ("to_qkv",)), (True, ("to_q", "to_kv"))}

    def test_diffusers_own_fusing_would_keep_the_unfused_copies(self, engine: Engine) -> None:
        """The figure the fix removes: on SDXL 0.648 B parameters per UNet."""
        unet = engine.pipes[4].unet
        before = parameters(unet)
        qkv = sum(parameters(getattr(a, n)) for a in unet.modules() if isinstance(a, Attention)
                  for n in (("to_k", "to_v") if a.is_cross_attention else ("to_q", "to_k",
                                                                           "to_v")))
        diffusers_fusing(engine)
        assert parameters(unet) == before + qkv > before

    def test_images_equal_those_of_diffusers_own_fusing(self, tiny_model_dir: Path) -> None:
        ours, theirs = Engine.load(SPEC, tiny_model_dir), Engine.load(SPEC, tiny_model_dir)
        unfused = image(ours)
        ours.optimize()
        diffusers_fusing(theirs)
        assert np.array_equal(image(ours), image(theirs))
        assert np.abs(image(ours).astype(np.int16) - unfused).max() <= 1

    def test_optimizing_twice_changes_nothing(self, engine: Engine) -> None:
        engine.optimize()
        count, pixels = parameters(engine.pipes[4].unet), image(engine)
        engine.optimize()
        assert parameters(engine.pipes[4].unet) == count
        assert np.array_equal(image(engine), pixels)

    def test_the_fused_unet_compiles_as_on_cuda(self, engine: Engine) -> None:
        """On CUDA, load optimizes and COMPILE=true then compiles the fused UNet."""
        engine.optimize()
        before = image(engine, (5,))
        torch._dynamo.reset()
        try:
            engine.compile(((512, 512),), None, backend="eager")
            assert np.array_equal(image(engine, (5,)), before)
        finally:
            torch._dynamo.reset()

    def test_unfusing_says_it_cannot_rather_than_run_without_weights(
            self, engine: Engine) -> None:
        engine.optimize()
        for module in (engine.pipes[4].unet, engine.vae):
            with pytest.raises(RuntimeError, match="cannot be unfused: the separate Q/K/V"):
                module.unfuse_qkv_projections()


class TestResidentBytes:
    def test_a_checkpoint_holds_its_files_tensors_after_optimize(
            self, engine: Engine, tiny_model_dir: Path) -> None:
        engine.optimize()
        on_disk = load_file(tiny_model_dir / CHECKPOINTS[4])
        want = sum(t.numel() for t in on_disk.values()) * 4  # held in fp32 on the CPU
        held = engine.resident_bytes()
        assert list(held) == ["4-step UNet", "shared (text encoders, VAE)"]
        assert held["4-step UNet"] == want
        assert held["shared (text encoders, VAE)"] == sum(
            loading.resident_bytes(m) for m in (engine.pipes[4].text_encoder,
                                                engine.pipes[4].text_encoder_2, engine.vae))

    def test_weight_sizes_are_read_from_the_file_headers(self, engine: Engine,
                                                         tiny_model_dir: Path) -> None:
        sizes = loading.weights_bytes(tiny_model_dir, SPEC, torch.float32)
        assert sizes[CHECKPOINTS[4]] == engine.resident_bytes()["4-step UNet"]
        half = loading.weights_bytes(tiny_model_dir, SPEC, torch.float16)
        assert half[CHECKPOINTS[4]] * 2 == sizes[CHECKPOINTS[4]]


class TestOutOfMemoryWhileLoading:
    @pytest.mark.parametrize("error", [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError])
    @pytest.mark.parametrize("where", ["load_unet", "shared_components"])
    def test_is_said_to_be_memory_not_a_corrupt_folder(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, error: type,
            where: str) -> None:
        def oom(*args: object, **kwargs: object) -> None:
            raise error("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")

        monkeypatch.setattr(loading, where, oom)
        monkeypatch.setattr(loading, "gpu_memory", lambda device: (2 * 10**9, 8 * 10**9))
        with pytest.raises(ModelMemoryError) as info:
            Engine.load(SPEC, tiny_model_dir)
        assert isinstance(info.value, StartupError)
        assert not isinstance(info.value, ModelFolderError)
        sizes = loading.weights_bytes(tiny_model_dir, SPEC, torch.float32)
        message = str(info.value)
        assert message.startswith(
            f"out of GPU memory loading checkpoints [4] on cpu: the weights take "
            f"{memory_text(sum(sizes.values()))} in float32, the GPU has 8.00 GB (2.00 GB of "
            f"it free before loading)")
        assert f"each checkpoint is a {memory_text(sizes[CHECKPOINTS[4]])} UNet" in message
        assert "a GPU with more memory" in message and "\n" not in message

    def test_the_unet_load_does_not_call_it_a_wrong_file(
            self, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """load_unet's own guard turns RuntimeError into "does not fit": not for memory."""
        def oom(*args: object, **kwargs: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        monkeypatch.setattr(torch.nn.Module, "load_state_dict", oom)
        with pytest.raises(torch.OutOfMemoryError):
            loading.load_unet(tiny_model_dir, 4, torch.device("cpu"), torch.float32)
