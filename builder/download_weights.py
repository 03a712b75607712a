"""Fetch exactly the files a ``ModelSpec`` needs into a model folder, from pinned revisions.

Only what ``ModelSpec.files`` lists: SDXL base's text encoders, tokenizers, scheduler and UNet
*config* (not its 5 GB of UNet weights, which Lightning replaces), the fp16-fix VAE, and the
Lightning checkpoint of each step count; the safety checker and TAESDXL when asked. Each file
is streamed to ``NAME.part``, checked (length against Content-Length, JSON parses, safetensors
header and size agree), and only then renamed into place, so a folder never holds a truncated
file. A file already present and valid is skipped; a failed file is retried with backoff.

Runs at image build time (``Dockerfile``) and, when the worker starts without weights, at start.
``HF_ENDPOINT`` (the Hugging Face convention) points it at a mirror; ``HF_TOKEN`` is sent if set.

Usage: ``python -m builder.download_weights MODEL_DIR [--steps 4 [8 ...]] [--safety-checker]
[--tiny-decoder] [--bake SOURCE [--lightning-mode lora|unet|none]]``

``--bake SOURCE`` also fetches your own SDXL model (BASE_MODEL) into ``MODEL_DIR/baked-model``
(``bake``): ``owner/name@REVISION`` (a diffusers repo at a pinned 40-hex commit),
``owner/name@REVISION:path/model.safetensors`` (one single file of a repo) or
``https://.../model.safetensors`` (any URL), with the same retries and checks, and records its
origin beside it (``*.source.json``: repo and revision, or URL and sha256), which the worker
reports as ``parameters.model``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from builder import add_spec_arguments, spec_from_args
from worker.spec import ModelSpec, RemoteFile, sha256_of

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 8 << 20  # 8 MiB reads: few syscalls, little memory
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own cap on the JSON header


class DownloadError(RuntimeError):
    """A file could not be fetched intact after every retry."""


def file_url(endpoint: str, f: RemoteFile) -> str:
    return f"{endpoint.rstrip('/')}/{f.repo}/resolve/{f.revision}/{f.remote_path}"


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


class _SameOriginAuthRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, keeping ``Authorization`` only while the origin stays the same.

    The Hub answers ``resolve`` for large files with a redirect to a CDN's signed URL: urllib
    would forward the token there, leaking it and, on signed URLs, failing with a second
    credential. ``requests`` (huggingface_hub) strips it the same way.
    """

    def redirect_request(self, req: urllib.request.Request, fp, code: int, msg: str,
                         headers, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_SameOriginAuthRedirects)


def check_file(path: Path, name: str | None = None) -> str | None:
    """Why ``path`` is not a usable model file, or None if it is.

    ``name``: the file name that decides the format, when ``path`` is a download in progress
    (``X.safetensors.part`` must be checked as a safetensors file, not as a ``.part``).
    """
    size = path.stat().st_size
    if size == 0:
        return "empty"
    suffix = Path(name or path.name).suffix
    if suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return f"not valid JSON ({exc})"
    elif suffix == ".safetensors":
        return _check_safetensors(path, size)
    return None


