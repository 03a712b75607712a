"""The image's files alone: only what the Dockerfile copies into /app, in a folder of their own,
run the self-test that ``docker run`` without RunPod runs, on the tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import MAX_IMAGES
from tests.support.dockerfile import DOCKERFILE, ROOT, expand_args, image_files

# Environment variables stripped so that the self-test runs as `docker run` would.
RUNPOD_VARS = ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_AI_API_KEY", "RUNPOD_POD_ID", "RUNPOD_ENDPOINT_ID")


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
        build_args = {"LIGHTNING_STEPS": DOCKERFILE.global_args["LIGHTNING_STEPS"]}
        env.update({k: expand_args(v, build_args)
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
