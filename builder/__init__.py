"""Build-time tools, run from the repository root: ``python -m builder.download_weights`` (the
real weights, at image build time or at start) and ``python -m builder.make_tiny_model`` (a tiny
random model for tests and machines without hub access).

Both take the model to build as a ``ModelSpec``, spelled the same way on both command lines:
``--steps 4 [8 ...] [--safety-checker] [--tiny-decoder] [--base-model NAME
[--lightning-mode unet|lora|none]]`` (``ModelSpec.builder_args``).
"""

from __future__ import annotations

import argparse

from worker.spec import CHECKPOINTS, LIGHTNING_MODES, ModelSpec


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ModelSpec`` options of both builders."""
    parser.add_argument("--steps", type=int, nargs="+", default=[4],
                        choices=sorted(CHECKPOINTS), help="Lightning checkpoints (step counts)")
    parser.add_argument("--safety-checker", action="store_true",
                        help="also the safety checker (for SAFETY_CHECKER=true/always)")
    parser.add_argument("--tiny-decoder", action="store_true",
                        help="also TAESDXL, the tiny VAE decoder (for VAE_DECODER=tiny)")
    parser.add_argument("--base-model", default=None,
                        help="BASE_MODEL: your own SDXL model in the folder (then only SDXL "
                             "base's configs and the Lightning files its mode needs)")
    parser.add_argument("--lightning-mode", choices=LIGHTNING_MODES, default=None,
                        help="LIGHTNING_MODE (default: unet, or lora with --base-model)")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    base_model = getattr(args, "base_model", None)
    mode = getattr(args, "lightning_mode", None) or ("unet" if base_model is None else "lora")
    return ModelSpec(steps=tuple(args.steps), safety_checker=args.safety_checker,
                     tiny_decoder=args.tiny_decoder, base_model=base_model,
                     lightning_mode=mode)
