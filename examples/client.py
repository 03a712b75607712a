"""Example client for the SDXL-Lightning worker: submit a job, follow it, save its images.

Talks to a deployed RunPod endpoint (``--endpoint-id``: ``https://api.runpod.ai/v2/<id>``, with
``--api-key`` or ``RUNPOD_API_KEY``) or to the worker's local test server (``--base-url``, for
``python handler.py --rp_serve_api --rp_api_port 8000``). Uses ``/run`` and polls
``/status/{id}``, or ``/runsync`` with ``--sync``. Each image is written to ``--out`` with the
extension of its data URI's MIME type, or downloaded when the worker returned a URL.

    RUNPOD_API_KEY=... python examples/client.py --endpoint-id abc123 --prompt "a lighthouse"
    python examples/client.py --base-url http://127.0.0.1:8000 --input @test_input.json --sync

The real API's ``/status`` is a GET; the local server's is POST-only (and runs the job when
called): the client tries GET and falls back to POST on 405. Exit status: 0 when the job
completed and every image was saved, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger("sdxl-lightning-client")

API_ROOT = "https://api.runpod.ai/v2"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class ClientError(RuntimeError):
    """The job could not be submitted, did not finish, failed, or its images were unusable."""


class Endpoint:
    """One RunPod-style endpoint: ``/run``, ``/runsync`` and ``/status/{id}`` under a base URL."""

    def __init__(self, base_url: str, api_key: str | None, deadline: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.deadline = deadline  # time.monotonic() by which everything must be done
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.status_method = "GET"  # switched to POST once the server answers 405

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientError("timed out waiting for the job")
        return left

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None
                 ) -> requests.Response:
        try:
            # Bounded by the overall deadline: the local server's POST /status runs the job.
            return self.session.request(method, f"{self.base_url}{path}", json=body,
                                        timeout=(min(10.0, self.remaining()), self.remaining()))
        except requests.RequestException as exc:
            raise ClientError(f"{method} {path} failed: {exc}") from None

    @staticmethod
    def _json(response: requests.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise ClientError(f"HTTP {response.status_code} from {response.request.method} "
                              f"{response.url}: {response.text[:500]}")
        try:
            data = response.json()
        except ValueError:
            raise ClientError(f"not JSON from {response.url}: {response.text[:200]}") from None
        if not isinstance(data, dict):
            raise ClientError(f"unexpected answer from {response.url}: {data!r:.200}")
        return data

    def submit(self, job_input: dict[str, Any], sync: bool) -> dict[str, Any]:
        """POST the job; returns the job object (``id``, ``status``, maybe ``output``)."""
        return self._json(self._request("POST", "/runsync" if sync else "/run",
                                        {"input": job_input}))

    def status(self, job_id: str) -> dict[str, Any]:
        path = f"/status/{urllib.parse.quote(job_id, safe='')}"
        response = self._request(self.status_method, path)
        if response.status_code == 405 and self.status_method == "GET":
            log.info("GET /status is not allowed here (the local test server): using POST")
            self.status_method = "POST"
            response = self._request("POST", path)
        return self._json(response)


def wait(endpoint: Endpoint, job: dict[str, Any], poll_s: float,
         on_progress: Callable[[Any], None]) -> dict[str, Any]:
    """Poll until the job reaches a terminal status; report each new progress update."""
    last_progress: Any = None
    while job.get("status") not in TERMINAL:
        if "id" not in job:
            raise ClientError(f"the endpoint returned no job id: {job!r:.300}")
        # While IN_PROGRESS, RunPod puts the worker's latest progress_update in "output".
        progress = job.get("output")
        if job.get("status") == "IN_PROGRESS" and progress is not None \
                and progress != last_progress:
            on_progress(progress)
            last_progress = progress
        time.sleep(min(poll_s, endpoint.remaining()))
        job = endpoint.status(str(job["id"]))
        log.debug("job %s: %s", job.get("id"), job.get("status"))
    return job


def parse_data_uri(uri: str) -> tuple[str, bytes]:
    """``data:<mime>;base64,<data>`` -> (mime, bytes)."""
    header, sep, data = uri.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ClientError(f"not a base64 data URI: {uri[:60]!r}")
    try:
        return header[len("data:"):-len(";base64")].lower(), base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ClientError(f"bad base64 in data URI: {exc}") from None


def extension(mime: str) -> str:
    mime = mime.split(";")[0].strip().lower()
    if mime not in EXTENSIONS:
        raise ClientError(f"unexpected image type {mime!r} (expected one of "
                          f"{', '.join(EXTENSIONS)})")
    return EXTENSIONS[mime]


def fetch_image(ref: str, endpoint: Endpoint) -> tuple[bytes, str]:
    """The bytes of one returned image and the file extension they need."""
    if ref.startswith("data:"):
        mime, data = parse_data_uri(ref)
        return data, extension(mime)
    if urllib.parse.urlsplit(ref).scheme in ("https", "http"):  # uploaded to a bucket
        try:
            # No API key here: a presigned bucket URL rejects a second credential.
            response = requests.get(ref, timeout=(10.0, endpoint.remaining()))
            response.raise_for_status()
        except requests.RequestException as exc:
            raise ClientError(f"could not download {ref}: {exc}") from None
        content_type = response.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() in EXTENSIONS:
            return response.content, extension(content_type)
        suffix = Path(urllib.parse.urlsplit(ref).path).suffix.lower()
        by_suffix = {ext: ext for ext in EXTENSIONS.values()} | {".jpeg": ".jpg"}
        if suffix in by_suffix:
            return response.content, by_suffix[suffix]
        raise ClientError(f"{ref}: unknown image type (Content-Type {content_type!r})")
    raise ClientError(f"an image is neither a data URI nor a URL: {ref[:60]!r}")


def save_images(output: Any, job_id: str, out_dir: Path, endpoint: Endpoint) -> list[Path]:
    """Write every image of a completed job's output; returns the paths."""
    if not isinstance(output, dict) or not isinstance(output.get("images"), list):
        raise ClientError(f"the job's output has no 'images' list: {output!r:.300}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(output["images"]):
        ref = item.get("image") if isinstance(item, dict) else item
        if not isinstance(ref, str):
            raise ClientError(f"image {index} has no 'image' string")
        data, ext = fetch_image(ref, endpoint)
        seed = item.get("seed") if isinstance(item, dict) else None
        name = f"{job_id}-{index}" + (f"-seed{seed}" if seed is not None else "") + ext
        path = out_dir / name.replace("/", "_")
        path.write_bytes(data)
        paths.append(path)
    return paths


def job_input_from(args: argparse.Namespace) -> dict[str, Any]:
    """``--input`` (JSON, or @file; a ``{"input": ...}`` wrapper is unwrapped) plus ``--prompt``."""
    job_input: dict[str, Any] = {}
    if args.input:
        text = Path(args.input[1:]).read_text(encoding="utf-8") if args.input.startswith("@") \
            else args.input
        try:
            job_input = json.loads(text)
        except ValueError as exc:
            raise ClientError(f"--input is not valid JSON: {exc}") from None
        if isinstance(job_input, dict) and set(job_input) == {"input"}:
            job_input = job_input["input"]  # a test_input.json-style file
        if not isinstance(job_input, dict):
            raise ClientError("--input must be a JSON object")
    if args.prompt is not None:
        job_input["prompt"] = args.prompt
    if "prompt" not in job_input:
        raise ClientError("give --prompt, or --input with a prompt")
    return job_input


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint-id", help="RunPod endpoint id (uses the RunPod API)")
    where.add_argument("--base-url", help="another base URL, e.g. http://127.0.0.1:8000 for "
                                          "`python handler.py --rp_serve_api`")
    parser.add_argument("--api-key", default=os.environ.get("RUNPOD_API_KEY"),
                        help="RunPod API key (default: $RUNPOD_API_KEY)")
    parser.add_argument("--input", help='job input as JSON, or @FILE ({"prompt": ..., ...})')
    parser.add_argument("--prompt", help="the prompt (sets input.prompt)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for images")
    parser.add_argument("--sync", action="store_true", help="use /runsync instead of /run")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up after this many seconds (default 600)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every poll")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    """Submit, wait, save; raises ``ClientError`` on any failure."""
    if args.endpoint_id and not args.api_key:
        raise ClientError("the RunPod API needs an API key: --api-key or RUNPOD_API_KEY")
    base_url = args.base_url or f"{API_ROOT}/{args.endpoint_id}"
    endpoint = Endpoint(base_url, args.api_key, time.monotonic() + args.timeout)
    job = endpoint.submit(job_input_from(args), args.sync)
    log.info("job %s: %s", job.get("id"), job.get("status"))
    job = wait(endpoint, job, args.poll_interval,
               lambda progress: log.info("job %s progress: %s", job.get("id"), progress))
    if job["status"] != "COMPLETED":
        raise ClientError(f"job {job.get('id')} {job['status']}: {job.get('error', 'no error')}")
    output = job.get("output")
    for warning in (output.get("warnings") or []) if isinstance(output, dict) else []:
        print(f"warning: {warning}")
    return save_images(output, str(job.get("id", "job")), args.out, endpoint)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        paths = run(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
