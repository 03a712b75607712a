"""What BASE_MODEL costs, measured on the full-size SDXL architecture with random weights.

Builds (once) the full-size folder of ``bench.full_model`` and beside it a full-size "fine-tune"
in both layouts: a diffusers folder (links to the same weight files: no extra disk) and one
original-layout ``.safetensors`` file (``builder.tiny_finetune.to_original_layout``, 6.9 GB), and
a full-size random Lightning LoRA per step count (rank ``RANK`` on the transformer blocks'
linears). Then loads each case in a fresh process, on the CPU in fp16 (the GPU's dtype), and
prints one JSON line per case: load seconds, the weights' bytes per UNet and shared, and the
process's peak RSS. Timings are the CPU's; a GPU load differs, the bytes do not.

Usage: ``python -m bench.own_model OUT_DIR [CASE ...]`` (cases: ``CASES``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

RANK = 64  # a distillation LoRA's size class (ByteDance's files are 394 MB each)
CASES = {
    "lightning-unet": dict(steps=(4,)),  # today's default: SDXL base + the Lightning UNet
    "folder-lora": dict(steps=(4,), base_model="finetune", lightning_mode="lora"),
    "folder-lora-2": dict(steps=(4, 8), base_model="finetune", lightning_mode="lora"),
    "file-lora": dict(steps=(4,), base_model="finetune.safetensors", lightning_mode="lora"),
    "folder-none": dict(steps=(4, 5, 6, 7, 8), base_model="finetune", lightning_mode="none"),
}


def prepare(out: Path) -> Path:
    """The full-size folder, the fine-tune in both layouts and the LoRAs (each made once)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from bench import full_model
    from builder import tiny_finetune
    from worker.spec import CHECKPOINTS, LORAS

    folder = full_model.build(out)
    (folder / "model_index.json").write_text(json.dumps(tiny_finetune.SDXL_MODEL_INDEX))
    ft = folder / "finetune"
    if not (ft / "model_index.json").exists():
        for sub in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                    "vae"):
            (ft / sub).parent.mkdir(parents=True, exist_ok=True)
            if not (ft / sub).exists():
                (ft / sub).symlink_to(folder / sub)
        (ft / "unet").mkdir(exist_ok=True)
        (ft / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
        link = ft / "unet" / "diffusion_pytorch_model.fp16.safetensors"
        if not link.exists():
            link.symlink_to(folder / CHECKPOINTS[4])  # a diffusers UNet state dict already
        (ft / "model_index.json").write_text(json.dumps(tiny_finetune.SDXL_MODEL_INDEX))
    single = folder / "finetune.safetensors"
    missing_loras = [s for s in (4, 8) if not (folder / LORAS[s]).exists()]
    if single.exists() and not missing_loras:
        return folder
    pipe = StableDiffusionXLPipeline.from_pretrained(ft, dtype=torch.float16, variant="fp16",
                                                     add_watermarker=False)
    if not single.exists():
        started = time.perf_counter()
        state = tiny_finetune.to_original_layout(pipe)
        save_file({k: v.contiguous() for k, v in state.items()}, str(single) + ".part",
                  metadata={"format": "pt"})
        os.replace(str(single) + ".part", single)
        log.info("wrote %s (%.2f GB) in %.0f s", single.name, single.stat().st_size / 1e9,
                 time.perf_counter() - started)
    old = tiny_finetune.LORA_RANK
    tiny_finetune.LORA_RANK = RANK
    try:
        for steps in missing_loras:
            save_file(tiny_finetune.lightning_lora(pipe.unet, steps), str(folder / LORAS[steps]),
                      metadata={"format": "pt"})
    finally:
        tiny_finetune.LORA_RANK = old
    return folder


def measure(folder: Path, case: str) -> dict[str, object]:
    """One case in this process: load time, bytes held, peak RSS."""
    import torch

    import pipeline
    from worker.spec import ModelSpec

    spec = ModelSpec(**CASES[case])
    started = time.perf_counter()
    engine = pipeline.Engine.load(spec, folder, torch.device("cpu"), torch.float16)
    seconds = time.perf_counter() - started
    held = engine.resident_bytes()
    return {"case": case, "load_s": round(seconds, 1),
            "bytes": held, "total_bytes": sum(held.values()),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "served": engine.served and {k: v for k, v in list(engine.served.items())[:1]}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out, cases = Path(argv[0]), argv[1:] or list(CASES)
    if cases[0] == "--one":  # the child process
        print(json.dumps(measure(out, cases[1])), flush=True)
        return 0
    folder = prepare(out)
    for case in cases:
        subprocess.run([sys.executable, "-m", "bench.own_model", str(folder), "--one", case],
                       check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