def _check_safetensors(path: Path, size: int) -> str | None:
    """The header's tensor offsets must end exactly at the end of the file."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "truncated safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
            return "corrupt safetensors header length"
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            # Valid JSON of the wrong shape is as corrupt as invalid JSON: say so, never crash.
            return "corrupt safetensors header"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"size {size} B but its header describes {expected} B (truncated or corrupt)"
    return None


def _fetch(url: str, dest: Path, token: str | None, timeout: float) -> None:
    """Stream ``url`` into ``dest``; raise if the body is shorter than announced."""
    request = urllib.request.Request(url, headers={"User-Agent": "sdxl-lightning-worker"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with _OPENER.open(request, timeout=timeout) as response, dest.open("wb") as out:
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(CHUNK):
            out.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise DownloadError(f"received {received} of {expected} bytes")


def download_file(f: RemoteFile, model_dir: Path, endpoint: str,
                  token: str | None = None, attempts: int = 4, backoff_s: float = 2.0,
                  timeout: float = 60.0, url: str | None = None) -> bool:
    """Fetch one file into place; returns False if a valid copy was already there. ``url``:
    fetch it from there instead of the hub (a BASE_MODEL given as an https URL)."""
    dest = model_dir / f.path
    if dest.is_file() and check_file(dest) is None:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = url or file_url(endpoint, f)
    for attempt in range(1, attempts + 1):
        try:
            _fetch(url, part, token, timeout)
            problem = check_file(part, dest.name)
            if problem is None:
                os.replace(part, dest)
                return True
            error: Exception = DownloadError(problem)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 404):  # retrying will not change the answer
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            error = exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, socket.gaierror):  # no DNS: an offline machine, say so now
                raise DownloadError(f"{url}: cannot resolve the host ({exc.reason})") from None
            error = exc
        # Timeouts and connection resets are OSErrors; a body cut short in chunked encoding is
        # http.client.IncompleteRead, an HTTPException: retried like any other broken transfer.
        except (OSError, http.client.HTTPException, DownloadError) as exc:
            error = exc
        part.unlink(missing_ok=True)
        log.warning("%s: attempt %d/%d failed: %s", f.path, attempt, attempts, error)
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise DownloadError(f"could not fetch {url} after {attempts} attempts: {error}")


def download(model_dir: Path, spec: ModelSpec, endpoint: str | None = None,
             **kwargs: float) -> int:
    """Fill ``model_dir`` with every file of ``spec``; returns how many files were fetched.
    ``kwargs`` go to ``download_file``."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    token = os.environ.get("HF_TOKEN") or None
    fetched = 0
    for f in spec.files():
        started = time.monotonic()
        if download_file(f, model_dir, endpoint, token, **kwargs):
            fetched += 1
            size = (model_dir / f.path).stat().st_size
            log.info("fetched %s (%.1f MB in %.1f s)", f.path, size / 1e6,
                     time.monotonic() - started)
    return fetched


# --bake: where the model lands in the model folder. One fixed name, whatever the source's
# layout (a single file goes in a folder of its own), so the image can set BASE_MODEL to it.
BAKED_NAME = "baked-model"
SOURCE_SUFFIX = ".source.json"  # worker/engine/base_model.py reads it
COMMIT = re.compile(r"[0-9a-f]{40}")
REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Per component folder of a diffusers repo: configs and tokenizer files, and the weights as
# safetensors only (a pickled .bin can run code when read; .onnx/.msgpack are other runtimes).
CONFIG_SUFFIXES = (".json", ".txt", ".model")


def parse_source(source: str) -> tuple[str, str, str | None] | str:
    """``(repo, revision, path or None)`` for a hub source, or the URL itself."""
    if source.startswith("https://"):
        if not urllib.parse.urlsplit(source).path.endswith(".safetensors"):
            raise DownloadError(f"--bake {source}: a URL must name a .safetensors file (pickled "
                                f".ckpt files are not loaded)")
        return source
    if "://" in source:
        raise DownloadError(f"--bake {source}: only https URLs are fetched")
    repo, _, rest = source.partition("@")
    revision, _, path = rest.partition(":")
    if not REPO.fullmatch(repo) or not COMMIT.fullmatch(revision):
        raise DownloadError(f"--bake {source}: give owner/name@REVISION with REVISION a full "
                            f"40-hex commit (pinned: a rebuilt image gets the same bytes), "
                            f"optionally :path/model.safetensors, or an https URL")
    if path and not path.endswith(".safetensors"):
        raise DownloadError(f"--bake {source}: {path} is not a .safetensors file")
    return repo, revision, path or None


