"""TEST-ONLY address policies for a job's bucket endpoint (``upload.EndpointGuard``).

The worker refuses job endpoints on loopback; the tests' S3 stand-ins live there. These guards
are passed explicitly to the ``Uploader`` a test builds; nothing here changes the worker's own.

- ``LOOPBACK_ALLOWED``: the worker's policy, except that 127.0.0.0/8 and ::1 pass.
- ``Dns(table)``: an in-process resolver for the names a test maps (anything else is an unknown
  host), recording each lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from worker.inputs.fetch import blocked_reason
from worker.outputs.upload import EndpointGuard

PUBLIC_IP = "93.184.216.34"  # a public unicast address; nothing in these tests dials it


def allow_loopback(address: str) -> str | None:
    return None if ipaddress.ip_address(address.split("%")[0]).is_loopback else \
        blocked_reason(address)


LOOPBACK_ALLOWED = EndpointGuard(blocked=allow_loopback)


class Dns:
    """Answers from ``table`` (host -> addresses); records each lookup as (host, port)."""

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = dict(table)
        self.lookups: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        if host not in self.table:
            raise OSError(f"[Errno -2] Name or service not known: {host[:40]}")
        return list(self.table[host])
