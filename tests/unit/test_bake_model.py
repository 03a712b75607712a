"""``download_weights --bake``: BASE_MODEL sources, which files of a diffusers repo are
fetched, and a bake from a stand-in hub on 127.0.0.1 (the engine loading the result is in
tests/integration/test_base_model.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder import download_weights
from builder.download_weights import DownloadError, bake, diffusers_files, parse_source
from tests.support.fake_hub import FakeHub, safetensors_bytes, serving_hub

REV = "0123456789abcdef0123456789abcdef01234567"


def weights(tag: str) -> bytes:
    data = tag.encode()
    return safetensors_bytes({"w": {"dtype": "U8", "shape": [len(data)],
                                    "data_offsets": [0, len(data)]}}, data)


REPO_FILES = {
    "model_index.json": json.dumps({"_class_name": "StableDiffusionXLPipeline"}).encode(),
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.fp16.safetensors": weights("unet fp16"),
    "unet/diffusion_pytorch_model.safetensors": weights("unet fp32"),
    "unet/diffusion_pytorch_model.bin": b"pickle",
    "vae/config.json": b"{}",
    "vae/diffusion_pytorch_model.safetensors": weights("vae"),
    "tokenizer/vocab.json": b"{}",
    "tokenizer/merges.txt": b"#version: 0.2\n",
    "juggernaut_v9.safetensors": weights("the single file, 7 GB in life"),
    "README.md": b"# a card",
}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    files = {f"/someone/xl-finetune/resolve/{REV}/{name}": body
             for name, body in REPO_FILES.items()}
    files[f"/api/models/someone/xl-finetune/revision/{REV}"] = json.dumps(
        {"siblings": [{"rfilename": name} for name in REPO_FILES]}).encode()
    files["/downloads/model.safetensors"] = weights("from a URL")
    with serving_hub(files) as hub:
        yield hub


@pytest.fixture(autouse=True)
def no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


class TestSources:
    def test_a_pinned_repo_a_file_in_it_and_a_url(self) -> None:
        assert parse_source(f"a/b@{REV}") == ("a/b", REV, None)
        assert parse_source(f"a/b@{REV}:x/m.safetensors") == ("a/b", REV, "x/m.safetensors")
        assert parse_source("https://h.example/m.safetensors?t=1") == \
            "https://h.example/m.safetensors?t=1"

    @pytest.mark.parametrize(("source", "says"), [
        ("a/b", "40-hex commit"), ("a/b@main", "40-hex commit"),
        ("http://h.example/m.safetensors", "only https"),
        ("https://h.example/m.ckpt", "must name a .safetensors file"),
        (f"a/b@{REV}:m.ckpt", "is not a .safetensors file"),
    ])
    def test_an_unpinned_or_unsafe_source_is_refused(self, source: str, says: str) -> None:
        with pytest.raises(DownloadError, match=says):
            parse_source(source)


class TestRepoFiles:
    def test_only_the_pipeline_in_safetensors_prefers_fp16(self) -> None:
        chosen = sorted(diffusers_files(list(REPO_FILES), "r"))
        assert chosen == ["model_index.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
                          "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                          "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]

    def test_a_repo_without_an_index_points_to_the_single_file_form(self) -> None:
        with pytest.raises(DownloadError, match=r"no model_index\.json.*:path/model"):
            diffusers_files(["m.safetensors"], "a/b@x")

    def test_pickled_weights_only_are_refused(self) -> None:
        with pytest.raises(DownloadError, match="only pickled weights"):
            diffusers_files(["model_index.json", "unet/config.json",
                             "unet/diffusion_pytorch_model.bin"], "r")


class TestBake:
    def test_a_diffusers_repo_lands_in_baked_model_with_its_revision(
            self, hub: FakeHub, tmp_path: Path) -> None:
        assert bake(tmp_path, f"someone/xl-finetune@{REV}", hub.url, backoff_s=0) == \
            "baked-model"
        got = {p.relative_to(tmp_path / "baked-model").as_posix()
               for p in (tmp_path / "baked-model").rglob("*") if p.is_file()}
        assert got == set(diffusers_files(list(REPO_FILES), "r"))
        assert (tmp_path / "baked-model/unet/diffusion_pytorch_model.fp16.safetensors"
                ).read_bytes() == REPO_FILES["unet/diffusion_pytorch_model.fp16.safetensors"]
        assert json.loads((tmp_path / "baked-model.source.json").read_text()) == {
            "name": "someone/xl-finetune", "revision": REV}

    def test_one_file_of_a_repo(self, hub: FakeHub, tmp_path: Path) -> None:
        bake(tmp_path, f"someone/xl-finetune@{REV}:juggernaut_v9.safetensors", hub.url)
        assert (tmp_path / "baked-model/juggernaut_v9.safetensors").read_bytes() == \
            REPO_FILES["juggernaut_v9.safetensors"]
        record = json.loads(
            (tmp_path / "baked-model/juggernaut_v9.safetensors.source.json").read_text())
        assert record["revision"] == REV

    def test_a_url_is_recorded_by_its_sha256(self, hub: FakeHub, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        url = f"{hub.url}/downloads/model.safetensors"  # the stand-in speaks http, not https
        monkeypatch.setattr(download_weights, "parse_source", lambda source: url)
        bake(tmp_path, "https://h.example/model.safetensors", hub.url)
        body = (tmp_path / "baked-model/model.safetensors").read_bytes()
        assert body == weights("from a URL")
        record = json.loads((tmp_path / "baked-model/model.safetensors.source.json").read_text())
        assert record == {"name": "model.safetensors", "url": url,
                          "sha256": hashlib.sha256(body).hexdigest()}
        assert "authorization" not in {k.lower() for k in hub.requests[-1][1]}

    def test_a_broken_transfer_is_retried(self, hub: FakeHub, tmp_path: Path) -> None:
        path = f"/someone/xl-finetune/resolve/{REV}/vae/diffusion_pytorch_model.safetensors"
        hub.faults[path] = ["cut", "503"]
        bake(tmp_path, f"someone/xl-finetune@{REV}", hub.url, backoff_s=0)
        assert hub.count(path) == 3
        assert not list(tmp_path.rglob("*.part"))

    def test_the_cli_bakes_then_fetches_what_the_mode_needs(
            self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        seen: list[object] = []
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(download_weights, "download",
                            lambda folder, spec: seen.append(spec) or 0)
        code = download_weights.main([str(tmp_path), "--steps", "4", "8", "--bake",
                                      f"someone/xl-finetune@{REV}"])
        assert code == 0
        [spec] = seen
        assert (spec.base_model, spec.lightning_mode, spec.steps) == ("baked-model", "lora",
                                                                      (4, 8))


class TestDockerBuildArgs:
    def test_base_model_is_baked_and_served_by_its_baked_name(self) -> None:
        from tests.support.dockerfile import DOCKERFILE, expand_args
        from tests.unit.test_deploy_files import TestDockerfileWeights
        from worker.settings import Settings

        source = f"someone/xl-finetune@{REV}"
        argv = TestDockerfileWeights().builder_argv(BASE_MODEL=source, LIGHTNING_MODE="lora",
                                                    LIGHTNING_STEPS="4,8")
        assert argv[argv.index("--bake") + 1] == source
        assert argv[argv.index("--lightning-mode") + 1] == "lora"
        build_args = {**DOCKERFILE.global_args, "BASE_MODEL": source, "LIGHTNING_MODE": "lora",
                      "LIGHTNING_STEPS": "4,8"}
        env = {k: expand_args(v, build_args) for k, v in DOCKERFILE.final.env().items()
               if k in Settings.ENV}
        spec = Settings.from_env(env).model_spec
        assert (spec.base_model, spec.lightning_mode, spec.steps) == ("baked-model", "lora",
                                                                      (4, 8))

    def test_without_base_model_nothing_is_added(self) -> None:
        from tests.unit.test_deploy_files import TestDockerfileWeights

        argv = TestDockerfileWeights().builder_argv()
        assert "--bake" not in argv and "--lightning-mode" not in argv
