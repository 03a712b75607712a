"""Stopping a worker process a test started: terminate, then kill if it does not go."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL: no worker outlives its test."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
