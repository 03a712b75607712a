"""HTTP mode as RunPod runs it: ``WORKER_MODE=http python handler.py``, a process on loopback.

RunPod's load-balancing health contract: ``/ping`` answers 204 while the model loads (not
"connection refused" for the whole load: the server listens before torch is imported), 200 when
ready, and 500 with the reason when the worker cannot serve.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.support.example_client import ROOT
from tests.support.loopback import free_port
from tests.support.processes import stop

START_TIMEOUT_S = 240  # torch import and the tiny model's load: ~10-20 s, slower when busy


@contextmanager
def http_worker(tmp_path: Path, **env: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    log_path = tmp_path / "worker.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    full_env.update(WORKER_MODE="http", HOST="127.0.0.1", PORT=str(port), **env)
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env=full_env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc, log_path
    finally:
        stop(proc)


def statuses_until(url: str, proc: subprocess.Popen, log_path: Path, final: set[int]) -> list:
    """Every /ping status seen (None: connection refused) until one in ``final``."""
    seen: list[int | None] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker exited:\n{log_path.read_text()[-3000:]}"
        try:
            seen.append(requests.get(f"{url}/ping", timeout=5).status_code)
        except requests.ConnectionError:
            seen.append(None)
        if seen[-1] in final:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"no {final} in {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def test_ping_says_initializing_while_loading_then_healthy(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    health = free_port()  # PORT_HEALTH apart from PORT: a second listener serves /ping there
    with http_worker(tmp_path, MODEL_DIR=str(tiny_model_dir),
                     PORT_HEALTH=str(health)) as (url, proc, log_path):
        seen = statuses_until(f"http://127.0.0.1:{health}", proc, log_path, {200})
        answered = [s for s in seen if s is not None]
        assert answered[0] == 204 and set(answered) == {204, 200}, seen
        # The loading phase was served: more 204s than refused connections before it.
        assert answered.count(204) > 1
        response = requests.post(f"{url}/v1/generate", json={
            "prompt": "a red fox", "width": 512, "height": 512, "seed": 1}, timeout=120)
        assert response.status_code == 200 and response.json()["images"][0]["seed"] == 1


def test_ping_reports_a_worker_that_cannot_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with http_worker(tmp_path, MODEL_DIR=str(empty),
                     DOWNLOAD_MISSING_WEIGHTS="false") as (url, proc, log_path):
        statuses_until(url, proc, log_path, {500})
        body = requests.get(f"{url}/ping", timeout=5).json()
        assert body["status"] == "error" and "is missing" in body["error"]
        refused = requests.post(f"{url}/v1/generate", json={"prompt": "a fox"}, timeout=30)
        assert refused.status_code == 503 and "is missing" in refused.json()["error"]
