"""examples/client.py against the worker's real local API server (``python handler.py
--rp_serve_api`` on the tiny model): submit, POST-only ``/status``, decode, save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.support.example_client import ROOT, client, saved
from tests.support.loopback import free_port
from tests.support.processes import stop

SERVER_START_TIMEOUT_S = 240  # imports torch and loads the tiny model: ~10-20 s, slower if busy


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[str]:
    """``python handler.py --rp_serve_api`` on a free port, on the tiny model (MODEL_DIR)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
             "--rp_api_port", str(port)],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n"
                            f"{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer in {SERVER_START_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


class TestAgainstTheLocalServer:
    def test_run_then_status_saves_a_png_of_the_requested_size(
            self, local_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        job = {"prompt": "a lighthouse at dusk", "width": 512, "height": 640, "seed": 3}
        code = client.main(["--base-url", local_server, "--input", json.dumps(job),
                            "--out", str(tmp_path), "--poll-interval", "0.1", "--timeout", "300"])
        assert code == 0, capsys.readouterr().err
        [path] = saved(tmp_path)
        assert path.suffix == ".png" and "seed3" in path.name
        assert str(path) in capsys.readouterr().out
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (512, 640)

    def test_sync_saves_every_image_of_a_batch(self, local_server: str, tmp_path: Path) -> None:
        code = client.main(["--base-url", local_server, "--prompt", "a red fox", "--input",
                            '{"num_images": 2, "width": 512, "height": 512, "seed": 10}',
                            "--sync", "--out", str(tmp_path), "--timeout", "300"])
        assert code == 0
        paths = saved(tmp_path)
        assert [p.name.split("-seed")[1] for p in paths] == ["10.png", "11.png"]
        for path in paths:
            with Image.open(path) as image:
                assert image.size == (512, 512)

    def test_a_rejected_input_exits_1_with_the_workers_message(
            self, local_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        code = client.main(["--base-url", local_server, "--input",
                            '{"prompt": "p", "num_images": 9}', "--out", str(tmp_path),
                            "--timeout", "300", "--poll-interval", "0.1"])
        assert code == 1
        err = capsys.readouterr().err
        assert "FAILED" in err and "num_images" in err
        assert saved(tmp_path) == []


class TestTheReadmeSnippet:
    def test_run_then_post_status_as_the_readme_shows(self, local_server: str) -> None:
        # README "On your machine": the SDK's local server takes POST /status, and runs the
        # job when it is polled.
        base = local_server
        job = requests.post(f"{base}/run", json={"input": {
            "prompt": "a red fox", "width": 512, "height": 512, "seed": 7}}, timeout=30).json()
        status = requests.post(f"{base}/status/{job['id']}", timeout=300).json()
        assert status["status"] == "COMPLETED"
        assert status["output"]["images"][0]["seed"] == 7
        assert requests.get(f"{base}/status/{job['id']}", timeout=30).status_code == 405
