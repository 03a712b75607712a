"""Which model the worker serves (``ModelSpec``) and the model folder's layout.

A ``ModelSpec`` names the Lightning checkpoints to load and the optional components (safety
checker, TAESDXL); ``spec.files()`` lists every file that takes and where each is fetched from,
``spec.missing(folder)`` what a folder lacks. One object, passed whole, so the downloader
(``builder.download_weights``), the tiny-model builder (``builder.make_tiny_model``), the folder
search (``location``), the prefetch and ``pipeline.Engine.load`` agree by construction. No torch
or diffusers import here.

With ``base_model`` (BASE_MODEL, your own SDXL model) the folder holds only SDXL base's configs
and tokenizers (plus ``model_index.json`` and SDXL base's ``vae/config.json``: the config folder
``from_single_file`` is given) and the Lightning file of each step count for the mode
(``sdxl_lightning_4step_lora.safetensors`` for ``lora``, the UNet for ``unet``, none for a
merge); the model itself is wherever BASE_MODEL says (``worker/engine/base_model.py``).

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

import hashlib
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
# The Lightning LoRAs (same repository and revision), for other SDXL models: 2, 4 and 8 steps
# only; ByteDance publishes no 1-step LoRA (model card). 394 MB each.
LORAS: dict[int, str] = {
    2: "sdxl_lightning_2step_lora.safetensors",
    4: "sdxl_lightning_4step_lora.safetensors",
    8: "sdxl_lightning_8step_lora.safetensors",
}
# LIGHTNING_MODE: how Lightning speed is had. unet: ByteDance's full UNet replaces the model's
# (SDXL base); lora: the LoRA of each step count is fused into the model's UNet at load
# (fine-tunes); none: the model is already a Lightning merge and runs as it is.
LIGHTNING_MODES = ("unet", "lora", "none")

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
    # BASE_MODEL: None is SDXL base 1.0 (pinned) with the Lightning UNets, as ever; otherwise
    # an SDXL diffusers folder or single .safetensors file, a path relative to the model
    # folder or absolute (worker/engine/base_model.py loads it).
    base_model: str | None = None
    lightning_mode: str = "unet"  # one of LIGHTNING_MODES
    lora_scale: float = 1.0  # the fused Lightning LoRA's weight (lora mode)

    def __post_init__(self) -> None:
        steps = tuple(sorted(set(self.steps)))
        if self.lightning_mode not in LIGHTNING_MODES:
            raise ValueError(f"lightning_mode {self.lightning_mode!r}: one of {LIGHTNING_MODES}")
        # A Lightning merge (mode none) runs any step count in its range; the others one file
        # per step count.
        allowed = {"unet": CHECKPOINTS, "lora": LORAS}.get(self.lightning_mode)
        if not steps or any(s < 1 or (allowed is not None and s not in allowed) for s in steps):
            raise ValueError(f"steps {self.steps!r}: a non-empty subset of "
                             f"{sorted(allowed or CHECKPOINTS)}")
        object.__setattr__(self, "steps", steps)

    @property
    def own_model(self) -> bool:
        """Whether this spec serves a model of its own (BASE_MODEL) rather than SDXL base."""
        return self.base_model is not None

    def model_path(self, folder: Path) -> Path | None:
        """Where BASE_MODEL is (None: SDXL base): absolute as given, else inside the model
        folder. A folder with no ``model_index.json`` and exactly one ``.safetensors`` file is
        that single file (how the builder bakes one, ``baked-model/NAME.safetensors``)."""
        if self.base_model is None:
            return None
        path = Path(self.base_model).expanduser()
        path = path if path.is_absolute() else folder / path
        if path.is_dir() and not (path / "model_index.json").exists():
            files = list(path.glob("*.safetensors"))
            if len(files) == 1:
                return files[0]
        return path

    def model_weights(self, folder: Path) -> list[Path]:
        """BASE_MODEL's weight files (for the prefetch): the file, or a folder's safetensors."""
        path = self.model_path(folder)
        if path is None or not path.exists():
            return []
        return [path] if path.is_file() else sorted(path.glob("*/*.safetensors"))

    def lightning_file(self, steps: int) -> str | None:
        """The Lightning file that makes ``steps`` run: UNet, LoRA, or None (a merge)."""
        if self.lightning_mode == "unet":
            return CHECKPOINTS[steps]
        return LORAS[steps] if self.lightning_mode == "lora" else None

    def files(self) -> list[RemoteFile]:
        """Every file this spec needs, in the order the loader reads them (encoders, VAE, UNet)."""
        files = (_own_model_files(self) if self.own_model
                 else _base_files() + [_checkpoint_file(s) for s in self.steps])
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
        if self.own_model:
            return _describe_own(self) + (" + safety checker" if self.safety_checker else "") \
                + (" + tiny decoder" if self.tiny_decoder else "")
        return f"checkpoints {list(self.steps)}" + (
            " + safety checker" if self.safety_checker else "") + (
            " + tiny decoder" if self.tiny_decoder else "")

    def builder_args(self) -> list[str]:
        """The builders' command-line arguments for this spec (``builder/__init__.py``)."""
        # A merge (mode none) needs no per-step file: any one step count names the same files.
        steps = self.steps if self.lightning_mode != "none" else (4,)
        return (["--steps", *map(str, steps)]
                + (["--safety-checker"] if self.safety_checker else [])
                + (["--tiny-decoder"] if self.tiny_decoder else [])
                + (["--base-model", self.base_model, "--lightning-mode", self.lightning_mode]
                   if self.own_model else []))


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


def _own_model_files(spec: ModelSpec) -> list[RemoteFile]:
    """With BASE_MODEL: SDXL base's configs and tokenizers only (the architecture
    ``from_single_file`` is given, offline, and the scheduler config), not its weights: the
    model brings its own. Plus the Lightning UNet or LoRA of each step count. The model itself
    is not fetched here (``builder.download_weights --bake`` does that at build time)."""
    files = [f for f in _base_files()
             if f.repo == BASE_REPO and f.path.endswith((".json", ".txt"))]
    # from_single_file's config folder: the pipeline index and SDXL base's own VAE config (the
    # VAE a single file ships is SDXL's, which needs its force_upcast in fp16).
    files += [RemoteFile(name, BASE_REPO, BASE_REVISION, name)
              for name in ("model_index.json", "vae/config.json")]
    names = {s: spec.lightning_file(s) for s in spec.steps}
    files += [RemoteFile(n, LIGHTNING_REPO, LIGHTNING_REVISION, n) for n in names.values() if n]
    return files


def _describe_own(spec: ModelSpec) -> str:
    """For logs: "model juggernaut.safetensors, Lightning LoRA for steps [4, 8] (scale 1)"."""
    how = {"unet": "Lightning UNet", "lora": "Lightning LoRA", "none": "a Lightning merge"}
    if spec.lightning_mode == "none":
        return (f"model {spec.base_model} ({how['none']}, steps {spec.steps[0]}-"
                f"{spec.steps[-1]})")
    scale = f" (scale {spec.lora_scale:g})" if spec.lightning_mode == "lora" else ""
    return (f"model {spec.base_model}, {how[spec.lightning_mode]} for steps "
            f"{list(spec.steps)}{scale}")


HASH_CHUNK = 16 << 20  # 16 MiB reads: hashing a 6.9 GB checkpoint runs at disk speed


def sha256_of(path: Path) -> str:
    """The file's sha256 (hex), read in chunks: how weights and adapters are identified."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
