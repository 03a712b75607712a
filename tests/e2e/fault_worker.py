"""TEST-ONLY: handler.py's worker with injected faults, for tests/e2e/test_worker_loop.py.

Run as ``python -m tests.e2e.fault_worker GATES`` from the repository root, with the worker's
environment: it imports ``handler`` (which starts the worker exactly as ``python handler.py``
does), wraps the engine's ``run_batch`` and the VAE's decode to misbehave when a prompt carries
a ``FAULT_*`` marker, lets a job's bucket be on loopback (the tests' stand-ins live there), then
runs ``handler.main()``, RunPod's worker loop.

Prompt markers:
- ``FAULT_WAIT_FOR:<tag>:<n>`` holds the GPU until n jobs whose prompts carry ``[<tag>]`` were
  queued (so they form one batch); ``FAULT_HOLD:<name>`` holds it until ``GATES/<name>.release``
  exists. Both touch ``GATES/<tag or name>.started`` when they get the GPU.
- ``FAULT_OOM`` runs out of GPU memory at step 2 whatever the batch; ``FAULT_OOM_IN_BATCH``
  only in a batch of several images; ``FAULT_NAN`` decodes NaN for its rows; ``FAULT_BOOM``
  raises RuntimeError.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tests.support.endpoints import LOOPBACK_ALLOWED
from worker.outputs import upload

log = logging.getLogger(__name__)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"fault worker: gave up waiting for {what}")
        time.sleep(0.05)


def oom_at_step_2(on_step: Callable[..., None] | None) -> Callable[..., None]:
    def step(done: int, total: int, preview: Any = None) -> None:
        if on_step is not None:
            on_step(done, total, preview)
        if done == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected at step 2)")

    return step


class Faults:
    """The wrappers, and what they share: which prompts were queued, which rows decode NaN."""

    def __init__(self, handler: ModuleType, gates: Path) -> None:
        self.handler, self.gates = handler, gates
        self.submitted: list[str] = []  # prompts, in the order the GPU queue received them
        self.nan_rows: set[int] = set()
        self.decoded = 0
        self._submit = handler.GPU.submit
        self._run_batch = handler.ENGINE.run_batch

    def install(self) -> None:
        # A job's bucket on loopback (test_failing_bucket...) must reach its upload: the
        # worker's own policy would refuse it before the GPU. Test-only guard.
        self.handler.DELIVERY.uploader = upload.Uploader(guard=LOOPBACK_ALLOWED)
        self.handler.GPU.submit = self.submit
        self.handler.ENGINE.run_batch = self.run_batch
        engine = self.handler.ENGINE
        for decoder_class in {type(d) for d in (engine.vae, engine.taesd) if d is not None}:
            decoder_class.decode = self.nan_decoder(decoder_class.decode)

    def submit(self, plan: Any, on_step: Any = None) -> Any:
        self.submitted.append(plan.prompt)
        return self._submit(plan, on_step)

    def nan_decoder(self, real_decode: Callable[..., Any]) -> Callable[..., Any]:
        def decode(vae: Any, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = real_decode(vae, latents, *args, **kwargs)
            row, self.decoded = self.decoded, self.decoded + latents.shape[0]
            return (torch.full_like(out[0], float("nan")),) if row in self.nan_rows else out

        return decode

    def hold(self, prompt: str) -> None:
        if found := re.search(r"FAULT_WAIT_FOR:(\w+):(\d+)", prompt):
            tag, count = f"#{found[1]}#", int(found[2])
            (self.gates / f"{found[1]}.started").touch()
            wait_for(lambda: sum(tag in p for p in self.submitted) >= count,
                     f"{count} {tag} jobs")
        if found := re.search(r"FAULT_HOLD:(\w+)", prompt):
            (self.gates / f"{found[1]}.started").touch()
            wait_for((self.gates / f"{found[1]}.release").exists, f"{found[1]}.release")

    def run_batch(self, plans: Sequence[Any], on_step: Any = None) -> Any:
        prompts = [plan.prompt for plan in plans]
        images = sum(len(plan.seeds) for plan in plans)
        log.info("FAULT_HOOK batch of %d image(s): %s", images, " | ".join(prompts))
        for prompt in prompts:
            self.hold(prompt)
        if any("FAULT_BOOM" in p for p in prompts):
            raise RuntimeError("injected failure")
        if any("FAULT_OOM" in p and ("IN_BATCH" not in p or images > 1) for p in prompts):
            on_step = oom_at_step_2(on_step)
        rows = [plan.prompt for plan in plans for _ in plan.seeds]
        self.nan_rows.update(i for i, prompt in enumerate(rows) if "FAULT_NAN" in prompt)
        self.decoded = 0
        try:
            return self._run_batch(plans, on_step)
        finally:
            self.nan_rows.clear()


def main(gates: Path) -> None:
    sys.argv = ["handler.py"]  # RunPod's SDK reads its own options from the command line
    import handler  # starts the worker: settings, load, warm-up (the environment is set)

    Faults(handler, gates).install()
    handler.main()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
