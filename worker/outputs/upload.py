"""Bucket upload for generated images, following RunPod's conventions.

Owns: where a bucket is configured (``BUCKET_*`` env vars for the worker, a job's ``s3Config``),
object keys, and ``Uploader.upload``: ``put_object``, then a presigned GET URL for the caller.
Unlike runpod's ``rp_upload``, a half-set configuration is an error rather than a silent local
path (``StartupError`` for the worker's settings, ``InputError`` for a job's ``s3Config``), and
a failed upload is an ``UploadError`` (a ``JobError``) with one clear message.

Secrets stay secret: ``Bucket``'s repr masks both keys, and no message or log line here carries a
key, a secret or a presigned URL (only the bucket and the object key are logged). botocore's own
DEBUG logs show the access key id in its Authorization headers, so keep ``botocore`` at INFO.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

from worker.errors import InputError, JobError, StartupError
from worker.settings import BUCKET_ENV

log = logging.getLogger(__name__)

S3_CONFIG_KEYS = ("accessId", "accessSecret", "bucketName", "endpointUrl")
# rp_upload's default, and the longest a SigV4 presigned URL may live.
MAX_EXPIRY_S = 604_800

# Codes meaning "these credentials will never work here": retrying only delays the error.
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                              "ExpiredToken", "AuthorizationHeaderMalformed"})
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled"})
# botocore's standard-mode throttling and transient codes, plus S3's spellings of them.
TRANSIENT_CODES = frozenset({"Throttling", "ThrottlingException", "ThrottledException",
                             "SlowDown", "RequestLimitExceeded", "TooManyRequestsException",
                             "RequestThrottled", "RequestTimeout", "RequestTimeoutException",
                             "InternalError", "ServiceUnavailable", "PriorRequestNotComplete"})
MESSAGES = {  # per failure kind (see _classify)
    "credentials": "bucket upload failed: the bucket rejected the credentials ({code})",
    "denied": "bucket upload failed: the credentials may not write to bucket '{bucket}' ({code})",
    "no-bucket": "bucket upload failed: bucket '{bucket}' does not exist at the endpoint ({code})",
    "transient": "bucket upload to '{bucket}' failed after {attempts} attempt(s) ({code})",
    "permanent": "bucket upload to '{bucket}' failed ({code})",
}
# S3 and Google Cloud Storage bucket names (GCS also allows underscores); no slash, no space.
BUCKET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,220}[A-Za-z0-9]")
# AWS hosts: bucket.s3.region.amazonaws.com, bucket.s3.amazonaws.com, s3-region (legacy), s3.region
AWS_HOST_RE = re.compile(
    r"(?:(?P<bucket>[^/]+)\.)?s3(?:[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d))?\.amazonaws\.com")


class UploadError(JobError):
    """An upload failed; the message names the bucket and the error code, never a credential."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Bucket:
    """Where images go. ``endpoint_url`` is the service endpoint, without the bucket in it."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket_name: str
    region: str | None = None
    path_style: bool = False  # the bucket came in the URL's path: keep addressing it that way

    def __repr__(self) -> str:
        return (f"Bucket(endpoint_url={self.endpoint_url!r}, bucket_name={self.bucket_name!r}, "
                f"region={self.region!r}, path_style={self.path_style}, "
                f"access_key_id='***', secret_access_key='***')")

    __str__ = __repr__


def _bucket(origin: str, url: str, key_id: str, secret: str, name: str | None,
            error: type[Exception]) -> Bucket:
    """Split ``url`` into the service endpoint and the bucket it names, if any.

    Path style (``http://host:9000/my-bucket``) or virtual-hosted style
    (``https://my-bucket.s3.us-east-1.amazonaws.com``), as RunPod's docs write it; an explicit
    ``name`` wins over the URL's. ``origin`` names the setting in errors: the URL is not echoed.
    ``error`` is the type to raise: whose mistake a bad URL is depends on where it came from.
    """
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - parsing the port is what raises for 99999 or "x"
    except ValueError as exc:
        raise error(f"{origin} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error(f"{origin} must be an http(s) URL, e.g. "
                    f"https://my-bucket.s3.us-east-1.amazonaws.com or http://host:9000/bucket")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise error(f"{origin} must not carry credentials, a query or a fragment")
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) > 1:
        raise error(f"{origin} may name a bucket in its path but nothing after it")
    host = parts.netloc
    aws = AWS_HOST_RE.fullmatch(parts.hostname)
    url_bucket = segments[0] if segments else (aws and aws["bucket"])
    if not segments and not aws and name and parts.hostname.startswith(f"{name}."):
        url_bucket = name  # virtual-hosted on another provider, e.g. name.nyc3.digitaloceanspaces
    if url_bucket and not segments:
        host = host.removeprefix(f"{url_bucket}.")
    if name and url_bucket and name != url_bucket:
        log.warning("%s names bucket %s; using %s as configured", origin, url_bucket, name)
    bucket_name = name or url_bucket
    if not bucket_name:
        raise error(f"cannot tell the bucket from {origin}: set BUCKET_NAME, or put the "
                    f"bucket in the URL (https://BUCKET.s3.REGION.amazonaws.com or "
                    f"http://host:port/BUCKET)")
    if not BUCKET_NAME_RE.fullmatch(bucket_name):
        raise error(f"bucket name {bucket_name!r} is invalid: 3-222 letters, digits, "
                    f"dots, hyphens or underscores")
    endpoint = f"{parts.scheme}://{host}"
    # botocore refuses such a host only when the client is made, at the first upload: after
    # the GPU ran, as an internal error. Its own check, here, makes it the setting's error.
    if not (is_valid_endpoint_url(endpoint) or is_valid_ipv6_endpoint_url(endpoint)):
        raise error(f"{origin} has a host name S3 clients refuse: use labels of 1-63 letters, "
                    f"digits and inner hyphens, 255 characters in all, or an IP address")
    return Bucket(endpoint_url=endpoint, access_key_id=key_id.strip(),
                  secret_access_key=secret.strip(), bucket_name=bucket_name,
                  region=aws["region"] if aws else None, path_style=bool(segments))


def bucket_from_env(env: Mapping[str, str]) -> Bucket | None:
    """The worker's bucket from RunPod's ``BUCKET_*`` variables; None when none is set.

    Raises ``StartupError`` naming the missing variables (never a value) when only some are
    set: rp_upload would quietly write to a local path instead.
    """
    values = {key: env.get(key, "").strip() for key in BUCKET_ENV}
    required = BUCKET_ENV[:3]
    if not any(values.values()):
        return None
    missing = [key for key in required if not values[key]]
    if missing:
        raise StartupError(f"bucket upload is half configured: {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set; set all of "
                           f"{', '.join(required)} (and optionally BUCKET_NAME), or none")
    return _bucket("BUCKET_ENDPOINT_URL", values["BUCKET_ENDPOINT_URL"],
                   values["BUCKET_ACCESS_KEY_ID"], values["BUCKET_SECRET_ACCESS_KEY"],
                   values["BUCKET_NAME"] or None, StartupError)


def bucket_from_s3_config(cfg: object) -> Bucket:
    """A job's bucket from RunPod's ``s3Config``; ``InputError`` names bad keys, not values."""
    if not isinstance(cfg, Mapping):
        raise InputError(f"s3Config must be an object with {', '.join(S3_CONFIG_KEYS)}; "
                         f"got {type(cfg).__name__}")
    missing = [k for k in S3_CONFIG_KEYS if cfg.get(k) is None or cfg.get(k) == ""]
    wrong = [f"{k} ({type(cfg[k]).__name__})" for k in S3_CONFIG_KEYS
             if k not in missing and not isinstance(cfg[k], str)]
    blank = [k for k in S3_CONFIG_KEYS if isinstance(cfg.get(k), str) and k not in missing
             and not cfg[k].strip()]
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("not strings", wrong), ("blank", blank)) if keys]
    if problems:
        raise InputError(f"s3Config is invalid ({'; '.join(problems)}); it needs "
                         f"{', '.join(S3_CONFIG_KEYS)}, all strings")
    return _bucket("s3Config.endpointUrl", cfg["endpointUrl"], cfg["accessId"],
                   cfg["accessSecret"], cfg["bucketName"].strip(), InputError)


def object_key(job_id: str, index: int, ext: str) -> str:
    """``{job_id}/{index}-{uuid8}{ext}``: grouped per job, unique per call (as rp_upload)."""
    safe_job = re.sub(r"[^A-Za-z0-9_-]+", "_", str(job_id))[:128].strip("_") or "job"
    suffix = ext if ext.startswith(".") else f".{ext}"
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix):
        raise ValueError(f"ext={ext!r} is invalid: a short extension such as .png")
    return f"{safe_job}/{int(index)}-{uuid.uuid4().hex[:8]}{suffix.lower()}"


def _classify(exc: Exception) -> tuple[str, str]:
    """(kind, code) with kind one of credentials, denied, no-bucket, transient, permanent."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(error.get("Code") or f"HTTP {status}")
        if code in CREDENTIAL_CODES:
            return "credentials", code
        if code in DENIED_CODES:
            return "denied", code
        if code == "NoSuchBucket":
            return "no-bucket", code
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return "transient", code
        return "permanent", code
    if isinstance(exc, BotoConnectionError | HTTPClientError):  # refused, reset, timed out
        return "transient", type(exc).__name__
    return "permanent", type(exc).__name__


class Uploader:
    """Uploads bytes and returns presigned URLs; one cached, thread-safe client per Bucket.

    Two retry layers: botocore retries each request quickly (``client_retries``); on top, a
    failure that is still transient (connection errors, 5xx, throttling) is retried up to
    ``attempts`` times with exponential backoff, which rides out a short outage of the store.
    """

    def __init__(self, *, attempts: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 8.0,
                 expiry_s: int = MAX_EXPIRY_S, client_retries: int = 2,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if attempts < 1 or client_retries < 0 or backoff_s < 0:
            raise ValueError("attempts must be >= 1, client_retries and backoff_s >= 0")
        if not 1 <= expiry_s <= MAX_EXPIRY_S:
            raise ValueError(f"expiry_s must be 1-{MAX_EXPIRY_S} (SigV4's 7-day limit)")
        self.attempts, self.expiry_s = attempts, expiry_s
        self._backoff_s, self._max_backoff_s, self._sleep = backoff_s, max_backoff_s, sleep
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._client_retries = client_retries
        self._clients: dict[Bucket, Any] = {}
        self._lock = threading.Lock()

    def client(self, bucket: Bucket) -> Any:
        """The S3 client for ``bucket``, created once (boto3 clients are thread-safe)."""
        with self._lock:
            if bucket not in self._clients:
                config = Config(
                    retries={"max_attempts": self._client_retries, "mode": "standard"},
                    connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
                    signature_version="s3v4",
                    # boto3 >= 1.36 sends CRC32 checksums by default, which R2, GCS and other
                    # S3-compatible stores reject; send and check them only where S3 requires.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    s3={"addressing_style": "path" if bucket.path_style else "auto"})
                # A session of its own: boto3's default session is not thread-safe.
                self._clients[bucket] = boto3.session.Session().client(
                    "s3", endpoint_url=bucket.endpoint_url, region_name=bucket.region,
                    aws_access_key_id=bucket.access_key_id,
                    aws_secret_access_key=bucket.secret_access_key, config=config)
            return self._clients[bucket]

    def upload(self, bucket: Bucket, key: str, data: bytes, content_type: str) -> str:
        """Put ``data`` at ``key`` and return a presigned GET URL; raises ``UploadError``."""
        client = self.client(bucket)
        name = bucket.bucket_name
        for attempt in range(1, self.attempts + 1):
            try:
                client.put_object(Bucket=name, Key=key, Body=data, ContentType=content_type)
                break
            except Exception as exc:  # noqa: BLE001 - classified below; all end as UploadError
                kind, code = _classify(exc)
                if kind != "transient" or attempt == self.attempts:
                    log.warning("upload to bucket %s key %s failed: %s", name, key, code)
                    # from None: a chained botocore error would carry the server's own text
                    # into tracebacks (AWS echoes the access key id in some error bodies).
                    message = MESSAGES[kind].format(code=code, bucket=name, attempts=attempt)
                    raise UploadError(message, code) from None
                delay = min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s)
                log.warning("upload to bucket %s key %s failed (%s), attempt %d of %d; retrying "
                            "in %.1f s", name, key, code, attempt, self.attempts, delay)
                self._sleep(delay)
        log.info("uploaded %d bytes to bucket %s key %s", len(data), name, key)
        return client.generate_presigned_url("get_object", Params={"Bucket": name, "Key": key},
                                             ExpiresIn=self.expiry_s)

