"""The SDXL-Lightning RunPod worker, one room per step of a job's data path.

    schemas (top level) -> inputs/ -> plan -> gpu_queue -> pipeline.Engine (engine/) -> outputs/

Imports point one way: the pure rules (``errors``, ``spec``, ``settings``, ``plan``,
``formats``, and the top-level ``schemas``) import no torch and nothing above them; ``inputs``
and ``outputs`` build on them; ``engine`` and the top-level ``pipeline`` own torch;
``startup`` brings a worker up; the top-level ``handler`` adapts it all to RunPod. This file
imports nothing, so ``import worker.plan`` stays light (README, "How it is built").
"""
