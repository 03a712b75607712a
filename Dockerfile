# The SDXL-Lightning RunPod serverless worker image: pinned CUDA base, pinned Python, the pinned
# requirements, and the weights baked in at build time so a worker starts without the network.
#
#   docker build -t sdxl-lightning-worker .                                # 4-step checkpoint
#   docker build --build-arg LIGHTNING_STEPS=2,4 -t sdxl-lightning-worker .  # two checkpoints
#   docker run --gpus all sdxl-lightning-worker   # no RunPod variables: runs test_input.json
#                                                 # once and exits with its status (0 = ok)
#
# Stages: uv (the installer) -> python (interpreter) -> deps (venv) and weights -> the final
# image, which only COPYs their results: no compiler, apt list, pip or uv cache, nor uv itself.
#
# CUDA. torch==2.13.0 (requirements.txt) from PyPI is the CUDA 13.0 build. Verified here from
# its wheel metadata (`pip install --dry-run --no-deps --report` for cp312 manylinux_2_28_x86_64,
# and `uv pip compile` for the whole set): it requires cuda-toolkit==13.0.3,
# nvidia-cudnn-cu13==9.20.0.48, nvidia-nccl-cu13 and triton 3.7.1. So the base is CUDA 13.0, and
# the host driver must be >= 580 (hub.json allowedCudaVersions: "13.0"). torch loads the CUDA
# libraries of those wheels, not the base image's; the base supplies the OS and NVIDIA's
# container setup. Assumed, not verifiable offline: that this tag exists on Docker Hub (it is in
# public Dockerfiles), and the sizes below.
#
# Weights, where the worker finds them at run time (worker/location.py; the first complete wins):
#   1. MODEL_DIR, if set (so MODEL_DIR is deliberately NOT set here: it would hide 2 and 3);
#   2. /runpod-volume/sdxl-lightning (a network volume);
#   3. RunPod's cached models, /runpod-volume/huggingface-cache/hub, at the pinned revisions;
#   4. the folder baked below, /app/models/sdxl-lightning.
# The worker loads the checkpoints named by LIGHTNING_STEPS (set to the baked ones). With
# DOWNLOAD_MISSING_WEIGHTS=false it never downloads at start; set it to true to fetch checkpoints
# that were not baked (5.1 GB each, on every cold start, onto the container disk).
#
# Size (bytes; 1 GB = 1e9 B). Weights: text_encoder 246,144,152 + text_encoder_2 1,389,382,176
#   + fp16-fix VAE (fp32 file) 334,643,238 + one Lightning UNet 5,135,149,736 + ~3,000,000 of
#   configs and tokenizers = ~7,108,319,302 B = 7.1 GB for "4"; +5.14 GB per extra checkpoint
#   ("2,4": 12.2 GB; "1,2,4,8": 22.5 GB); + ~1.22 GB for the safety checker and ~10 MB for
#   TAESDXL (both sizes assumed).
#   Python packages: the torch/CUDA/triton wheels add up to 2.73 GB compressed (PyPI file sizes),
#   ~4.5-5 GB installed, + ~0.65 GB for the rest (measured on the CPU venv) = ~5.5 GB.
#   Interpreter ~0.1 GB. Base image ~3.5 GB (assumed). Total: ~17-18 GB with "4" and the
#   safety checker (~16-17 GB without).
# Build time (cold cache, ~100 MB/s to PyPI and Hugging Face): base pull ~1 min; Python + 3.3 GB
#   of wheels ~2-3 min; weights 8.3 GB ~1.5-3 min; layer export and push of ~14 GB ~4-8 min:
#   ~8-15 min, inside RunPod's 30-minute build limit. A code-only change rebuilds one small layer.

# Users vary these (docker build --build-arg NAME=value):
# - BASE_IMAGE: the CUDA runtime base. Keep its CUDA version equal to the one torch was built for
#   (above) and hub.json's allowedCudaVersions in step.
# - LIGHTNING_STEPS: which step checkpoints to bake, comma-separated from 1, 2, 4, 8 ("2,4").
# - BAKE_SAFETY_CHECKER: bake CompVis's safety checker (~1.2 GB) so that SAFETY_CHECKER=true or
#   always works without a download; "false" for a leaner image. It is loaded only when enabled.
#   TAESDXL, the tiny decoder for VAE_DECODER=tiny (~10 MB), is always baked.
# - TRITON_COMPILER: "true" adds gcc (~150 MB) to the final image, needed only for COMPILE=true:
#   torch.compile runs Triton kernels, and Triton builds its CUDA launcher with a C compiler when
#   it first starts ("Failed to find C compiler"). Off by default: the image carries no compiler.
# - TORCH_INDEX_URL: optional extra index for another torch build, e.g. PyTorch's CUDA 12.x index
#   for hosts with drivers older than 580 (then also a 12.x BASE_IMAGE and allowedCudaVersions).
# - PYTHON_VERSION, UV_VERSION: pinned; uv 0.13.8 knows CPython 3.12.16.
# - BASE_MODEL: your own SDXL model to bake and serve instead of SDXL base (README, "Your own
#   model"): owner/name@COMMIT (a diffusers repo at a pinned 40-hex commit),
#   owner/name@COMMIT:path/model.safetensors (one single file of a repo) or an https URL of a
#   .safetensors file. It lands in /app/models/sdxl-lightning/baked-model with its origin
#   recorded; only SDXL base's configs come with it (its weights are the model's own). Empty
#   (the default): SDXL base with the Lightning UNets, as ever.
# - LIGHTNING_MODE: with BASE_MODEL, lora (the default: the Lightning LoRA of each
#   LIGHTNING_STEPS is baked, 394 MB each, and fused at start), unet (the Lightning UNets, 5.1 GB
#   each) or none (a Lightning merge: nothing more is baked).
# - HF_ENDPOINT: a Hugging Face mirror for the weight download. No token is needed: the three
#   repositories are public. For an authenticating mirror, pass HF_TOKEN as a BuildKit secret
#   (`RUN --mount=type=secret,id=hf_token,env=HF_TOKEN ...`), never as an ARG.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG LIGHTNING_STEPS=4
ARG BAKE_SAFETY_CHECKER=true
ARG BASE_MODEL=""
ARG LIGHTNING_MODE=""
ARG PYTHON_VERSION=3.12.16
ARG UV_VERSION=0.13.8

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---- python: a uv-managed CPython (python-build-standalone), pinned to the patch release.
FROM ${BASE_IMAGE} AS python
ARG PYTHON_VERSION
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_PYTHON_PREFERENCE=only-managed
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install --no-bin "${PYTHON_VERSION}" \
    && ln -s "$(uv python find "${PYTHON_VERSION}")" /usr/local/bin/python \
    && python --version

