"""Fetches a caller-supplied URL without letting the caller reach the worker's own network (SSRF).

Owns: the address policy (``blocked_reason``), resolving and dialling once (``Resolver``,
``Opener``), TLS, redirects, and the whole-download deadline and byte cap (``FetchLimits``).
Generic: it fetches bytes for any field of a job (``inputs/images`` today).

The host is resolved once; every address must be public unless ``allow_private`` (loopback,
RFC 1918, link-local incl. cloud metadata, CGNAT, multicast, reserved, IPv4 embedded in IPv6...);
the connection goes to a checked address (no second lookup: DNS rebinding) with the original
Host header, SNI and certificate check; redirects are followed by hand and re-checked. The body
must be an image (Content-Type image/*, binary or none). Errors (``FetchError``, an
``InputError``: the URL is the caller's) name the origin and logs the host, never a path or query
(they may hold tokens) nor the body.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urljoin, urlsplit

from worker.errors import MIB, InputError, brief_reason, shown, size_text

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_URL_CHARS = 8192
Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP addresses
Opener = Callable[[str, int, float], socket.socket]  # (IP address, port, timeout) -> connected

# getaddrinfo cannot be interrupted, so lookups run here and the fetch waits only until its
# deadline; a lookup stuck in a slow resolver keeps its thread until the system resolver gives
# up (resolv.conf: 5 s x 2 attempts by default). 8 threads: MAX_CONCURRENCY's ceiling of jobs,
# each with an image and a mask URL at most, rarely all resolving at once; beyond that lookups
# wait their turn, still within their own deadline.
_LOOKUPS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dns")
_REDIRECTS = {301, 302, 303, 307, 308}
_NOT_IN_HOST = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a host
_BINARY_TYPES = {"application/octet-stream", "binary/octet-stream"}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# Not global, yet ``is_global`` says so on some Python versions.
_SPECIAL = tuple(ipaddress.ip_network(net) for net in ("192.0.0.0/24", "64:ff9b:1::/48"))


class FetchError(InputError):
    """Why the URL could not be fetched: caller-facing, naming the origin, never the path."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 20 * MIB
    timeout_s: float = 10.0  # the whole fetch, redirects included, not per read
    max_redirects: int = 3
    allow_http: bool = False
    allow_private: bool = False
    accept: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp")  # the Accept header

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError(f"invalid {self}")


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host``, IPv4 and IPv6."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def tcp_connect(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


