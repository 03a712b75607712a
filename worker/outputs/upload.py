"""Bucket upload for generated images, following RunPod's conventions.

Owns: where a bucket is configured (``BUCKET_*`` env vars for the worker, a job's ``s3Config``),
object keys, the S3 clients, and ``Uploader.upload``: ``put_object``, then a presigned GET URL
for the caller. Unlike runpod's ``rp_upload``, a half-set configuration is an error rather than
a silent local path (``StartupError`` for the worker's settings, ``InputError`` for a job's
``s3Config``), and a failed upload is an ``UploadError`` (a ``JobError``) with one clear message.

A job's ``s3Config`` is the caller's, checked before any GPU work (``Uploader.prepare``): every
field (types, lengths, printable ASCII), the URL as S3 clients read it, and the address policy
of ``inputs/fetch`` (``blocked_reason``): its host must resolve to public addresses only. The
connections its client opens are checked again and pinned (``_Dialled``): each resolves the
host it dials, checks every address and connects to a checked one, with no second lookup (DNS
rebinding), and no proxy from the environment (a proxy would do its own lookup). A refused
target is never dialled, so no error tells an open port from a closed one. The operator's own
``BUCKET_*`` bucket is trusted: none of this applies to it.

Clients: one shared boto3 session makes them (~0.4 MB and ~2 ms each, against ~13 MB and ~0.1 s
with a session each: measured); a job's client enters a small LRU only when its configuration
has succeeded twice (a one-off or failed configuration keeps nothing), keyed by an HMAC of the
configuration, never by the secret itself. Making a client never holds a lock an upload needs.

Deadline: ``Budget`` is one job's time for its uploads; at its end ``Budget.abort`` shuts down
the sockets its uploads are blocked on, so a bucket that accepts and never answers holds the
upload threads until the deadline, not for attempts x retries x read timeouts.

Secrets stay secret: ``Bucket``'s repr masks both keys, and no message or log line here carries a
key, a secret, a job's endpoint or a presigned URL (only the bucket and the object key are logged).
botocore's own DEBUG logs show the access key id in its Authorization headers, so keep
``botocore`` at INFO.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

import boto3
from botocore.awsrequest import (
    AWSHTTPConnection,
    AWSHTTPConnectionPool,
    AWSHTTPSConnection,
    AWSHTTPSConnectionPool,
)
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url
from urllib3 import PoolManager
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from worker.errors import InputError, JobError, StartupError, brief_reason, shown
from worker.inputs.fetch import Resolver, blocked_reason, system_resolver
from worker.settings import BUCKET_ENV

log = logging.getLogger(__name__)

S3_CONFIG_KEYS = ("accessId", "accessSecret", "bucketName", "endpointUrl")
# rp_upload's default, and the longest a SigV4 presigned URL may live.
MAX_EXPIRY_S = 604_800
# Access key ids are 16-128 characters at AWS, 25-61 at B2, R2 and GCS; secrets 31-64.
MAX_KEY_CHARS = 256
# scheme://host:port/bucket: a 255-character host and a 222-character bucket fit with room.
MAX_ENDPOINT_CHARS = 1024
# Keys and secrets go into HTTP headers and HMACs, the URL into a Host header: no spaces, no
# control characters, nothing outside ASCII (an international host name goes in as xn--).
PRINTABLE = re.compile(r"[\x21-\x7e]+")
JOB_CLIENTS = 8  # job clients kept (LRU): ~0.4 MB each plus their idle keep-alive sockets
SEEN_CONFIGS = 256  # configurations remembered (as HMACs) to tell a second success from a first

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
    "refused": "bucket upload to '{bucket}' refused: the endpoint's host resolves to {code}; a "
               "job's bucket must be at a public address",
    "deadline": "bucket upload to '{bucket}' did not finish within the {deadline:g} s upload "
                "deadline (UPLOAD_DEADLINE_S)",
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


class _Stop(CancelledError):
    """Ends a request at once. botocore passes CancelledError through (s3transfer cancels that
    way) instead of wrapping it as an HTTPClientError, which it would retry."""


class EndpointRefused(_Stop):
    """A job's endpoint host resolves to an address the policy refuses; nothing was dialled."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UploadAborted(_Stop):
    """The job's upload budget ran out (or another of its uploads failed): stop this one."""