# ---- deps: one virtual environment with requirements.txt (torch pinned in the same file).
FROM python AS deps
ARG PYTHON_VERSION
ARG TORCH_INDEX_URL=""
COPY requirements.txt /tmp/requirements.txt
# --compile-bytecode: worker cold starts import torch/diffusers; .pyc files cut seconds off that.
# --strict: fail the build on an inconsistent environment (uv's `pip check`).
RUN uv venv --python "${PYTHON_VERSION}" /opt/venv \
    && uv pip install --python /opt/venv/bin/python --compile-bytecode --strict \
       ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} -r /tmp/requirements.txt

# ---- weights: only the downloader and the model spec it reads (stdlib-only, so the bare
# interpreter runs them), so editing the rest of the worker or its requirements never
# invalidates this multi-GB layer.
FROM python AS weights
ARG LIGHTNING_STEPS
ARG BAKE_SAFETY_CHECKER
ARG BASE_MODEL
ARG LIGHTNING_MODE
ARG HF_ENDPOINT=https://huggingface.co
WORKDIR /app
COPY worker/__init__.py worker/spec.py worker/
COPY builder/__init__.py builder/download_weights.py builder/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The worker reads LIGHTNING_STEPS as "2,4"; the builder takes "--steps 2 4".
# (A build ARG is an environment variable of RUN: download_weights reads HF_ENDPOINT.)
RUN IFS=, read -r -a steps <<< "${LIGHTNING_STEPS}" \
    && extra=(--tiny-decoder) \
    && if [ "${BAKE_SAFETY_CHECKER}" = "true" ]; then extra+=(--safety-checker); fi \
    && if [ -n "${BASE_MODEL}" ]; then extra+=(--bake "${BASE_MODEL}"); fi \
    && if [ -n "${LIGHTNING_MODE}" ]; then extra+=(--lightning-mode "${LIGHTNING_MODE}"); fi \
    && python -m builder.download_weights /app/models/sdxl-lightning --steps "${steps[@]}" \
       "${extra[@]}"

# ---- the worker image.
FROM ${BASE_IMAGE}
ARG LIGHTNING_STEPS
ARG BASE_MODEL
ARG LIGHTNING_MODE
# HF_HUB_OFFLINE: nothing in the worker may reach the Hub at run time (the weights are local).
# LIGHTNING_STEPS: load exactly what was baked; BASE_MODEL: the baked model, by the name the
# builder gave it (empty without one, which means SDXL base), and its LIGHTNING_MODE. DEVICE=cuda: on a host whose GPU does not work
# the worker stops at start (RunPod replaces it) instead of serving at CPU speed. The worker
# runs as root, like RunPod's own workers: network volumes and RunPod's model cache are
# root-owned.
ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    DOWNLOAD_MISSING_WEIGHTS=false \
    DEVICE=cuda \
    LIGHTNING_STEPS=${LIGHTNING_STEPS} \
    BASE_MODEL=${BASE_MODEL:+baked-model} \
    LIGHTNING_MODE=${LIGHTNING_MODE}
COPY --from=python /opt/python /opt/python
COPY --from=weights /app/models /app/models
COPY --from=deps /opt/venv /opt/venv
ARG TRITON_COMPILER=false
# Ubuntu's package versions are pinned by the base image's tag (older ones leave the archive).
# hadolint ignore=DL3008
RUN if [ "${TRITON_COMPILER}" = "true" ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# Fail the build, not the first cold start, if the copied venv is broken or torch was built for
# another CUDA than the base image's (CUDA_VERSION is set by NVIDIA's images).
RUN python -c "import os, diffusers, runpod, torch, transformers; \
base = os.environ.get('CUDA_VERSION', torch.version.cuda); \
assert torch.version.cuda.split('.')[:2] == base.split('.')[:2], (torch.version.cuda, base); \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
WORKDIR /app
# The design card's top-level modules, the worker package and the builders as folders, and
# test_input.json for the self-test that `docker run` without RunPod runs.
COPY handler.py schemas.py pipeline.py test_input.json ./
COPY worker/ worker/
COPY builder/ builder/
CMD ["python", "-u", "handler.py"]