def blocked_reason(address: str) -> str | None:
    """Why ``address`` may not be fetched from, or None for a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            return blocked_reason(str(ip.ipv4_mapped))
        if ip.sixtofour is not None and (why := blocked_reason(str(ip.sixtofour))):
            return f"{why} (6to4)"
    for hit, why in ((ip.is_unspecified, "an unspecified address"),
                     (ip.is_loopback, "a loopback address"),
                     (ip.is_link_local, "a link-local address (cloud metadata lives there)"),
                     (ip.is_multicast, "a multicast address"),
                     (ip in _CGNAT, "a carrier-grade NAT address"),
                     (ip.is_private, "a private address"),
                     (getattr(ip, "is_site_local", False), "a site-local address"),
                     (ip.is_reserved, "a reserved address"),
                     (any(ip in net for net in _SPECIAL), "a special-purpose address"),
                     (not ip.is_global, "a non-public address")):
        if hit:
            return why
    return None


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA), no brackets
    port: int
    path: str  # path and query, as sent

    @property
    def origin(self) -> str:
        """scheme://host[:port]: what messages show (paths and queries may carry tokens)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def fetch(url: str, limits: FetchLimits, *, label: str = "url",  # label: for log lines
          resolver: Resolver = system_resolver, opener: Opener = tcp_connect,
          ssl_context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` under ``limits``, following redirects by hand; the body of the final 200."""
    deadline = time.monotonic() + limits.timeout_s
    for hop in range(limits.max_redirects + 1):
        target = _parse_url(url, limits)
        addresses = _resolve(target, label, limits, resolver, deadline)
        log.info("%s: fetching%s", label, f" (redirect {hop})" if hop else "")
        log.debug("%s: from %s", label, target.host)  # the caller's text: DEBUG only
        tls = (ssl_context or _default_tls()) if target.scheme == "https" else None
        result = _get(target, addresses, limits, opener, tls, deadline)
        if isinstance(result, bytes):
            log.info("%s: %d bytes fetched", label, len(result))
            return result
        try:
            url = urljoin(url, result)
        except ValueError as exc:  # e.g. Location: http://[::1 (an unclosed IPv6 literal)
            raise FetchError(f"{target.origin} redirected to an invalid URL "
                             f"({brief_reason(exc)})") from None
    raise FetchError(f"too many redirects (more than {limits.max_redirects})")


@lru_cache(maxsize=1)
def _default_tls() -> ssl.SSLContext:
    return ssl.create_default_context()  # system CAs, hostname check on


def _parse_url(url: str, limits: FetchLimits) -> _Target:
    if len(url) > MAX_URL_CHARS:
        raise FetchError(f"the URL is {len(url)} characters; the limit is {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise FetchError(f"not a valid URL ({brief_reason(exc)})") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and limits.allow_http):
        raise FetchError(f"URL must use https (got {scheme[:20]})")
    if not host:
        raise FetchError("the URL has no host")
    if _NOT_IN_HOST.search(host):  # http.client would raise InvalidURL when connecting
        raise FetchError("not a valid URL (the host has a space or a control character)")
    if parts.username is not None:
        raise FetchError("the URL must not carry credentials (user:password@)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def timed_out(origin: str, limits: FetchLimits) -> FetchError:
    return FetchError(f"fetching {origin} timed out (limit {limits.timeout_s:g} s for the whole "
                      f"download)")


def _lookup(target: _Target, limits: FetchLimits, resolver: Resolver,
            deadline: float) -> list[str]:
    """``resolver``'s answer, waited for only until ``deadline`` (DNS time counts in it)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise timed_out(target.origin, limits)
    lookup = _LOOKUPS.submit(resolver, target.host, target.port)
    try:
        return [str(a) for a in lookup.result(timeout=remaining)]
    except FutureTimeout:
        lookup.cancel()  # still queued behind stuck lookups: never starts
        raise timed_out(target.origin, limits) from None
    except (OSError, UnicodeError) as exc:
        raise FetchError(f"cannot resolve {target.host} ({brief_reason(exc)})") from None


def _resolve(target: _Target, label: str, limits: FetchLimits, resolver: Resolver,
             deadline: float) -> list[str]:
    """The host's addresses, each checked; the connection will use one of exactly these."""
    try:
        addresses = [str(ipaddress.ip_address(target.host))]
    except ValueError:
        addresses = _lookup(target, limits, resolver, deadline)
    if not addresses:
        raise FetchError(f"cannot resolve {target.host} (no addresses)")
    for address in addresses if not limits.allow_private else ():
        if why := blocked_reason(address):
            log.warning("%s: refused a URL whose host is %s", label, why)
            subject = address if address == target.host else \
                f"{target.host} resolves to {address}, which"
            raise FetchError(f"refusing to fetch {target.origin}: {subject} is {why}")
    return addresses


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to ``target.host`` over a socket to an address checked beforehand.

    http.client's own connect() resolves the host again, and a hostile DNS server can answer
    that second lookup with a private address (DNS rebinding). This connect() dials the checked
    addresses through ``opener``, while ``host`` still gives the Host header and, with TLS, the
    SNI name and the name the certificate must match (the context's check_hostname).
    """

    def __init__(self, target: _Target, addresses: list[str], opener: Opener,
                 tls: ssl.SSLContext | None, deadline: float) -> None:
        super().__init__(target.host, target.port, timeout=max(deadline - time.monotonic(), 0))
        self.default_port = 443 if tls else 80  # Host carries a port only when not the default
        self._addresses, self._opener, self._tls, self._deadline = addresses, opener, tls, deadline
        self.aborted = False
        self._socket: socket.socket | None = None  # kept: http.client drops self.sock early

    def connect(self) -> None:
        error: OSError = OSError("no address to connect to")
        for address in self._addresses:
            try:
                self.sock = self._opener(address, self.port, self._deadline - time.monotonic())
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        self._socket = self.sock
        if self._tls:
            self.sock = self._socket = self._tls.wrap_socket(
                self.sock, server_hostname=self.host, do_handshake_on_connect=False)
            self.sock.do_handshake()

    def abort(self) -> None:
        """At the deadline (from a timer thread): unblock whatever read is waiting."""
        self.aborted = True
        if (sock := self._socket) is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd, bypassing TLS


def _get(target: _Target, addresses: list[str], limits: FetchLimits, opener: Opener,
         tls: ssl.SSLContext | None, deadline: float) -> bytes | str:
    """One GET: the body (bytes) of a 200, or the Location (str) of a redirect."""
    timed_out_error = timed_out(target.origin, limits)
    if time.monotonic() >= deadline:
        raise timed_out_error
    connection = _PinnedConnection(target, addresses, opener, tls, deadline)
    # Socket timeouts bound each read; this bounds them all (a server dripping bytes).
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0), connection.abort)
    watchdog.daemon = True
    watchdog.start()
    response: http.client.HTTPResponse | None = None
    try:
        connection.request("GET", target.path, headers={
            "Accept": ", ".join([*limits.accept, "*/*;q=0.1"]), "Accept-Encoding": "identity",
            "User-Agent": "sdxl-lightning-worker", "Connection": "close"})
        response = connection.getresponse()
        if response.status in _REDIRECTS and (location := response.getheader("Location")):
            return location
        if response.status != 200:
            raise FetchError(f"{target.origin} returned HTTP {response.status} "
                             f"({shown(response.reason)})")
        kind = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if kind and not kind.startswith("image/") and kind not in _BINARY_TYPES:
            raise FetchError(f"{target.origin} sent Content-Type {shown(kind)}, not an "
                             f"image")
        return _read_body(response, target, limits, deadline, timed_out_error)
    except FetchError:
        if connection.aborted:  # e.g. "sent 10 of the 656 bytes": cut short by the watchdog
            raise timed_out_error from None
        raise
    except Exception as exc:  # noqa: BLE001 - any network failure is this job's error
        if connection.aborted or isinstance(exc, TimeoutError):
            raise timed_out_error from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise FetchError(f"TLS certificate check failed for {target.host} "
                             f"({shown(exc.verify_message, 80)})") from None
        raise FetchError(f"could not fetch {target.origin} ({brief_reason(exc)})") from None
    finally:
        watchdog.cancel()
        if response is not None:
            response.close()
        connection.close()


def _read_body(response: http.client.HTTPResponse, target: _Target, limits: FetchLimits,
               deadline: float, timeout_error: FetchError) -> bytes:
    announced = response.length  # Content-Length; None when chunked or absent
    if announced is not None and announced > limits.max_bytes:
        raise FetchError(f"{target.origin} announces {size_text(announced)}; the limit is "
                         f"{size_text(limits.max_bytes)}")
    chunks: list[bytes] = []
    total = 0
    # read1: whatever has arrived (so the deadline is checked often), never past Content-Length,
    # and never more than one byte past the cap.
    while chunk := response.read1(min(CHUNK, limits.max_bytes + 1 - total)):
        total += len(chunk)
        if total > limits.max_bytes:
            raise FetchError(f"the download from {target.origin} is over the "
                             f"{size_text(limits.max_bytes)} limit")
        if time.monotonic() >= deadline:
            raise timeout_error
        chunks.append(chunk)
    if announced is not None and total < announced:
        raise FetchError(f"{target.origin} sent {total} of the {announced} bytes it announced")
    return b"".join(chunks)