@dataclass(frozen=True)
class Bucket:
    """Where images go. ``endpoint_url`` is the service endpoint, without the bucket in it.

    ``trusted``: the operator's own (``BUCKET_*``), exempt from the address policy. ``client``:
    the S3 client ``Uploader.prepare`` made for one job, carried to its uploads.
    """

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket_name: str
    region: str | None = None
    path_style: bool = False  # the bucket came in the URL's path: keep addressing it that way
    trusted: bool = False
    client: Any = field(default=None, compare=False)

    def __repr__(self) -> str:
        return (f"Bucket(endpoint_url={self.endpoint_url!r}, bucket_name={self.bucket_name!r}, "
                f"region={self.region!r}, path_style={self.path_style}, "
                f"trusted={self.trusted}, access_key_id='***', secret_access_key='***')")

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
        port = parts.port  # parsing the port is what raises for 99999 or "x"
    except ValueError as exc:  # the reason may quote the URL: brief_reason cuts it
        raise error(f"{origin} is not a valid URL ({brief_reason(exc)})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error(f"{origin} must be an http(s) URL, e.g. "
                    f"https://my-bucket.s3.us-east-1.amazonaws.com or http://host:9000/bucket")
    if port == 0:
        raise error(f"{origin} has port 0: use a port from 1 to 65535, or none")
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
        # A job's URL is the caller's text: DEBUG only; the operator's is worth a warning.
        log.log(logging.WARNING if error is StartupError else logging.DEBUG,
                "%s names bucket %s; using %s as configured", origin, url_bucket, name)
    bucket_name = name or url_bucket
    if not bucket_name:
        raise error(f"cannot tell the bucket from {origin}: set BUCKET_NAME, or put the "
                    f"bucket in the URL (https://BUCKET.s3.REGION.amazonaws.com or "
                    f"http://host:port/BUCKET)")
    if not BUCKET_NAME_RE.fullmatch(bucket_name):
        raise error(f"bucket name {shown(bucket_name)} is invalid: 3-222 letters, digits, "
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
    bucket = _bucket("BUCKET_ENDPOINT_URL", values["BUCKET_ENDPOINT_URL"],
                     values["BUCKET_ACCESS_KEY_ID"], values["BUCKET_SECRET_ACCESS_KEY"],
                     values["BUCKET_NAME"] or None, StartupError)
    return replace(bucket, trusted=True)


def logged_name(bucket: Bucket) -> str:
    """The bucket as log lines name it: the operator's by name, a job's without its text."""
    return bucket.bucket_name if bucket.trusted else "(the job's s3Config)"


def bucket_from_s3_config(cfg: object) -> Bucket:
    """A job's bucket from RunPod's ``s3Config``; ``InputError`` names bad keys, not values.

    Any JSON value gets either a ``Bucket`` or an ``InputError`` of a few hundred characters
    at most; a key, a secret or the URL is never quoted (their lengths are).
    """
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
    for key, limit in (("accessId", MAX_KEY_CHARS), ("accessSecret", MAX_KEY_CHARS),
                       ("endpointUrl", MAX_ENDPOINT_CHARS)):
        value = cfg[key].strip()
        if len(value) > limit:
            raise InputError(f"s3Config.{key} is {len(value)} characters; the limit is {limit}")
        if not PRINTABLE.fullmatch(value):
            raise InputError(f"s3Config.{key} must be printable ASCII, without spaces or "
                             f"control characters (an international host name as xn--...)")
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
    """(kind, code): kind one of credentials, denied, no-bucket, transient, permanent, refused
    (code: why the address is refused) and deadline."""
    if isinstance(exc, EndpointRefused):
        return "refused", exc.reason
    if isinstance(exc, UploadAborted):
        return "deadline", "deadline"
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


# --- the address policy for a job's endpoint ----------------------------------------------------

@dataclass(frozen=True)
class EndpointGuard:
    """inputs/fetch's address policy for the hosts a job's client dials.

    ``resolver`` and ``blocked`` are injectable for tests only (a stand-in S3 on loopback, a
    "public" name mapped in-process); the worker always uses the defaults.
    """

    resolver: Resolver = system_resolver
    blocked: Callable[[str], str | None] = blocked_reason

    def addresses(self, host: str, port: int) -> list[str]:
        """Every address of ``host``, each allowed; ``EndpointRefused`` names why one is not.

        The resolver's own errors (``OSError``: unknown host) pass through.
        """
        host = host.strip("[]")
        try:
            found = [str(ipaddress.ip_address(host))]
        except ValueError:
            found = [str(address) for address in self.resolver(host, port)]
        if not found:
            raise OSError(f"no address for the host (port {port})")
        for address in found:
            if why := self.blocked(address):
                raise EndpointRefused(why)
        return found


# --- connections: pinned to checked addresses, and cut at the deadline -------------------------

_CURRENT = threading.local()  # .call: the upload running on this thread, if under a Budget


class _Call:
    """One ``put_object`` under a ``Budget``: the sockets it uses, for ``Budget.abort``."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.sockets: list[socket.socket] = []

    def track(self, sock: socket.socket) -> None:
        self.budget._track(self, sock)

    def untrack(self, sock: socket.socket) -> None:
        self.budget._untrack(self, sock)


class Budget:
    """One job's time for its uploads (``UPLOAD_DEADLINE_S``), and the way to stop them."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError(f"seconds={seconds} must be > 0")
        self.seconds = seconds
        self._clock, self._end = clock, clock() + seconds
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._stopped = threading.Event()

    def remaining(self) -> float:
        """Seconds left; 0 once stopped."""
        return 0.0 if self._stopped.is_set() else max(self._end - self._clock(), 0.0)

    def wait(self, seconds: float) -> bool:
        """Back off ``seconds``; True (at once) when the budget would run out first."""
        if seconds >= self.remaining():
            return True
        return self._stopped.wait(seconds)

    def abort(self) -> None:
        """Stop every upload of the job: the sockets they wait on are shut down, new ones fail.

        Called from another thread (the event loop), at the deadline or when the job is over.
        """
        self._stopped.set()
        # Under the lock: a socket back in its pool (untracked) may already serve another job.
        with self._lock:
            for sock in (sock for call in self._calls for sock in call.sockets):
                with contextlib.suppress(OSError):  # the fd, bypassing TLS, as fetch.py does
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Around one ``put_object`` on this thread: its connections are tracked."""
        with self._lock:
            if self.remaining() <= 0:
                raise UploadAborted("the upload deadline has passed")
            call = _Call(self)
            self._calls.add(call)
        _CURRENT.call = call
        try:
            yield
        finally:
            _CURRENT.call = None
            with self._lock:
                self._calls.discard(call)

    def _track(self, call: _Call, sock: socket.socket) -> None:
        with self._lock:
            if self.remaining() <= 0:
                raise UploadAborted("the upload deadline has passed")
            if sock not in call.sockets:
                call.sockets.append(sock)

    def _untrack(self, call: _Call, sock: socket.socket) -> None:
        with self._lock:
            if sock in call.sockets:
                call.sockets.remove(sock)


class _Dialled:
    """Mixin for botocore's connections: tracked by the thread's ``_Call``, and with ``guard``
    set, dialled only to addresses it allows (resolved here, once: no second lookup)."""

    guard: ClassVar[EndpointGuard | None] = None
    # from urllib3's HTTPConnection
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any
    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        call: _Call | None = getattr(_CURRENT, "call", None)
        if call is not None and call.budget.remaining() <= 0:
            raise UploadAborted("the upload deadline has passed")
        sock = super()._new_conn() if self.guard is None else self._pinned()  # type: ignore[misc]
        if call is not None:
            try:
                call.track(sock)
            except UploadAborted:
                sock.close()
                raise
        return sock

    def _pinned(self) -> socket.socket:
        assert self.guard is not None
        try:
            addresses = self.guard.addresses(self.host, self.port)
        except EndpointRefused as exc:
            log.warning("refused to connect a job's bucket: its host resolves to %s", exc.reason)
            raise
        except Exception as exc:  # noqa: BLE001 - an unknown host: urllib3's own error for it
            reason = f"cannot resolve the host ({brief_reason(exc)})"
            raise NewConnectionError(self, reason) from None  # type: ignore[arg-type]
        error: Exception = NewConnectionError(self, "no address")  # type: ignore[arg-type]
        for address in addresses:
            try:
                return urllib3_connection.create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options)
            except TimeoutError:
                error = ConnectTimeoutError(self, f"connecting timed out ({self.timeout} s)")
            except OSError as exc:
                error = NewConnectionError(self, f"Failed to establish a new connection: "
                                                 f"{exc}")  # type: ignore[arg-type]
        raise error

    def request(self, *args: Any, **kwargs: Any) -> Any:
        call: _Call | None = getattr(_CURRENT, "call", None)
        if call is not None and self.sock is not None:  # a kept-alive connection, reused
            call.track(self.sock)
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _Returned:
    """Mixin for the pools: a connection handed back is no longer the thread's call's to cut."""

    def _put_conn(self, conn: Any) -> None:
        call: _Call | None = getattr(_CURRENT, "call", None)
        if call is not None and conn is not None and conn.sock is not None:
            call.untrack(conn.sock)
        super()._put_conn(conn)  # type: ignore[misc]


def _pool_classes(guard: EndpointGuard | None) -> dict[str, type]:
    """urllib3 pool classes whose connections are ``_Dialled`` under ``guard``."""
    http = type("DialledHTTPConnection", (_Dialled, AWSHTTPConnection), {"guard": guard})
    https = type("DialledHTTPSConnection", (_Dialled, AWSHTTPSConnection), {"guard": guard})
    return {"http": type("DialledHTTPPool", (_Returned, AWSHTTPConnectionPool),
                         {"ConnectionCls": http}),
            "https": type("DialledHTTPSPool", (_Returned, AWSHTTPSConnectionPool),
                          {"ConnectionCls": https})}


def _install(client: Any, pools: dict[str, type]) -> None:
    """Make ``client``'s HTTP session use ``pools`` (before it has made any connection).

    botocore has no public hook for its connection classes; its URLLib3Session keeps them in
    ``_pool_classes_by_scheme`` and hands them to its PoolManager. If that ever changes this
    fails loudly, rather than leaving a job's endpoint unchecked (the tests would fail too).
    """
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    manager = getattr(session, "_manager", None)
    if not isinstance(manager, PoolManager) or not hasattr(session, "_pool_classes_by_scheme"):
        raise RuntimeError("botocore's HTTP session is not the one upload.py pins connections "
                           "of; update _install for this botocore version")
    session._pool_classes_by_scheme = pools  # type: ignore[union-attr]
    manager.pool_classes_by_scheme = pools


class Uploader:
    """Uploads bytes and returns presigned URLs; thread-safe, clients cached as described above.

    Two retry layers: botocore retries each request quickly (``client_retries``); on top, a
    failure that is still transient (connection errors, 5xx, throttling) is retried up to
    ``attempts`` times with exponential backoff, which rides out a short outage of the store.
    A ``Budget`` bounds them all. ``guard``: the address policy for jobs' endpoints (a test may
    pass one that allows its loopback stand-in; the worker uses the default).
    """

    def __init__(self, *, attempts: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 8.0,
                 expiry_s: int = MAX_EXPIRY_S, client_retries: int = 2,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep,
                 guard: EndpointGuard | None = None, job_clients: int = JOB_CLIENTS) -> None:
        if attempts < 1 or client_retries < 0 or backoff_s < 0 or job_clients < 0:
            raise ValueError("attempts must be >= 1, client_retries, backoff_s and job_clients "
                             ">= 0")
        if not 1 <= expiry_s <= MAX_EXPIRY_S:
            raise ValueError(f"expiry_s must be 1-{MAX_EXPIRY_S} (SigV4's 7-day limit)")
        self.attempts, self.expiry_s = attempts, expiry_s
        self._backoff_s, self._max_backoff_s, self._sleep = backoff_s, max_backoff_s, sleep
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._client_retries = client_retries
        self._guard = guard or EndpointGuard()
        self._pools = {True: _pool_classes(None), False: _pool_classes(self._guard)}
        self._job_clients = job_clients
        self._hmac_key = secrets.token_bytes(32)  # per process: cache keys reveal no secret
        self._lock = threading.Lock()  # the caches only: never held while creating or uploading
        self._session: boto3.session.Session | None = None
        self._session_lock = threading.Lock()  # boto3 sessions are not thread-safe
        self._trusted: dict[bytes, Any] = {}  # the operator's bucket(s)
        self._jobs: OrderedDict[bytes, Any] = OrderedDict()  # key -> client, LRU
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # succeeded once

    @property
    def cached_job_clients(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _key(self, bucket: Bucket) -> bytes:
        fields = (bucket.endpoint_url, bucket.access_key_id, bucket.secret_access_key,
                  bucket.bucket_name, bucket.region or "", str(bucket.path_style),
                  str(bucket.trusted))
        text = "\x00".join(fields).encode("utf-8", "surrogatepass")
        return hmac.new(self._hmac_key, text, hashlib.sha256).digest()

    def _create(self, bucket: Bucket) -> Any:
        config = Config(
            retries={"max_attempts": self._client_retries, "mode": "standard"},
            connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
            signature_version="s3v4",
            # boto3 >= 1.36 sends CRC32 checksums by default, which R2, GCS and other
            # S3-compatible stores reject; send and check them only where S3 requires.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if bucket.path_style else "auto"},
            # A job's client dials directly: a proxy would resolve the host itself, unchecked.
            proxies=None if bucket.trusted else {})
        with self._session_lock:
            if self._session is None:
                self._session = boto3.session.Session()
            return self._session.client(
                "s3", endpoint_url=bucket.endpoint_url, region_name=bucket.region,
                aws_access_key_id=bucket.access_key_id,
                aws_secret_access_key=bucket.secret_access_key, config=config)

    def client(self, bucket: Bucket) -> Any:
        """The S3 client for ``bucket``: its own (``prepare``), cached, or new.

        The operator's bucket keeps its client for the worker's life; a job's that was not
        prepared gets a client that is not kept.
        """
        if bucket.client is not None:
            return bucket.client
        key = self._key(bucket)
        with self._lock:
            cached = (self._trusted if bucket.trusted else self._jobs).get(key)
        if cached is not None:
            return cached
        client = self._create(bucket)
        _install(client, self._pools[bucket.trusted])
        if bucket.trusted:
            with self._lock:
                client = self._trusted.setdefault(key, client)
        return client

    def prepare(self, bucket: Bucket) -> Bucket:
        """A job's bucket, checked and with its client, before any GPU work; ``InputError``.

        Its host must resolve to allowed addresses only (the connections are checked again);
        the client comes from the LRU or is made now. The operator's bucket passes as it is.
        """
        if bucket.trusted:
            return bucket
        parts = urlsplit(bucket.endpoint_url)
        try:
            self._guard.addresses(parts.hostname or "",
                                  parts.port or (443 if parts.scheme == "https" else 80))
        except EndpointRefused as exc:
            log.warning("a job's s3Config was refused: its endpoint's host is or resolves to %s",
                        exc.reason)
            message = (f"s3Config.endpointUrl is refused: its host is or resolves to "
                       f"{exc.reason}; a job's bucket must be at a public address")
            raise InputError(message) from None
        except Exception as exc:  # noqa: BLE001 - the resolver's: an unknown host
            raise InputError(f"s3Config.endpointUrl: cannot resolve its host "
                             f"({brief_reason(exc)})") from None
        key = self._key(bucket)
        with self._lock:
            client = self._jobs.get(key)
            if client is not None:
                self._jobs.move_to_end(key)
        if client is None:
            try:
                client = self._create(bucket)
            except Exception as exc:  # noqa: BLE001 - whatever botocore refuses is the caller's
                raise InputError(f"s3Config.endpointUrl is refused by the S3 client "
                                 f"({type(exc).__name__})") from None
            _install(client, self._pools[False])  # outside the try: a failure here is a bug
        return replace(bucket, client=client)

    def release(self, bucket: Bucket, ok: bool) -> None:
        """A job is done with its prepared bucket: keep the client only for a configuration
        that has now succeeded twice; drop (and close) it for one that failed."""
        if bucket.trusted or bucket.client is None:
            return
        key, mine = self._key(bucket), bucket.client
        to_close = []
        with self._lock:
            cached = self._jobs.get(key)
            if not ok:
                self._seen.pop(key, None)
                self._jobs.pop(key, None)
                to_close = [c for c in (mine, cached) if c is not None]
            elif cached is not None:
                self._jobs.move_to_end(key)
                to_close = [mine] if mine is not cached else []
            elif key in self._seen and self._job_clients:
                self._jobs[key] = mine
                while len(self._jobs) > self._job_clients:
                    to_close.append(self._jobs.popitem(last=False)[1])
            else:
                self._seen[key] = None
                self._seen.move_to_end(key)
                while len(self._seen) > SEEN_CONFIGS:
                    self._seen.popitem(last=False)
                to_close = [mine]
        for client in {id(c): c for c in to_close}.values():
            client.close()  # its idle sockets; one still in use closes once it is returned

    def upload(self, bucket: Bucket, key: str, data: bytes, content_type: str,
               budget: Budget | None = None) -> str:
        """Put ``data`` at ``key`` and return a presigned GET URL; raises ``UploadError``."""
        client = self.client(bucket)
        name = bucket.bucket_name
        shown_name = logged_name(bucket)  # log lines carry no caller text
        deadline = budget.seconds if budget is not None else 0
        for attempt in range(1, self.attempts + 1):
            try:
                with budget.calling() if budget is not None else contextlib.nullcontext():
                    client.put_object(Bucket=name, Key=key, Body=data, ContentType=content_type)
                break
            except Exception as exc:  # noqa: BLE001 - classified below; all end as UploadError
                kind, code = _classify(exc)
                if budget is not None and budget.remaining() <= 0:
                    kind, code = "deadline", "deadline"  # whatever the cut socket raised
                if kind != "transient" or attempt == self.attempts:
                    log.warning("upload to bucket %s key %s failed: %s", shown_name, key, code)
                    # from None: a chained botocore error would carry the server's own text
                    # into tracebacks (AWS echoes the access key id in some error bodies).
                    message = MESSAGES[kind].format(code=code, bucket=name, attempts=attempt,
                                                    deadline=deadline)
                    raise UploadError(message, code) from None
                delay = min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s)
                log.warning("upload to bucket %s key %s failed (%s), attempt %d of %d; retrying "
                            "in %.1f s", shown_name, key, code, attempt, self.attempts, delay)
                if budget is None:
                    self._sleep(delay)
                elif budget.wait(delay):
                    log.warning("upload to bucket %s key %s: out of time", shown_name, key)
                    raise UploadError(MESSAGES["deadline"].format(bucket=name, deadline=deadline),
                                      "deadline") from None
        log.info("uploaded %d bytes to bucket %s key %s", len(data), shown_name, key)
        try:
            return client.generate_presigned_url(
                "get_object", Params={"Bucket": name, "Key": key}, ExpiresIn=self.expiry_s)
        except Exception as exc:  # noqa: BLE001 - signing is local: a bad key, say
            raise UploadError(MESSAGES["permanent"].format(bucket=name, code=type(exc).__name__),
                              type(exc).__name__) from None
