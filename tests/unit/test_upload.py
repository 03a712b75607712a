"""Bucket upload: configuration parsing, object keys, and uploads to a real loopback S3.

The S3 is moto's server on 127.0.0.1 with IAM auth enforced (``tests/support/s3_server``), so bad
credentials are rejected by the server, not by a stub. Retries are tested through a loopback
proxy that answers 500/503 or drops the connection on demand. Every wait has a timeout.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from tests.support.endpoints import LOOPBACK_ALLOWED, PUBLIC_IP, Dns, allow_loopback
from tests.support.loopback import free_port
from tests.support.s3_server import ALLOW, READ_ONLY, TIMEOUT_S, FlakyProxy, MotoS3
from tests.support.silent_server import SilentServer
from worker.errors import InputError, JobError, StartupError
from worker.outputs import upload
from worker.outputs.upload import (
    Bucket,
    EndpointGuard,
    Uploader,
    UploadError,
    bucket_from_env,
    bucket_from_s3_config,
)
from worker.settings import BUCKET_ENV

BUCKET = "images"
SECRET_ENV = {"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000/my-bucket",
              "BUCKET_ACCESS_KEY_ID": "AKIAENVKEYID0000", "BUCKET_SECRET_ACCESS_KEY": "env-s3cr3t"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


# --- loopback servers, started once per module -------------------------------------------------

@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    server = MotoS3()
    try:
        server.client("s3").create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def keys(s3: MotoS3) -> dict[str, tuple[str, str]]:
    """IAM users made while auth is off; auth is enforced from here on."""
    users = {"writer": s3.create_user("writer", ALLOW),
             "reader": s3.create_user("reader", READ_ONLY)}
    s3.enforce_auth()
    return users


@pytest.fixture(scope="module")
def bucket(s3: MotoS3, keys: dict[str, tuple[str, str]]) -> Bucket:
    key_id, secret = keys["writer"]
    return bucket_from_env({"BUCKET_ENDPOINT_URL": f"{s3.endpoint}/{BUCKET}",
                            "BUCKET_ACCESS_KEY_ID": key_id, "BUCKET_SECRET_ACCESS_KEY": secret})


@pytest.fixture(scope="module")
def proxy(s3: MotoS3) -> Iterator[FlakyProxy]:
    server = FlakyProxy(s3.port)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def uploader() -> Uploader:
    return Uploader(backoff_s=0)


def fetch(s3: MotoS3, url: str) -> tuple[bytes, str]:
    with s3.auth_off(), urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return response.read(), response.headers["Content-Type"]


def with_endpoint(bucket: Bucket, endpoint: str, **changes: str) -> Bucket:
    return Bucket(**{**vars(bucket), "endpoint_url": endpoint, **changes})


def failure(uploader: Uploader, bucket: Bucket) -> UploadError:
    with pytest.raises(UploadError) as info:
        uploader.upload(bucket, upload.object_key("job", 0, ".png"), PNG, "image/png")
    assert isinstance(info.value, JobError)  # the handler answers it; the worker serves on
    return info.value


# --- configuration ------------------------------------------------------------------------------

class TestBucketFromEnv:
    def test_nothing_set_means_no_bucket(self) -> None:
        assert bucket_from_env({}) is None
        assert bucket_from_env({key: " " for key in BUCKET_ENV}) is None

    def test_path_style_url_names_the_bucket(self) -> None:
        bucket = bucket_from_env(SECRET_ENV)
        assert (bucket.endpoint_url, bucket.bucket_name) == ("http://127.0.0.1:9000", "my-bucket")
        assert bucket.path_style and bucket.region is None
        assert (bucket.access_key_id, bucket.secret_access_key) == ("AKIAENVKEYID0000",
                                                                    "env-s3cr3t")

    @pytest.mark.parametrize(("url", "endpoint", "region"), [
        ("https://my-bucket.s3.us-east-1.amazonaws.com", "https://s3.us-east-1.amazonaws.com",
         "us-east-1"),
        ("https://my.dotted.bucket.s3.eu-west-1.amazonaws.com/",
         "https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://my-bucket.s3.amazonaws.com", "https://s3.amazonaws.com", None),
        ("https://my-bucket.s3-us-west-2.amazonaws.com", "https://s3-us-west-2.amazonaws.com",
         "us-west-2"),
    ])
    def test_virtual_hosted_url_names_the_bucket(self, url: str, endpoint: str,
                                                 region: str | None) -> None:
        bucket = bucket_from_env({**SECRET_ENV, "BUCKET_ENDPOINT_URL": url})
        assert (bucket.endpoint_url, bucket.region, bucket.path_style) == (endpoint, region, False)
        assert bucket.bucket_name == urlsplit(url).hostname.split(".s3")[0]

    def test_bucket_name_with_a_bare_endpoint(self) -> None:
        env = {**SECRET_ENV, "BUCKET_ENDPOINT_URL": "https://acct.r2.cloudflarestorage.com",
               "BUCKET_NAME": "renders"}
        bucket = bucket_from_env(env)
        assert (bucket.endpoint_url, bucket.bucket_name) == ("https://acct.r2.cloudflarestorage.com",
                                                             "renders")

    def test_bucket_name_overrides_the_url(self, caplog: pytest.LogCaptureFixture) -> None:
        bucket = bucket_from_env({**SECRET_ENV, "BUCKET_NAME": "other"})
        assert (bucket.endpoint_url, bucket.bucket_name) == ("http://127.0.0.1:9000", "other")
        assert "using other" in caplog.text

    def test_bucket_name_strips_a_virtual_host_of_another_provider(self) -> None:
        env = {**SECRET_ENV, "BUCKET_ENDPOINT_URL": "https://renders.nyc3.digitaloceanspaces.com",
               "BUCKET_NAME": "renders"}
        assert bucket_from_env(env).endpoint_url == "https://nyc3.digitaloceanspaces.com"

    @pytest.mark.parametrize("present", [
        ("BUCKET_ENDPOINT_URL",), ("BUCKET_ACCESS_KEY_ID",), ("BUCKET_SECRET_ACCESS_KEY",),
        ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID"),
        ("BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"),
    ])
    def test_incomplete_names_what_is_missing_and_no_value(self, present: tuple[str, ...]) -> None:
        with pytest.raises(StartupError, match="half configured") as info:
            bucket_from_env({key: SECRET_ENV[key] for key in present})
        message = str(info.value)
        named = re.search(r"half configured: (.*?) (?:is|are) not set", message)[1]
        assert named.split(", ") == [key for key in BUCKET_ENV[:3] if key not in present]
        assert not any(value in message for value in SECRET_ENV.values())

    def test_bucket_name_alone_is_incomplete(self) -> None:
        with pytest.raises(StartupError, match="BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                                             "BUCKET_SECRET_ACCESS_KEY are not set"):
            bucket_from_env({"BUCKET_NAME": "renders"})

    def test_no_bucket_anywhere_asks_for_bucket_name(self) -> None:
        with pytest.raises(StartupError, match="set BUCKET_NAME"):
            bucket_from_env({**SECRET_ENV, "BUCKET_ENDPOINT_URL": "https://minio.example.com"})

    @pytest.mark.parametrize("url", [
        "ftp://host/bucket", "not a url", "https://user:pw@host/bucket", "http://host/b/extra",
        "http://host/bucket?x=1",
    ])
    def test_bad_urls_are_rejected_without_echoing_them(self, url: str) -> None:
        with pytest.raises(StartupError, match="BUCKET_ENDPOINT_URL") as info:
            bucket_from_env({**SECRET_ENV, "BUCKET_ENDPOINT_URL": url})
        assert url not in str(info.value) and "pw" not in str(info.value)

    def test_a_host_botocore_refuses_is_refused_at_start(self) -> None:
        with pytest.raises(StartupError, match="BUCKET_ENDPOINT_URL has a host name S3 clients"):
            bucket_from_env({**SECRET_ENV, "BUCKET_ENDPOINT_URL": "https://my_minio:9000/renders"})

    def test_invalid_bucket_name(self) -> None:
        with pytest.raises(StartupError, match="bucket name"):
            bucket_from_env({**SECRET_ENV, "BUCKET_NAME": "a b"})


class TestBucketFromS3Config:
    GOOD = {"accessId": "AKIAJOBKEY", "accessSecret": "job-s3cr3t", "bucketName": "renders",
            "endpointUrl": "https://renders.s3.us-east-2.amazonaws.com"}

    def test_good_config(self) -> None:
        bucket = bucket_from_s3_config(self.GOOD)
        assert bucket == Bucket("https://s3.us-east-2.amazonaws.com", "AKIAJOBKEY", "job-s3cr3t",
                                "renders", "us-east-2")

    def test_path_style_endpoint(self) -> None:
        bucket = bucket_from_s3_config({**self.GOOD, "endpointUrl": "http://127.0.0.1:9000"})
        assert (bucket.endpoint_url, bucket.bucket_name) == ("http://127.0.0.1:9000", "renders")

    def test_missing_keys_are_named(self) -> None:
        cfg = {"accessSecret": "job-s3cr3t", "bucketName": "", "endpointUrl": "http://h:1"}
        with pytest.raises(InputError, match="missing: accessId, bucketName") as info:
            bucket_from_s3_config(cfg)
        assert "job-s3cr3t" not in str(info.value)

    def test_wrong_types_are_named_without_values(self) -> None:
        cfg = {**self.GOOD, "accessSecret": 12345678, "endpointUrl": ["x"], "accessId": "  "}
        with pytest.raises(InputError) as info:
            bucket_from_s3_config(cfg)
        message = str(info.value)
        assert "not strings: accessSecret (int), endpointUrl (list)" in message
        assert "blank: accessId" in message and "12345678" not in message

    @pytest.mark.parametrize("host", ["my_host.example.com", "-bad.example.com",
                                      "bad-.example.com", "a" * 64 + ".example.com",
                                      ("a" * 60 + ".") * 5 + "com"])
    def test_a_host_botocore_would_refuse_at_upload_is_refused_up_front(self, host: str) -> None:
        # Else the client is made at the first upload, after the GPU ran: an internal error.
        with pytest.raises(InputError) as info:
            bucket_from_s3_config({**self.GOOD, "endpointUrl": f"https://{host}/renders"})
        assert str(info.value).startswith("s3Config.endpointUrl has a host name S3 clients")
        assert host not in str(info.value)

    @pytest.mark.parametrize("url", ["http://127.0.0.1:9000", "http://[::1]:9000/renders",
                                     "https://renders.s3.us-east-2.amazonaws.com",
                                     "http://minio:9000/renders"])
    def test_hosts_botocore_accepts_pass(self, url: str) -> None:
        assert bucket_from_s3_config({**self.GOOD, "endpointUrl": url}).bucket_name == "renders"
        Uploader().client(bucket_from_s3_config({**self.GOOD, "endpointUrl": url}))

    @pytest.mark.parametrize("cfg", [None, "s3://x", ["accessId"]])
    def test_not_an_object(self, cfg: object) -> None:
        with pytest.raises(InputError, match="s3Config must be an object"):
            bucket_from_s3_config(cfg)

    @pytest.mark.parametrize(("url", "start"), [
        ("http://h.example:" + "x" * 100_000, "s3Config.endpointUrl is 100017 characters; "
                                               "the limit is 1024"),
        ("http://h.example:" + "x" * 1000, "s3Config.endpointUrl is not a valid URL (Port "),
        ("http://h.example/" + "b" * 1000, "bucket name 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
    ])
    def test_a_huge_value_is_never_echoed(self, url: str, start: str) -> None:
        # Before, the whole port (urlsplit quotes it) or the whole URL path came back.
        with pytest.raises(InputError) as info:
            bucket_from_s3_config({**self.GOOD, "endpointUrl": url, "bucketName": "b" * 1000})
        assert str(info.value).startswith(start) and len(str(info.value)) < 300

    @pytest.mark.parametrize(("key", "value"), [
        ("accessSecret", "s3cr3t\ud800"), ("accessSecret", "two words"),
        ("accessId", "AKIA\u00e9"), ("accessId", "AKIA\x00"), ("accessSecret", "x" * 257),
        ("endpointUrl", "https://\u0661\u0662.example.com/renders"),  # Arabic-Indic digits
        ("endpointUrl", "https://\u212a.example.com/renders"),  # the Kelvin sign
    ])
    def test_keys_and_urls_that_fail_only_when_sent_are_refused_up_front(
            self, key: str, value: str) -> None:
        # Before, these passed: signing or the Host header then failed after the GPU had run.
        with pytest.raises(InputError, match=f"^s3Config.{key} ") as info:
            bucket_from_s3_config({**self.GOOD, key: value})
        assert value not in str(info.value) and "job-s3cr3t" not in str(info.value)

    def test_port_zero(self) -> None:
        with pytest.raises(InputError, match="port 0"):
            bucket_from_s3_config({**self.GOOD, "endpointUrl": "http://h.example:0/renders"})

    def test_the_urls_text_is_not_logged_at_info(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO)
        bucket = bucket_from_s3_config({**self.GOOD, "endpointUrl": "http://h.example/tok3n"})
        assert bucket.bucket_name == "renders"  # bucketName wins, as before: but quietly now
        assert "tok3n" not in caplog.text


class TestSecretsStayHidden:
    def test_repr_and_str_mask_both_keys(self) -> None:
        bucket = bucket_from_env(SECRET_ENV)
        for text in (repr(bucket), str(bucket), f"{bucket}", repr([bucket])):
            assert "env-s3cr3t" not in text and "AKIAENVKEYID0000" not in text
            assert "my-bucket" in text and "***" in text


class TestObjectKey:
    def test_shape_and_uniqueness(self) -> None:
        keys = {upload.object_key("sync-1234-abcd", 0, ".png") for _ in range(50)}
        assert len(keys) == 50
        assert all(re.fullmatch(r"sync-1234-abcd/0-[0-9a-f]{8}\.png", key) for key in keys)

    @pytest.mark.parametrize(("job_id", "prefix"), [
        ("../../etc/passwd", "etc_passwd/"), ("a b?c#d", "a_b_c_d/"), ("", "job/"), ("..", "job/"),
    ])
    def test_job_id_is_sanitised(self, job_id: str, prefix: str) -> None:
        key = upload.object_key(job_id, 2, "webp")
        assert key.startswith(prefix) and key.count("/") == 1 and key.endswith(".webp")

    @pytest.mark.parametrize("ext", [".p/ng", "", ".verylongextension", ". png"])
    def test_bad_extension(self, ext: str) -> None:
        with pytest.raises(ValueError, match="ext="):
            upload.object_key("job", 0, ext)


class TestClassify:
    @staticmethod
    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    @pytest.mark.parametrize(("code", "status", "kind"), [
        ("SlowDown", 503, "transient"), ("Throttling", 400, "transient"),
        ("RequestTimeout", 400, "transient"), ("", 502, "transient"),
        ("Whatever", 429, "transient"),
        ("InvalidAccessKeyId", 403, "credentials"), ("SignatureDoesNotMatch", 403, "credentials"),
        ("AccessDenied", 403, "denied"), ("NoSuchBucket", 404, "no-bucket"),
        ("InvalidArgument", 400, "permanent"),
    ])
    def test_client_errors(self, code: str, status: int, kind: str) -> None:
        assert upload._classify(self.client_error(code, status))[0] == kind

    def test_network_errors_are_transient(self) -> None:
        for exc in (EndpointConnectionError(endpoint_url="http://x"),
                    ReadTimeoutError(endpoint_url="http://x")):
            assert upload._classify(exc) == ("transient", type(exc).__name__)

    def test_bad_settings(self) -> None:
        for kwargs in ({"attempts": 0}, {"expiry_s": 604_801}, {"expiry_s": 0}):
            with pytest.raises(ValueError):
                Uploader(**kwargs)


# --- uploads against the loopback S3 ------------------------------------------------------------

class TestUpload:
    def test_url_serves_the_exact_bytes_and_type(self, s3: MotoS3, bucket: Bucket,
                                                 uploader: Uploader) -> None:
        key = upload.object_key("job-1", 0, ".png")
        url = uploader.upload(bucket, key, PNG, "image/png")
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == s3.endpoint
        assert parts.path == f"/{BUCKET}/{key}"
        query = parse_qs(parts.query)
        assert query["X-Amz-Expires"] == ["604800"] and query["X-Amz-Signature"]
        assert fetch(s3, url) == (PNG, "image/png")

    def test_each_call_gets_its_own_key_and_object(self, s3: MotoS3, bucket: Bucket,
                                                   uploader: Uploader) -> None:
        urls = [uploader.upload(bucket, upload.object_key("job-2", i % 2, ".jpg"), bytes([i]) * 9,
                                "image/jpeg") for i in range(4)]
        assert len({urlsplit(url).path for url in urls}) == 4
        assert [fetch(s3, url) for url in urls] == [(bytes([i]) * 9, "image/jpeg")
                                                     for i in range(4)]

    def test_expiry_is_configurable(self, bucket: Bucket) -> None:
        url = Uploader(expiry_s=3600).upload(bucket, "k/1.png", PNG, "image/png")
        assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["3600"]

    def test_one_client_per_bucket(self, bucket: Bucket, uploader: Uploader) -> None:
        other = with_endpoint(bucket, bucket.endpoint_url, bucket_name="other-bucket")
        assert uploader.client(bucket) is uploader.client(bucket)
        assert uploader.client(other) is not uploader.client(bucket)

    def test_unknown_key_id_is_a_clear_credentials_error(self, bucket: Bucket,
                                                          uploader: Uploader) -> None:
        bad = with_endpoint(bucket, bucket.endpoint_url, access_key_id="AKIANOSUCHKEY0000000")
        error = failure(uploader, bad)
        assert str(error) == ("bucket upload failed: the bucket rejected the credentials "
                              "(InvalidAccessKeyId)")
        assert error.code == "InvalidAccessKeyId"

    def test_wrong_secret_is_a_clear_credentials_error(self, bucket: Bucket,
                                                        uploader: Uploader) -> None:
        bad = with_endpoint(bucket, bucket.endpoint_url, secret_access_key="wrong-s3cr3t")
        error = failure(uploader, bad)
        assert "rejected the credentials (SignatureDoesNotMatch)" in str(error)
        assert "wrong-s3cr3t" not in str(error) and bucket.access_key_id not in str(error)

    def test_read_only_user_is_denied(self, bucket: Bucket, uploader: Uploader,
                                      keys: dict[str, tuple[str, str]]) -> None:
        key_id, secret = keys["reader"]
        reader = with_endpoint(bucket, bucket.endpoint_url, access_key_id=key_id,
                               secret_access_key=secret)
        error = failure(uploader, reader)
        assert str(error) == ("bucket upload failed: the credentials may not write to bucket "
                              f"'{BUCKET}' (AccessDenied)")
        assert secret not in str(error) and key_id not in str(error)

    def test_wrong_bucket_is_named(self, bucket: Bucket, uploader: Uploader) -> None:
        missing = with_endpoint(bucket, bucket.endpoint_url, bucket_name="no-such-bucket")
        assert str(failure(uploader, missing)) == ("bucket upload failed: bucket 'no-such-bucket' "
                                                   "does not exist at the endpoint (NoSuchBucket)")

    def test_logs_name_bucket_and_key_but_no_credential(self, bucket: Bucket, uploader: Uploader,
                                                         caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO)  # the worker's level, for every logger
        caplog.set_level(logging.DEBUG, logger="upload")
        url = uploader.upload(bucket, "job-3/0-aaaaaaaa.png", PNG, "image/png")
        bad = with_endpoint(bucket, bucket.endpoint_url, secret_access_key="wrong-s3cr3t")
        failure(uploader, bad)
        assert f"bucket {BUCKET} key job-3/0-aaaaaaaa.png" in caplog.text
        assert "SignatureDoesNotMatch" in caplog.text
        for secret in (bucket.access_key_id, bucket.secret_access_key, "wrong-s3cr3t",
                       parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]):
            assert secret not in caplog.text

    def test_secret_is_absent_even_from_botocore_debug_logs(
            self, bucket: Bucket, caplog: pytest.LogCaptureFixture) -> None:
        # The access key id does appear there (Authorization headers): hence INFO in production.
        caplog.set_level(logging.DEBUG)
        Uploader().upload(bucket, "job-4/0-bbbbbbbb.png", PNG, "image/png")
        assert "bbbbbbbb" in caplog.text and bucket.secret_access_key not in caplog.text


class TestRetries:
    """Through the flaky proxy; botocore's own retries off, so each failure reaches Uploader."""

    @pytest.fixture
    def flaky(self, bucket: Bucket, proxy: FlakyProxy) -> Bucket:
        return with_endpoint(bucket, proxy.endpoint)

    def test_transient_failures_are_retried_then_succeed(self, s3: MotoS3, flaky: Bucket,
                                                         proxy: FlakyProxy) -> None:
        proxy.fail("500", "drop", "503")
        delays: list[float] = []
        uploader = Uploader(attempts=4, client_retries=0, backoff_s=0.5, sleep=delays.append)
        url = uploader.upload(flaky, "job-5/0-cccccccc.png", PNG, "image/png")
        assert proxy.requests == {"PUT": 4}
        assert delays == [0.5, 1.0, 2.0]  # exponential, recorded rather than slept
        assert fetch(s3, url) == (PNG, "image/png")

    def test_persistent_failure_gives_up_after_n_attempts(self, flaky: Bucket,
                                                          proxy: FlakyProxy) -> None:
        proxy.fail(*["500"] * 10)
        error = failure(Uploader(attempts=3, client_retries=0, backoff_s=0), flaky)
        assert proxy.requests == {"PUT": 3}
        assert str(error) == (f"bucket upload to '{BUCKET}' failed after 3 attempt(s) "
                              f"(InternalError)")
        assert flaky.secret_access_key not in str(error)

    def test_botocore_retries_come_first(self, flaky: Bucket, proxy: FlakyProxy) -> None:
        proxy.fail("503", "503")
        Uploader(attempts=1, client_retries=2, backoff_s=0).upload(flaky, "k/2.png", PNG,
                                                                   "image/png")
        assert proxy.requests == {"PUT": 3}

    def test_credential_errors_are_not_retried(self, flaky: Bucket, proxy: FlakyProxy) -> None:
        proxy.fail()
        bad = with_endpoint(flaky, flaky.endpoint_url, secret_access_key="wrong-s3cr3t")
        failure(Uploader(backoff_s=0), bad)  # default botocore retries too
        assert proxy.requests == {"PUT": 1}

    def test_unreachable_endpoint(self, bucket: Bucket) -> None:
        closed = FlakyProxy(1)  # bind a free port, then close it: nothing listens there
        closed.close()
        gone = with_endpoint(bucket, closed.endpoint)
        error = failure(Uploader(attempts=2, client_retries=0, backoff_s=0,
                                 connect_timeout_s=2), gone)
        assert "failed after 2 attempt(s) (EndpointConnectionError)" in str(error)


