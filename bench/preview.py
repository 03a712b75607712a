"""What per-step previews cost: a job with ``"preview": true`` against the same job without.

Usage: ``python -m bench.preview [--device cpu|cuda] [--size 512] [--rounds 5]``, from the
repository root (~1 min on 2 CPU cores with the tiny model; exits 0).

Loads an engine with TAESDXL (the tiny model on the CPU, built on the spot; with
``--model-dir`` any model folder holding ``taesdxl/``) and runs one 4-step txt2img job through
``Engine.generate`` with a step callback, in pairs: without previews, and with a preview made at
every step (a TAESDXL decode of the estimate and a 256 px JPEG, as ``/v1/generate`` streaming and
the queue's ``progress_update`` make them). The pairs alternate in order, one seed per pair, and
the ratio of the medians is printed. Both run the same denoising, so the ratio is the previews'
share of a job.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from builder import make_tiny_model
    from pipeline import Engine
    from worker.plan import Plan
    from worker.spec import ModelSpec

    spec = ModelSpec(steps=(4,))
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or make_tiny_model.build(
            Path(tmp) / "model", replace(spec, tiny_decoder=True))
        engine = Engine.load(spec, folder, torch.device(args.device))
        if engine.previewer is None:
            raise SystemExit(f"{folder} has no taesdxl/: previews need TAESDXL")
        base = Plan(prompt="a lighthouse on a cliff", negative_prompt=None, width=args.size,
                    height=args.size, steps=4, guidance_scale=0.0, seeds=(0,))
        made: list[int] = []

        def on_step(done: int, total: int, preview: object) -> None:
            if preview is not None:
                made.append(len(preview(0)))

        engine.generate([base], on_step)  # warm-up, both paths
        engine.generate([replace(base, preview=True)], on_step)
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for preview in ((False, True) if round_ % 2 == 0 else (True, False)):
                plan = replace(base, seeds=(round_,), preview=preview)
                start = time.perf_counter()
                engine.generate([plan], on_step)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[preview].append(time.perf_counter() - start)
    plain, previewed = statistics.median(times[False]), statistics.median(times[True])
    print(f"device {args.device}, {args.size}x{args.size}, 4 steps, {args.rounds} pairs")
    print(f"without previews: {plain * 1000:.1f} ms (median)")
    print(f"with a preview per step: {previewed * 1000:.1f} ms (median); "
          f"{statistics.median(made) / 1024:.1f} KiB per preview JPEG")
    print(f"ratio with/without: {previewed / plain:.3f}")


if __name__ == "__main__":
    main()
