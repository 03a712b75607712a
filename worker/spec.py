"""Which model the worker serves (``ModelSpec``) and the model folder's layout.

A ``ModelSpec`` names the Lightning checkpoints to load and the optional components (safety
checker, TAESDXL); ``spec.files()`` lists every file that takes and where each is fetched from,
``spec.missing(folder)`` what a folder lacks. One object, passed whole, so the downloader
(``builder.download_weights``), the tiny-model builder (``builder.make_tiny_model``), the folder
search (``location``), the prefetch and ``pipeline.Engine.load`` agree by construction. No torch
or diffusers import here.

Layout of ``MODEL_DIR`` (it mirrors the Hugging Face repositories, so the files keep their names):

    scheduler/scheduler_config.json            SDXL base
    text_encoder/{config.json, model.fp16.safetensors}
    text_encoder_2/{config.json, model.fp16.safetensors}
    tokenizer/{vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json}
    tokenizer_2/ (same four files)
    unet/config.json                           architecture only; the weights come from Lightning
    vae/{config.json, diffusion_pytorch_model.safetensors}     the fp16-fix VAE
    sdxl_lightning_4step_unet.safetensors      one file per loaded step count
    safety_checker/{config.json, pytorch_model.bin}            only with the safety checker
    feature_extractor/preprocessor_config.json
    taesdxl/{config.json, diffusion_pytorch_model.safetensors}  only with the tiny decoder
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "ByteDance/SDXL-Lightning"

# Pinned revisions: a rebuilt image holds byte-identical weights, whatever the repos do later.
BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
BASE_REVISION = "462165984030d82259a11f4367a4eed129e94a7b"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
LIGHTNING_REVISION = "c9a24f48e1c025556787b0c58dd67a091ece2e44"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
VAE_REVISION = "207b116dae70ace3637169f1ddd2434b91b3a8cd"
# Only with SAFETY_CHECKER: the CompVis checker (CLIP ViT-L/14 image tower, ~1.2 GB in fp32).
# Its repository ships the weights as a pickle; transformers loads it with weights_only=True.
SAFETY_REPO = "CompVis/stable-diffusion-safety-checker"
SAFETY_REVISION = "cb41f3a270d63d454d385fc2e4f571c487c253c5"
SAFETY_WEIGHTS = "pytorch_model.bin"
# Only with VAE_DECODER=tiny: TAESDXL, a 1.2 M-parameter decoder for the same latents.
TAESD_REPO = "madebyollin/taesdxl"
TAESD_REVISION = "b20258aaef75ef61e659c1e0f14f251cf0ad153e"
TAESD_DIR = "taesdxl"

# ByteDance ships one UNet per step count; each must run with exactly that many steps (model card:
# "always use the correct checkpoint for the corresponding inference steps").
CHECKPOINTS: dict[int, str] = {
    1: "sdxl_lightning_1step_unet_x0.safetensors",  # x0-prediction: needs prediction_type="sample"
    2: "sdxl_lightning_2step_unet.safetensors",
    4: "sdxl_lightning_4step_unet.safetensors",
    8: "sdxl_lightning_8step_unet.safetensors",
}
X0_PREDICTION_STEPS = frozenset({1})

TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
TEXT_ENCODER_WEIGHTS = "model.fp16.safetensors"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class RemoteFile:
    """One file of the model folder: its path in the folder and where to fetch it."""

    path: str
    repo: str
    revision: str
    remote_path: str


@dataclass(frozen=True)
class ModelSpec:
    """What one worker loads: Lightning checkpoints by step count, and optional components."""

    steps: tuple[int, ...] = (4,)
    safety_checker: bool = False  # CompVis's checker, for SAFETY_CHECKER=true/always
    tiny_decoder: bool = False  # TAESDXL decodes instead of the full VAE (VAE_DECODER=tiny)

    def __post_init__(self) -> None:
        steps = tuple(sorted(set(self.steps)))
        if not steps or any(s not in CHECKPOINTS for s in steps):
            raise ValueError(f"steps {self.steps!r}: a non-empty subset of {sorted(CHECKPOINTS)}")
        object.__setattr__(self, "steps", steps)

    def files(self) -> list[RemoteFile]:
        """Every file this spec needs, in the order the loader reads them (encoders, VAE, UNet)."""
        files = _base_files() + [_checkpoint_file(s) for s in self.steps]
        if self.safety_checker:
            files += [RemoteFile(f"safety_checker/{name}", SAFETY_REPO, SAFETY_REVISION, name)
                      for name in ("config.json", SAFETY_WEIGHTS)]
            files.append(RemoteFile("feature_extractor/preprocessor_config.json", SAFETY_REPO,
                                    SAFETY_REVISION, "preprocessor_config.json"))
        if self.tiny_decoder:
            files += [RemoteFile(f"{TAESD_DIR}/{name}", TAESD_REPO, TAESD_REVISION, name)
                      for name in ("config.json", VAE_WEIGHTS)]
        return files

    def missing(self, folder: Path) -> list[str]:
        """Paths (relative to ``folder``) of this spec's files that are absent or empty."""
        missing = []
        for f in self.files():
            path = folder / f.path
            if not path.is_file() or path.stat().st_size == 0:
                missing.append(f.path)
        return missing

    def describe(self) -> str:
        """For logs: "checkpoints [2, 4] + safety checker + tiny decoder"."""
        return f"checkpoints {list(self.steps)}" + (
            " + safety checker" if self.safety_checker else "") + (
            " + tiny decoder" if self.tiny_decoder else "")

    def builder_args(self) -> list[str]:
        """The builders' command-line arguments for this spec (``builder/__init__.py``)."""
        return (["--steps", *map(str, self.steps)]
                + (["--safety-checker"] if self.safety_checker else [])
                + (["--tiny-decoder"] if self.tiny_decoder else []))


def _base_files() -> list[RemoteFile]:
    """Files shared by every checkpoint: SDXL base (minus its UNet weights) and the fp16-fix VAE."""
    files = [RemoteFile("scheduler/scheduler_config.json", BASE_REPO, BASE_REVISION,
                        "scheduler/scheduler_config.json"),
             RemoteFile("unet/config.json", BASE_REPO, BASE_REVISION, "unet/config.json")]
    for sub in ("text_encoder", "text_encoder_2"):
        for name in ("config.json", TEXT_ENCODER_WEIGHTS):
            files.append(RemoteFile(f"{sub}/{name}", BASE_REPO, BASE_REVISION, f"{sub}/{name}"))
    for sub in ("tokenizer", "tokenizer_2"):
        for name in TOKENIZER_FILES:
            files.append(RemoteFile(f"{sub}/{name}", BASE_REPO, BASE_REVISION, f"{sub}/{name}"))
    for name in ("config.json", VAE_WEIGHTS):
        files.append(RemoteFile(f"vae/{name}", VAE_REPO, VAE_REVISION, name))
    return files


def _checkpoint_file(steps: int) -> RemoteFile:
    """The Lightning UNet checkpoint for ``steps`` denoising steps."""
    name = CHECKPOINTS[steps]
    return RemoteFile(name, LIGHTNING_REPO, LIGHTNING_REVISION, name)