# --- a job's endpoint: the address policy, pinned connections ---------------------------------

def job_bucket(endpoint: str, keys: tuple[str, str] = ("AKIAJOBKEY", "job-s3cr3t"),
               name: str = BUCKET) -> Bucket:
    return bucket_from_s3_config({"accessId": keys[0], "accessSecret": keys[1],
                                  "bucketName": name, "endpointUrl": endpoint})


REFUSED_AT_START = ("s3Config.endpointUrl is refused: its host is or resolves to a loopback "
                    "address; a job's bucket must be at a public address")
REFUSED_AT_CONNECT = (f"bucket upload to '{BUCKET}' refused: the endpoint's host resolves to a "
                      f"loopback address; a job's bucket must be at a public address")


class TestJobEndpoints:
    @pytest.mark.parametrize(("host", "why"), [
        ("127.0.0.1", "a loopback address"), ("[::1]", "a loopback address"),
        ("[::ffff:127.0.0.1]", "a loopback address"), ("10.1.2.3", "a private address"),
        ("169.254.169.254", "a link-local address (cloud metadata lives there)"),
        ("100.64.0.1", "a carrier-grade NAT address"), ("0.0.0.0", "an unspecified address"),
        ("[fd00::1]", "a private address"),
    ])
    def test_non_public_addresses_are_refused_before_anything_is_sent(self, host: str,
                                                                      why: str) -> None:
        with pytest.raises(InputError) as info:
            Uploader().prepare(job_bucket(f"http://{host}:9000/{BUCKET}"))
        assert str(info.value) == (f"s3Config.endpointUrl is refused: its host is or resolves "
                                   f"to {why}; a job's bucket must be at a public address")

    def test_a_name_resolving_to_loopback_is_refused(self) -> None:
        dns = Dns({"inside.example": [PUBLIC_IP, "127.0.0.1"]})  # every address is checked
        with pytest.raises(InputError) as info:
            Uploader(guard=EndpointGuard(resolver=dns)).prepare(
                job_bucket("http://inside.example:9000/images"))
        assert str(info.value) == REFUSED_AT_START

    def test_an_unknown_host_is_the_callers_error(self) -> None:
        guard = EndpointGuard(resolver=Dns({}))
        with pytest.raises(InputError, match="^s3Config.endpointUrl: cannot resolve its host"):
            Uploader(guard=guard).prepare(job_bucket("https://nowhere.example/images"))

    def test_open_and_closed_ports_get_the_same_answer_and_nothing_is_dialled(self) -> None:
        # Before, "EndpointConnectionError" (closed) against an HTTP error code (open) told a
        # caller which ports of the worker's network listen.
        with SilentServer() as listening:
            ports = (listening.port, free_port())
            at_start, at_connect = set(), set()
            for port in ports:
                with pytest.raises(InputError) as info:
                    Uploader().prepare(job_bucket(f"http://127.0.0.1:{port}/images"))
                at_start.add(str(info.value))
                # DNS rebinding: public when checked, loopback when dialled.
                rebinding = iter([[PUBLIC_IP]] + [["127.0.0.1"]] * 10)
                lookups: list[str] = []

                def rebind(host: str, port: int, answers=rebinding, seen=lookups) -> list[str]:
                    seen.append(host)
                    return next(answers)

                uploader = Uploader(guard=EndpointGuard(resolver=rebind), backoff_s=0)
                ready = uploader.prepare(job_bucket(f"http://rebind.example:{port}/images"))
                at_connect.add(str(failure(uploader, ready)))
                assert lookups == ["rebind.example"] * 2  # refused once: no retry re-dials
            assert listening.connections == 0
        assert at_start == {REFUSED_AT_START} and at_connect == {REFUSED_AT_CONNECT}

    def test_connections_go_to_the_checked_address(self, s3: MotoS3,
                                                   keys: dict[str, tuple[str, str]]) -> None:
        # "s3stand-in" is known only to this resolver: the upload reaching moto proves the
        # connection went to the address the guard checked, not through a lookup of its own.
        dns = Dns({"s3stand-in": ["127.0.0.1"]})
        uploader = Uploader(guard=EndpointGuard(resolver=dns, blocked=allow_loopback))
        ready = uploader.prepare(job_bucket(f"http://s3stand-in:{s3.port}/{BUCKET}",
                                            keys["writer"]))
        url = uploader.upload(ready, "job-p/0-dddddddd.png", PNG, "image/png")
        assert urlsplit(url).netloc == f"s3stand-in:{s3.port}"  # the Host the caller named
        assert fetch(s3, url.replace("s3stand-in", "127.0.0.1")) == (PNG, "image/png")
        assert dns.lookups == [("s3stand-in", s3.port)] * 2  # checked up front, then dialled

    def test_a_proxy_from_the_environment_is_not_used_for_a_jobs_endpoint(
            self, s3: MotoS3, keys: dict[str, tuple[str, str]],
            monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # nothing listens
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        uploader = Uploader(guard=LOOPBACK_ALLOWED, attempts=1, client_retries=0)
        ready = uploader.prepare(job_bucket(f"{s3.endpoint}/{BUCKET}", keys["writer"]))
        assert uploader.upload(ready, "job-q/0-eeeeeeee.png", PNG, "image/png")

    def test_the_operators_bucket_stays_trusted(self, bucket: Bucket, uploader: Uploader) -> None:
        assert bucket.trusted and uploader.prepare(bucket) is bucket  # loopback, yet allowed
        assert uploader.upload(bucket, "job-r/0-ffffffff.png", PNG, "image/png")


# --- the clients: bounded, keyed without the secret, made without blocking uploads -----------

class TestClientCache:
    @staticmethod
    def job(uploader: Uploader, i: int) -> Bucket:
        return uploader.prepare(job_bucket("https://store.example/images",
                                           (f"AKIAJOB{i:04d}", f"s3cr3t-{i:04d}")))

    @pytest.fixture
    def uploader(self) -> Uploader:
        dns = Dns({"store.example": [PUBLIC_IP]})
        return Uploader(guard=EndpointGuard(resolver=dns), job_clients=3)

    def test_many_configs_keep_a_bounded_number_of_clients(self, uploader: Uploader) -> None:
        # Before, every distinct s3Config kept a client (and a boto3 session) forever.
        for i in range(30):
            for _ in range(2):  # each succeeds twice: worth keeping, but only the last 3 are
                uploader.release(self.job(uploader, i), ok=True)
        assert uploader.cached_job_clients == 3
        kept = self.job(uploader, 29).client
        assert self.job(uploader, 29).client is kept and self.job(uploader, 0).client is not \
            self.job(uploader, 0).client

    def test_one_off_and_failed_configs_keep_nothing(self, uploader: Uploader) -> None:
        for i in range(10):
            uploader.release(self.job(uploader, i), ok=True)  # once each
        assert uploader.cached_job_clients == 0
        for _ in range(2):
            uploader.release(self.job(uploader, 99), ok=True)
        assert uploader.cached_job_clients == 1
        uploader.release(self.job(uploader, 99), ok=False)  # the same config fails: dropped
        assert uploader.cached_job_clients == 0

    def test_cache_keys_carry_no_secret(self, uploader: Uploader) -> None:
        for _ in range(2):
            uploader.release(self.job(uploader, 7), ok=True)
        keys = list(uploader._jobs) + list(uploader._seen)
        assert keys and all(isinstance(k, bytes) and len(k) == 32 for k in keys)
        assert not any(b"s3cr3t-0007" in k or b"AKIAJOB0007" in k for k in keys)

    def test_making_a_client_does_not_hold_up_other_uploads(
            self, bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
        # Before, one lock covered making a client (~0.1-0.4 s) and every upload's lookup.
        uploader = Uploader(backoff_s=0)
        uploader.client(bucket)
        making, release = threading.Event(), threading.Event()
        real_client = boto3.session.Session.client

        def slow_client(session: Any, *args: Any, **kwargs: Any) -> Any:
            making.set()
            release.wait(TIMEOUT_S)
            return real_client(session, *args, **kwargs)

        monkeypatch.setattr(boto3.session.Session, "client", slow_client)
        maker = threading.Thread(target=uploader.client,
                                 args=(with_endpoint(bucket, bucket.endpoint_url,
                                                     bucket_name="other-bucket"),))
        maker.start()
        uploaded = threading.Event()

        def upload_meanwhile() -> None:
            uploader.upload(bucket, "job-s/0-gggggggg.png", PNG, "image/png")
            uploaded.set()

        worker = threading.Thread(target=upload_meanwhile)
        try:
            assert making.wait(TIMEOUT_S)
            worker.start()
            assert uploaded.wait(TIMEOUT_S)
            assert not release.is_set() and maker.is_alive()  # still making the other client
        finally:
            release.set()
            maker.join(TIMEOUT_S)
            if worker.ident is not None:
                worker.join(TIMEOUT_S)


class TestBudget:
    def test_abort_cuts_the_sockets_in_use_and_spares_those_handed_back(self) -> None:
        budget = upload.Budget(TIMEOUT_S)
        in_use, in_use_peer = socket.socketpair()
        returned, returned_peer = socket.socketpair()
        try:
            with budget.calling():
                call = upload._CURRENT.call
                call.track(in_use)
                call.track(returned)
                call.untrack(returned)  # back in its pool: maybe another job's by now
                budget.abort()
                in_use_peer.settimeout(TIMEOUT_S)
                assert in_use_peer.recv(1) == b""  # cut
                returned.sendall(b"x")
                assert returned_peer.recv(1) == b"x"  # untouched
        finally:
            for sock in (in_use, in_use_peer, returned, returned_peer):
                sock.close()

    def test_after_the_deadline_nothing_starts(self) -> None:
        now = [0.0]
        budget = upload.Budget(5, clock=lambda: now[0])
        assert budget.remaining() == 5 and not budget.wait(0)
        assert budget.wait(5)  # a backoff as long as what is left: give up at once
        now[0] = 5.0
        with pytest.raises(upload.UploadAborted), budget.calling():
            pass
