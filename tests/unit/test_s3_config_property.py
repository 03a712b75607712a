"""Property: any ``s3Config`` a job may carry gets a bucket or a short ``InputError`` from
``Delivery.bucket_for``, never another exception, and no log record at INFO or above quotes
the caller's secret, key id or endpoint.

Any JSON value (hypothesis's), and objects with the four keys drawn from hostile text: lone
surrogates, control characters, huge strings, bad host names, non-public addresses, huge ports.
DNS is in-process (``Dns``): names map to a public address, a private one, or nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.endpoints import PUBLIC_IP, Dns
from worker.errors import InputError
from worker.outputs import delivery, upload

MAX_MESSAGE = 300
DNS = Dns({"s3.example.com": [PUBLIC_IP], "store.example": [PUBLIC_IP],
           "a.b.c": [PUBLIC_IP, "10.0.0.1"], "inside.example": ["169.254.169.254"],
           "v6.example": ["2606:4700::1111"], "mapped.example": ["::ffff:127.0.0.1"]})
OUTBOX = delivery.Delivery(None, 10.0, uploader=upload.Uploader(
    guard=upload.EndpointGuard(resolver=DNS)))

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=10)
# Long strings built, not drawn (hypothesis draws a few KB at most).
HUGE = st.builds(lambda unit, n: (unit * n)[:n],
                 st.sampled_from(["a", "9", "\ud800", " ", "\x00", "🦊", "a."]),
                 st.integers(200, 200_000))
TEXT = st.one_of(st.text(max_size=30), st.text(st.characters(codec="utf-8"), max_size=30),
                 st.sampled_from(["\ud800", "a\udfffb", "\x00", " ", "\t", "\u202e", "é"]), HUGE)
HOSTS = st.one_of(st.sampled_from([
    "s3.example.com", "store.example", "a.b.c", "inside.example", "v6.example", "mapped.example",
    "nowhere.example", "127.0.0.1", "10.0.0.5", "169.254.169.254", "[::1]", "[fe80::1%25eth0]",
    "[::ffff:10.0.0.1]", "0.0.0.0", "localhost", "my_host.example", "-bad.example", "a" * 64,
    ("a" * 60 + ".") * 5 + "com", "\u0661\u0662.example", "\u212a.example", "[v1.x]", "[::1",
    "1.2.3.4.5", "h:0", "h:99999", "h:x", "user:pw@h", "", "%00"]),
    st.from_regex(r"[a-z0-9._\-\[\]:%]{1,80}", fullmatch=True), TEXT)
URLS = st.builds(lambda scheme, host, port, path: f"{scheme}{host}{port}{path}",
                 st.sampled_from(["http://", "https://", "ftp://", "", "HTTP://"]), HOSTS,
                 st.sampled_from(["", ":9000", ":0", ":65536", ":" + "9" * 500,
                                  ":" + "x" * 900, ":" + "x" * 2000]),
                 st.one_of(st.sampled_from(["", "/", "/renders", "/a/b", "/b?q=1", "#f",
                                            "/" + "b" * 300]), TEXT.map(lambda t: "/" + t)))
ENDPOINTS = st.one_of(URLS, URLS, URLS, TEXT, JSON)
SECRETS = st.one_of(st.just("s3cr3t-value"), TEXT.map(lambda t: "sekret-" + t), TEXT, JSON)
VALID = {"accessId": "AKIAPROPERTY0", "accessSecret": "s3cr3t-value", "bucketName": "renders",
         "endpointUrl": "https://s3.example.com/renders"}
ANY_FIELDS = st.fixed_dictionaries({}, optional={
    "accessId": st.one_of(st.just("AKIAPROPERTY0"), TEXT, JSON),
    "accessSecret": SECRETS,
    "bucketName": st.one_of(st.sampled_from(["renders", "ab", "a" * 223, "bad/name", "A_b.c"]),
                            TEXT, JSON),
    "endpointUrl": ENDPOINTS,
    "extra": JSON,
})
# Valid but for the endpoint, or but for one other field: deep into the checks.
BAD_ENDPOINT = ENDPOINTS.map(lambda url: {**VALID, "endpointUrl": url})
ONE_BAD_FIELD = st.builds(lambda key, value: {**VALID, key: value},
                          st.sampled_from(["accessId", "accessSecret", "bucketName"]),
                          st.one_of(TEXT, SECRETS, JSON))
S3_CONFIGS = st.one_of(JSON, ANY_FIELDS, BAD_ENDPOINT, BAD_ENDPOINT, ONE_BAD_FIELD)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def records() -> Iterator[_Records]:
    handler = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the worker's level
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def quoted(cfg: Any) -> list[str]:
    """The caller's texts that must not reach a log line: long enough to be recognisable."""
    if not isinstance(cfg, dict):
        return []
    texts = [cfg.get(key) for key in ("accessId", "accessSecret", "endpointUrl")]
    return [t.strip() for t in texts if isinstance(t, str) and len(t.strip()) >= 8]


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(cfg=S3_CONFIGS)
def test_any_s3_config_is_a_bucket_or_a_short_input_error(records: _Records, cfg: Any) -> None:
    records.messages.clear()
    try:
        bucket = OUTBOX.bucket_for(cfg)
    except InputError as exc:
        message = str(exc)
        assert message and len(message) < MAX_MESSAGE, (len(message), message[:400])
        secret = cfg.get("accessSecret") if isinstance(cfg, dict) else None
        if isinstance(secret, str) and len(secret.strip()) >= 4:
            assert secret.strip() not in message
    else:
        if cfg is None:
            assert bucket is None
        else:
            assert bucket is not None and bucket.client is not None and not bucket.trusted
    for message in records.messages:
        for text in quoted(cfg):
            assert text not in message, message[:300]


def test_the_strategies_reach_both_outcomes() -> None:
    """A property that only ever sees rejections would prove little."""
    good = {**VALID, "endpointUrl": "https://s3.example.com:9000/renders"}
    assert OUTBOX.bucket_for(good).bucket_name == "renders"
    for host in ("a.b.c", "inside.example", "mapped.example", "127.0.0.1"):
        with pytest.raises(InputError, match="is refused: its host is or resolves to"):
            OUTBOX.bucket_for({**good, "endpointUrl": f"https://{host}/renders"})