def repo_files(endpoint: str, repo: str, revision: str, token: str | None,
               timeout: float = 60.0) -> list[str]:
    """Every file of ``repo`` at ``revision`` (the hub's model API)."""
    url = f"{endpoint.rstrip('/')}/api/models/{repo}/revision/{revision}"
    request = urllib.request.Request(url, headers={"User-Agent": "sdxl-lightning-worker"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            listing = json.loads(response.read())
        return [entry["rfilename"] for entry in listing["siblings"]]
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DownloadError(f"{url}: cannot list the repository: {exc}") from None


def diffusers_files(names: list[str], source: str) -> list[str]:
    """The files of a diffusers pipeline repo the worker loads: ``model_index.json``, each
    component's configs and tokenizer files, and its safetensors weights (the fp16 variant
    where the repo has one). Nothing at the top level but the index: repos often carry a
    multi-GB single file there too."""
    if "model_index.json" not in names:
        raise DownloadError(f"--bake {source}: the repository has no model_index.json, so it is "
                            f"not a diffusers pipeline; for a single file give "
                            f"{source}:path/model.safetensors")
    chosen = ["model_index.json"]
    folders = sorted({n.split("/")[0] for n in names if n.count("/") == 1})
    for folder in folders:
        inside = [n for n in names if n.startswith(f"{folder}/") and n.count("/") == 1]
        chosen += [n for n in inside if n.endswith(CONFIG_SUFFIXES) and ".index" not in n]
        weights = [n for n in inside if n.endswith(".safetensors")]
        fp16 = [n for n in weights if ".fp16" in n]
        picked = fp16 or [n for n in weights if not re.search(r"\.(fp32|bf16|fp16)", n)]
        chosen += picked
        # a sharded checkpoint's index names its shards
        chosen += [n for n in inside if n.endswith(".safetensors.index.json")
                   and (".fp16" in n) == bool(fp16)]
        if not weights and any(n.endswith((".bin", ".ckpt", ".pt")) for n in inside):
            raise DownloadError(f"--bake {source}: {folder}/ ships only pickled weights "
                                f"(.bin); the worker loads safetensors only")
    return list(dict.fromkeys(chosen))



def bake(model_dir: Path, source: str, endpoint: str | None = None, **kwargs: float) -> str:
    """Fetch BASE_MODEL from ``source`` into ``model_dir/baked-model``; returns that name.
    Same retries and checks as every other file (``download_file``)."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    token = os.environ.get("HF_TOKEN") or None
    parsed = parse_source(source)
    started = time.monotonic()
    if isinstance(parsed, str):  # a URL: one file, recorded by its sha256
        name = Path(urllib.parse.urlsplit(parsed).path).name
        f = RemoteFile(f"{BAKED_NAME}/{name}", "", "", name)
        download_file(f, model_dir, endpoint, None, url=parsed, **kwargs)  # no hub token
        record = {"name": name, "url": parsed, "sha256": sha256_of(model_dir / f.path)}
        where = model_dir / f.path
    else:
        repo, revision, path = parsed
        files = [path] if path else diffusers_files(
            repo_files(endpoint, repo, revision, token), source)
        for remote in files:
            local = Path(remote).name if path else remote
            download_file(RemoteFile(f"{BAKED_NAME}/{local}", repo, revision, remote),
                          model_dir, endpoint, token, **kwargs)
        where = model_dir / BAKED_NAME / Path(path).name if path else model_dir / BAKED_NAME
        record = {"name": f"{repo}/{path}" if path else repo, "revision": revision}
    where.with_name(where.name + SOURCE_SUFFIX).write_text(json.dumps(record, indent=2) + "\n")
    size = sum(p.stat().st_size for p in (model_dir / BAKED_NAME).rglob("*") if p.is_file())
    log.info("baked %s into %s (%.1f MB in %.1f s)", source, model_dir / BAKED_NAME,
             size / 1e6, time.monotonic() - started)
    return BAKED_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    add_spec_arguments(parser)
    parser.add_argument("--bake", metavar="SOURCE", default=None,
                        help="also fetch your SDXL model: owner/name@COMMIT[:file.safetensors] "
                             "or an https URL of a .safetensors file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.bake:
            args.base_model = bake(args.model_dir, args.bake)
        fetched = download(args.model_dir, spec_from_args(args))
    except DownloadError as exc:
        log.error("%s", exc)
        return 1
    log.info("%s is complete (%d files fetched)", args.model_dir, fetched)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
