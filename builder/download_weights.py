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
[--tiny-decoder]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from builder import add_spec_arguments, spec_from_args
from worker.spec import ModelSpec, RemoteFile

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
                  timeout: float = 60.0) -> bool:
    """Fetch one file into place; returns False if a valid copy was already there."""
    dest = model_dir / f.path
    if dest.is_file() and check_file(dest) is None:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = file_url(endpoint, f)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    add_spec_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fetched = download(args.model_dir, spec_from_args(args))
    except DownloadError as exc:
        log.error("%s", exc)
        return 1
    log.info("%s is complete (%d files fetched)", args.model_dir, fetched)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
