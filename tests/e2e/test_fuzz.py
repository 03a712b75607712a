"""Fuzzing: malformed and hostile jobs through runpod's own job runner never break the worker.

Every example runs ``rp_job.run_job(handler.handler, job)`` on the worker started by the
``handler`` fixture, which returns exactly the dict the
SDK posts to RunPod. The property: that dict is either ``{"output": <well-formed images>}`` or
``{"error": <one short string>}``; never a list or object error, never runpod's JSON-wrapped
traceback (a handler that raised), never an internal error (with or without ``stopPod``), and
always something the SDK can post (JSON text that encodes to UTF-8). After the fuzz, a real job
is served.

Speed and isolation (``fast_and_offline``): the engine's ``run_batch`` is replaced by a fake
that checks the plan's invariants and returns mid-grey images of the plan's size, so inputs that
pass validation cost milliseconds instead of a tiny-model generation; URL image inputs are
parsed and checked for real but resolve to a public address whose connection is refused (no
network); bucket uploads go to a stub that returns a URL. Everything else (validation, aliases,
image decoding and its limits, resolving, encoding, the runpod job runner) is the real code.
Jobs are JSON-shaped, as RunPod delivers them; ``\\ud800``-style escapes are valid JSON, so lone
surrogates appear in values and keys.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from runpod.serverless.modules import rp_job
from runpod.serverless.modules.rp_logger import RunPodLogger

import pipeline
import schemas
import worker.inputs.images
from tests.support.endpoints import PUBLIC_IP
from worker.outputs import upload

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


def examples(count: int) -> settings:
    return settings(FUZZ, max_examples=count)
SEED_LIMIT = 2**32
STUB_BUCKET_URL = "https://stub-bucket.invalid/"
DATA_URI = re.compile(r"data:image/(png|jpeg|webp);base64,([A-Za-z0-9+/=]+)")
# Every field of the API bad at once makes ~3,000 characters; the inputs here are far larger.
MAX_ERROR_CHARS = 8_000


# --- the fakes -------------------------------------------------------------------------------

def fake_run_batch(plans: Any, on_step: Any = None, steps: tuple[int, ...] = (4,)
                   ) -> list[list[Any]]:
    """Check what reaches the GPU, then answer instantly with grey images of the plan's size."""
    first = plans[0]
    for plan in plans:
        assert plan.shape_key == first.shape_key
        assert schemas.MIN_SIDE <= plan.width <= schemas.MAX_SIDE and plan.width % 8 == 0
        assert schemas.MIN_SIDE <= plan.height <= schemas.MAX_SIDE and plan.height % 8 == 0
        assert plan.prompt.strip() and len(plan.prompt) <= schemas.MAX_PROMPT_CHARS
        assert 1 <= len(plan.seeds) <= schemas.MAX_IMAGES
        assert all(0 <= seed < SEED_LIMIT for seed in plan.seeds)
        assert plan.steps in steps and plan.scheduler in pipeline.SCHEDULERS
        assert 0 <= plan.guidance_scale <= schemas.MAX_GUIDANCE
        if plan.mode == "txt2img":
            assert plan.init_image is None and plan.mask_image is None and plan.strength is None
        else:
            assert plan.init_image.mode == "RGB"
            assert plan.init_image.size == (plan.width, plan.height)
            assert 0 < plan.strength <= 1
        if plan.mode == "inpaint":
            assert plan.mask_image.mode == "L"
            assert plan.mask_image.size == (plan.width, plan.height)
    return [[Image.new("RGB", (p.width, p.height), (127, 127, 127)) for _ in p.seeds]
            for p in plans]


class StubUploader(upload.Uploader):
    """Checks a job's s3Config as the worker does (every name resolves to a public address,
    in-process) and accepts every upload at once; the URL names the object key."""

    def __init__(self) -> None:
        super().__init__(guard=upload.EndpointGuard(resolver=lambda host, port: [PUBLIC_IP]))

    def upload(self, bucket: upload.Bucket, key: str, data: bytes, content_type: str,
               budget: upload.Budget | None = None) -> str:
        assert data and content_type.startswith("image/")
        return f"{STUB_BUCKET_URL}{bucket.bucket_name}/{key}"


def refused(address: str, port: int, timeout: float) -> Any:
    raise ConnectionRefusedError(f"fuzz: no network ({address}:{port})")


@pytest.fixture(scope="class")
def fast_and_offline(handler: ModuleType) -> Iterator[None]:
    real_fetch = worker.inputs.images.fetch

    def offline_fetch(url: str, limits: Any, **kwargs: Any) -> bytes:
        return real_fetch(url, limits, label=kwargs.get("label", "url"),
                          resolver=lambda host, port: ["93.184.216.34"], opener=refused)

    with pytest.MonkeyPatch.context() as patch:
        # runpod's DEBUG level would print every output, base64 images included.
        patch.setattr(RunPodLogger(), "level", "ERROR")
        patch.setattr(handler.ENGINE, "run_batch", fake_run_batch)
        patch.setattr(worker.inputs.images, "fetch", offline_fetch)
        patch.setattr(handler.DELIVERY, "uploader", StubUploader())
        yield


# --- the property ----------------------------------------------------------------------------

RunJob = Callable[[dict[str, Any]], dict[str, Any]]


class _Loud(logging.Handler):
    """Every record at INFO and above, formatted with its traceback, as the worker logs it."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def run_job(handler: ModuleType) -> RunJob:
    """What the SDK posts to RunPod for ``job`` (module scope: hypothesis reuses it); fails the
    example if a log record at INFO or above carries the caller's text."""
    def run(job: dict[str, Any]) -> dict[str, Any]:
        loud = _Loud()
        logging.getLogger().addHandler(loud)
        try:
            result = asyncio.run(rp_job.run_job(handler.handler, job))
        finally:
            logging.getLogger().removeHandler(loud)
        leaks = [line for line in loud.lines if CALLER_MARK in line]
        assert not leaks, f"caller text in the log: {leaks[0][:300]}"
        return result
    return run


def check(job: dict[str, Any], result: Any) -> None:
    """What RunPod receives for ``job`` is one error string or well-formed images."""
    assert isinstance(result, dict), result
    # The SDK posts json.dumps(result, ensure_ascii=False) as UTF-8 text: a lone surrogate in
    # it makes that post raise, and the job's result is lost.
    json.dumps(result, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert "stopPod" not in result, f"internal error on caller input: {result}"
    if "error" in result:
        error = result["error"]
        assert set(result) == {"error"}, result
        assert isinstance(error, str) and error.strip(), result
        assert "Traceback" not in error and not error.lstrip().startswith("{"), error[:500]
        assert len(error) <= MAX_ERROR_CHARS, f"{len(error)}-char error: {error[:300]}"
        # Whatever the caller sent is a rejection with a reason, never a bug of the worker's.
        assert not error.startswith("internal error"), f"internal error on caller input: {error}"
        return
    assert set(result) == {"output"}, result
    check_output(job, result["output"])


def check_output(job: dict[str, Any], output: Any) -> None:
    assert isinstance(output, dict)
    assert {"images", "generation_time", "timings", "parameters"} <= set(output)
    assert set(output) <= {"images", "generation_time", "timings", "parameters", "warnings"}
    assert all(isinstance(w, str) for w in output.get("warnings", []))
    params, images = output["parameters"], output["images"]
    assert params["prompt"] == job["input"]["prompt"]
    count = params["num_images"]
    assert 1 <= count <= schemas.MAX_IMAGES and len(images) == count
    assert [item["seed"] for item in images] == [
        (params["seed"] + i) % SEED_LIMIT for i in range(count)]
    width, height, fmt = params["width"], params["height"], params["output_format"]
    assert schemas.MIN_SIDE <= width <= schemas.MAX_SIDE and width % 8 == 0
    assert schemas.MIN_SIDE <= height <= schemas.MAX_SIDE and height % 8 == 0
    for item in images:
        assert set(item) == {"image", "seed"}
        if job.get("s3Config") is not None:
            assert item["image"].startswith(STUB_BUCKET_URL), item["image"][:80]
            continue
        match = DATA_URI.fullmatch(item["image"])
        assert match and match.group(1) == fmt, item["image"][:80]
        decoded = Image.open(io.BytesIO(base64.b64decode(match.group(2), validate=True)))
        assert decoded.format == fmt.upper() and decoded.size == (width, height)


# --- strategies: values ----------------------------------------------------------------------

# JSON allows "\ud800" escapes, which Python's json reads as lone surrogates.
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "a\ud83e", "\udd8ab"])
HOSTILE_TEXT = st.sampled_from([
    "", " ", "\t\n ", "\x00", "a\x00b", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd",
    "\ufeff", "\ufffd", "🦊" * 40, "\U0001f469\u200d\U0001f467", "Ｐｒｏｍｐｔ",
    "Z\u0335\u0321\u031b", "\x1b[2J", "%s%n%x", "${jndi:x}", "{{7*7}}", "' OR 1=1 --",
    "<script>alert(1)</script>", "../../etc/passwd", "null", "None",
    "true", "[]", "{}", "a fox", "K_EULER", "png", "JPG", " webp ", "\u0130", "ß"])
NUMERIC_TEXT = st.sampled_from([
    "512", " 512 ", "512.0", "512.5", "1e3", "0x200", "0o10", "0b1", "-1", "+8", "1_024", "٥١٢",
    "５１２", "NaN", "nan", "inf", "-Infinity", "1e309", "4294967295", "4294967296", "-0", "0",
    "9" * 400, "512\x00", "4", "0.8", "20", "20.000001"])
# Caller text carrying this mark appears in every strategy below; no log record at INFO or above
# may contain it, whatever path the job takes (the run_job fixture checks every example).
CALLER_MARK = "qz-caller-7f3"
MARKED = st.builds(lambda a, b: f"{a}{CALLER_MARK}{b}", st.text(max_size=8), st.text(max_size=8))
TEXT = st.one_of(st.text(max_size=40), HOSTILE_TEXT, NUMERIC_TEXT, SURROGATES,
                 st.text(st.characters(codec="utf-8"), max_size=40), MARKED)
# Long strings built, not drawn (hypothesis draws at most a few KB): up to 50k characters,
# around the 10,000-character prompt limit too.
HUGE_TEXT = st.builds(lambda unit, n: (unit * n)[:n],
                      st.sampled_from(["a", "🦊", "\u202e", " ", "\x00", "ab ", "\ud800", "9"]),
                      st.one_of(st.integers(9_990, 10_010), st.integers(1, 50_000)))
INTS = st.one_of(
    st.integers(-2**70, 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 100, 511, 512, 513, 516, 1536, 1537, 1540,
                     2**31 - 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63, -2**63, 10**100, -1]))
FLOATS = st.one_of(
    st.floats(), st.floats(0, 25),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1e308, 0.25,
                     0.2499, 0.5, 1.0, 1.0000001, 20.0, 20.000001, 512.0, 512.5, 4.0]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)


def nest(levels: int, kind: str, leaf: Any) -> Any:
    """``leaf`` inside ``levels`` lists or objects (~1,000 levels was a RecursionError)."""
    for _ in range(levels):
        leaf = [leaf] if kind == "list" else {CALLER_MARK: leaf}
    return leaf


DEEP = st.builds(nest, st.one_of(st.integers(2, 12), st.integers(900, 3_000)),
                 st.sampled_from(["list", "dict"]), st.one_of(SCALARS, MARKED))
JUNK = st.one_of(st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12), DEEP)


# --- strategies: images ----------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, color: int, depth: int, idat: bytes) -> bytes:
    """A PNG whose IHDR declares any size (CRCs valid), with whatever pixel data follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def jpeg_header(width: int, height: int, components: int) -> bytes:
    """SOI + a baseline SOF0 declaring the size, then nothing decodable."""
    sof = struct.pack(">BHHB", 8, height, width, components) + b"".join(
        bytes([i + 1, 0x11, 0]) for i in range(components))
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def webp_header(width: int, height: int) -> bytes:
    """RIFF/WEBP with a VP8X chunk declaring a canvas of up to 2^24 a side, and no image."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + (
        height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _valid_images() -> list[bytes]:
    """Small real files in the modes and shapes that need normalising (cheap to decode)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    rotated = encoded(rgb, "JPEG", exif=_exif_orientation(6))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    grey16 = Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16))
    return [
        encoded(rgb, "PNG"), encoded(rgb, "JPEG"), encoded(rgb, "WEBP", lossless=True), rotated,
        encoded(rgb.convert("RGBA"), "PNG"), encoded(rgb.convert("LA"), "PNG"),
        encoded(rgb.convert("L"), "PNG"), encoded(rgb.convert("1"), "PNG"),
        encoded(palette, "PNG"), encoded(grey16, "PNG"), encoded(rgb.convert("CMYK"), "JPEG"),
        encoded(Image.new("RGBA", (1, 1)), "PNG"), encoded(Image.new("L", (8192, 1)), "PNG"),
        encoded(Image.new("RGB", (2, 4096), "white"), "PNG"),
        encoded(Image.new("RGB", (40, 30), "black"), "GIF"),
        encoded(Image.new("RGB", (40, 30), "black"), "BMP"),
        encoded(Image.new("RGB", (40, 30), "black"), "TIFF"),
    ]


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


VALID_IMAGES = _valid_images()
IMAGE_BYTES = st.one_of(
    st.sampled_from(VALID_IMAGES),
    st.builds(png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1),
              st.sampled_from([0, 2, 3, 4, 6, 1, 7]), st.sampled_from([1, 2, 4, 8, 16, 3]),
              st.binary(max_size=64)),
    st.builds(jpeg_header, st.integers(0, 65535), st.integers(0, 65535),
              st.sampled_from([1, 3, 4, 0, 2])),
    st.builds(webp_header, st.integers(1, 2**24), st.integers(1, 2**24)),
    st.builds(lambda data, cut: data[:cut], st.sampled_from(VALID_IMAGES), st.integers(0, 200)),
    st.binary(max_size=300),
    st.sampled_from([b"GIF89a", b"BM\0\0\0\0\0\0\0\0", b"\0\0\0\x18ftypheic", b"%PDF-1.7",
                     b"II*\0", b"RIFF\0\0\0\0WEBPVP8 ", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
)


def _wrap_whitespace(text: str) -> str:
    return "\n".join(text[i:i + 76] for i in range(0, len(text), 76))


IMAGE_VALUES = st.one_of(
    IMAGE_BYTES.map(lambda d: base64.b64encode(d).decode()),
    IMAGE_BYTES.map(lambda d: base64.urlsafe_b64encode(d).decode().rstrip("=")),
    IMAGE_BYTES.map(lambda d: _wrap_whitespace(base64.b64encode(d).decode())),
    st.builds(lambda head, d: head + base64.b64encode(d).decode(),
              st.sampled_from(["data:image/png;base64,", "data:image/jpeg;base64,",
                               "DATA:IMAGE/PNG;BASE64,", "data:text/plain;base64,",
                               "data:;base64,", "data:image/png,", "data:image/png;base64",
                               "data:image/png;charset=utf-8;base64,"]), IMAGE_BYTES),
    IMAGE_BYTES.filter(lambda d: len(d) <= 2000).map(list),
    st.lists(st.one_of(st.integers(-300, 300), FLOATS, st.booleans(), st.none(), TEXT),
             max_size=40),
    st.builds(lambda n, byte: [byte] * n, st.integers(0, 200_000), st.integers(-1, 256)),
    st.builds(lambda n: "A" * n, st.integers(0, 100_000)),
    st.sampled_from([
        "https://example.com/fox.png", "https://93.184.216.34/x.png", "https://127.0.0.1/x",
        "https://169.254.169.254/latest/meta-data/", "https://[::1]/x", "https://[::ffff:10.0.0.1]/",
        "https://localhost/x", "http://example.com/x.png", "file:///etc/passwd", "ftp://x/y",
        "gopher://x", "https://user:pw@example.com/x", "https://example.com:99999/x",
        "https://[::1", "https://", "https:///x", "https://" + "a" * 9000 + ".com/",
        "https://xn--/x", "https://\ud800.com/", "https://exa mple.com/", "a:b", "data:",
        "!!!!", "====", "A", "AB=", "A===", "\x00\x00", "🦊🦊🦊🦊"]),
    JUNK,
)


# --- strategies: inputs and jobs -------------------------------------------------------------

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(TEXT, HUGE_TEXT, JUNK),
    "negative_prompt": st.one_of(TEXT, HUGE_TEXT, JUNK),
    "width": st.one_of(INTS, FLOATS, NUMERIC_TEXT, JUNK),
    "height": st.one_of(INTS, FLOATS, NUMERIC_TEXT, JUNK),
    "num_inference_steps": st.one_of(INTS, FLOATS, NUMERIC_TEXT, JUNK),
    "guidance_scale": st.one_of(FLOATS, INTS, NUMERIC_TEXT, JUNK),
    "seed": st.one_of(INTS, FLOATS, NUMERIC_TEXT, JUNK),
    "num_images": st.one_of(INTS, FLOATS, NUMERIC_TEXT, JUNK),
    "image": IMAGE_VALUES,
    "mask": IMAGE_VALUES,
    "strength": st.one_of(FLOATS, INTS, NUMERIC_TEXT, JUNK),
    "scheduler": st.one_of(st.sampled_from(schemas.SCHEDULERS).map(str.lower), TEXT, JUNK),
    "output_format": st.one_of(st.sampled_from(["png", "jpeg", "jpg", "webp", "PNG", " Jpg ",
                                                "gif", "jpeg2000"]), TEXT, JUNK),
    "quality": st.one_of(INTS, FLOATS, NUMERIC_TEXT, JUNK),
    "disable_safety_checker": st.one_of(st.booleans(), TEXT, INTS, JUNK),
}
KEYS = st.one_of(st.sampled_from([*schemas.RULES, *schemas.ALIASES]), TEXT,
                 st.sampled_from(["Prompt", "PROMPT", "prompt ", "num_step", "negative-prompt",
                                  "__proto__", "constructor", "input", "id", "s3Config"]))
# The values a valid job starts from in near_valid(): each passes alone.
VALID = {"prompt": "a red fox", "width": 512, "height": 512, "seed": 7, "num_images": 1}


@st.composite
def wild_inputs(draw: st.DrawFn) -> Any:
    """Anything at all: any JSON value; objects with any subset of fields, junk or aliased."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JUNK)
    chosen = draw(st.dictionaries(KEYS, JUNK, max_size=3))
    for name in draw(st.sets(st.sampled_from(list(FIELD_VALUES)), max_size=6)):
        chosen[name] = draw(FIELD_VALUES[name])
    return chosen


@st.composite
def near_valid_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid job with one to three fields replaced, added, aliased or dropped: reaches deep."""
    job_input: dict[str, Any] = dict(VALID)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "set", "set", "alias", "drop", "unknown"]))
        name = draw(st.sampled_from(list(FIELD_VALUES)))
        if action == "set":
            job_input[name] = draw(FIELD_VALUES[name])
        elif action == "alias":
            alias = draw(st.sampled_from(list(schemas.ALIASES)))
            target = schemas.ALIASES[alias]
            job_input[alias] = draw(st.one_of(FIELD_VALUES[target], st.just(
                job_input.get(target, 4))))
        elif action == "drop":
            job_input.pop(name, None)
        else:
            job_input[draw(KEYS)] = draw(JUNK)
    return job_input


S3_CONFIGS = st.one_of(
    JUNK,
    st.fixed_dictionaries({}, optional={
        "accessId": st.one_of(st.just("key-id"), TEXT, JUNK),
        "accessSecret": st.one_of(st.just("secret"), TEXT, JUNK),
        "bucketName": st.one_of(st.sampled_from(["fuzz-bucket", "a", "ab", "A_b.c", "x" * 300,
                                                 "bad/name", "bad name", ".dot"]), TEXT, JUNK),
        "endpointUrl": st.one_of(st.sampled_from([
            "https://s3.us-east-1.amazonaws.com", "https://b.s3.amazonaws.com",
            "http://127.0.0.1:9/fuzz-bucket", "http://h:99999/b", "http://[::1", "ftp://h/b",
            "http://user:pw@h/b", "http://h/b?q=1", "http://h/a/b", "https://", "h/b",
            "http://h#frag", "https://fuzz-bucket.nyc3.example.com"]), TEXT, JUNK),
    }),
)
JOB_IDS = st.one_of(st.just("fuzz"), st.text(max_size=60), HOSTILE_TEXT, SURROGATES)


def fuzz_job(job_input: Any, job_id: str = "fuzz", s3_config: Any = None) -> dict[str, Any]:
    job: dict[str, Any] = {"id": job_id, "input": job_input}
    if s3_config is not None:
        job["s3Config"] = s3_config
    return job


# --- the fuzz --------------------------------------------------------------------------------

@pytest.mark.usefixtures("fast_and_offline")
class TestFuzz:
    @pytest.mark.slow
    @examples(1500)
    @given(job_input=wild_inputs(), job_id=JOB_IDS)
    def test_wild_inputs(self, run_job: RunJob, job_input: Any, job_id: str) -> None:
        job = fuzz_job(job_input, job_id)
        check(job, run_job(job))

    @pytest.mark.slow
    @examples(1500)
    @given(job_input=near_valid_inputs())
    def test_near_valid_inputs(self, run_job: RunJob, job_input: dict[str, Any]) -> None:
        job = fuzz_job(job_input)
        check(job, run_job(job))

    @pytest.mark.slow
    @examples(800)
    @given(image=IMAGE_VALUES, mask=st.one_of(st.none(), IMAGE_VALUES),
           extra=st.fixed_dictionaries({}, optional={
               "width": FIELD_VALUES["width"], "strength": FIELD_VALUES["strength"]}))
    # Found by this test (see TestKnownHostileInputs): kept so every run tries it.
    @example(image=base64.b64encode(VALID_IMAGES[0]).decode(), mask=None,
             extra={"width": "9" * 400})
    @example(image="https://exa mple.com/", mask=None, extra={})  # was an internal InvalidURL
    def test_image_and_mask_inputs(
            self, run_job: RunJob, image: Any, mask: Any, extra: dict[str, Any]) -> None:
        job_input = {"prompt": "a fox", "seed": 3, "image": image, **extra}
        if mask is not None:
            job_input["mask"] = mask
        job = fuzz_job(job_input)
        check(job, run_job(job))

    @examples(400)
    @given(s3_config=S3_CONFIGS, job_input=st.one_of(st.just(VALID), near_valid_inputs()))
    def test_job_level_s3_config(self, run_job: RunJob, s3_config: Any, job_input: Any) -> None:
        job = fuzz_job(job_input, s3_config=s3_config)
        check(job, run_job(job))

    @examples(150)
    @given(key=st.one_of(TEXT, HUGE_TEXT), count=st.integers(1, 2000))
    def test_unknown_fields_give_a_short_postable_error(
            self, run_job: RunJob, key: str, count: int) -> None:
        """Unknown keys of any length or number: the error names them without echoing it all."""
        job_input = {"prompt": "a fox", key: 1, **{f"extra_{i}": i for i in range(count - 1)}}
        job = fuzz_job(job_input)
        result = run_job(job)
        check(job, result)
        assert count == 1 or "error" in result


@pytest.mark.usefixtures("fast_and_offline")
class TestKnownHostileInputs:
    """Fixed examples of what the fuzz covers or found, so a regression names its case."""

    @pytest.mark.parametrize(("data", "expected"), [
        (png_header(100_000, 100_000, 2, 8, b""), "image: 10000.0 MP is over the 16.8 MP limit"),
        (png_header(2**31 - 1, 1, 2, 8, b""), "image: 2147.5 MP is over the 16.8 MP limit"),
        (jpeg_header(65535, 65535, 3), "image: 4294.8 MP is over the 16.8 MP limit"),
        (webp_header(16384, 16384), "image: 268.4 MP is over the 16.8 MP limit"),
        (png_header(4000, 4000, 2, 8, b""), "image: not a decodable image (PNG: image file is "
                                            "truncated (0 bytes not processed))"),
    ])
    def test_bomb_headers_are_refused_from_the_header(
            self, run_job: RunJob, data: bytes, expected: str) -> None:
        result = run_job(fuzz_job({**VALID, "image": base64.b64encode(data).decode()}))
        assert result == {"error": expected}

    @pytest.mark.parametrize(("job_input", "expected"), [
        ({"prompt": "\ud800"}, "invalid input: prompt='\\ud800' is invalid"),
        ({**VALID, "negative_prompt": "x\udfff"}, "invalid input: negative_prompt='x\\udfff'"),
        ({**VALID, "\ud800": 1}, "invalid input: "),
        ({**VALID, "image": "\ud800"}, "image: not valid base64 (unexpected '\\ud800'"),
    ])
    def test_lone_surrogates_are_rejected_with_an_escaped_message(
            self, run_job: RunJob, job_input: dict[str, Any], expected: str) -> None:
        job = fuzz_job(job_input)
        result = run_job(job)
        check(job, result)  # postable: the surrogate is escaped, not echoed
        assert result["error"].startswith(expected), result

    def test_conflicting_aliases_name_both_fields(self, run_job: RunJob) -> None:
        result = run_job(fuzz_job({**VALID, "steps": 4, "num_inference_steps": 8}))
        assert result == {"error": "invalid input: steps and num_inference_steps name the same "
                                   "field (num_inference_steps) with different values: 4, 8"}

    @pytest.mark.parametrize("side", ["width", "height"])
    def test_a_huge_side_beside_an_init_image_is_not_a_crash(
            self, run_job: RunJob, side: str) -> None:
        """Found by the fuzz: resolve.sizes_from_image divides as floats, so a side over ~1e308
        raises OverflowError, which the handler does not catch (it catches ValueError): runpod
        returns its JSON traceback. Like any other too-large side it should be clamped."""
        job = fuzz_job({"prompt": "a fox", "image": base64.b64encode(VALID_IMAGES[0]).decode(),
                        side: 10**400})
        result = run_job(job)
        check(job, result)

    @pytest.mark.parametrize("job_input", [
        {"prompt": "a fox", "x" * 50_000: 1},
        {"prompt": "a fox", **{f"field_{i}": i for i in range(200)}},
    ], ids=["one 50k-character key", "200 unknown keys"])
    def test_unknown_fields_are_named_briefly(
            self, run_job: RunJob, job_input: dict[str, Any]) -> None:
        """Found by the fuzz: each unknown key is echoed whole, each with the full list of
        allowed fields, so the error grows without bound with the input (a 10 MB job of keys
        makes a ~20 MB error, over RunPod's result limit)."""
        job = fuzz_job(job_input)
        result = run_job(job)
        check(job, result)
        assert result["error"].startswith("invalid input: unknown field")

    @pytest.mark.parametrize("endpoint", ["http://[::1", "http://127.0.0.1:99999/bucket",
                                          "https://my_host.example.com/bucket"])
    def test_unparsable_s3_endpoint_is_refused_up_front_naming_the_setting(
            self, run_job: RunJob, handler: ModuleType, endpoint: str,
            monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad s3Config.endpointUrl is the caller's input: refuse it before the GPU runs."""
        def no_gpu(*args: Any, **kwargs: Any) -> Any:
            # An Exception, not pytest.fail (a BaseException would end the GPU thread).
            raise AssertionError("the GPU ran a job with a bad s3Config")

        monkeypatch.setattr(handler.ENGINE, "run_batch", no_gpu)
        result = run_job(fuzz_job(VALID, s3_config={
            "accessId": "id", "accessSecret": "secret", "bucketName": "bucket",
            "endpointUrl": endpoint}))
        assert str(result.get("error")).startswith("s3Config.endpointUrl"), result
        assert set(result) == {"error"}


def test_the_worker_serves_a_real_job_after_the_fuzz(run_job: RunJob, handler: ModuleType) -> None:
    """Runs after the fuzz (file order), on the real tiny-model pipeline."""
    job = fuzz_job({"prompt": "a fox after the storm", "width": 512, "height": 512, "seed": 11})
    result = run_job(job)
    check(job, result)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(
        result["output"]["images"][0]["image"].split(",", 1)[1]))))
    assert pixels.shape == (512, 512, 3) and pixels.std() > 0  # a generated image, not a fill
    assert handler.GPU.batches_run > 0


def test_the_crafted_headers_declare_what_they_claim() -> None:
    """A broken header builder would fuzz nothing: Pillow must read the declared sizes."""
    assert Image.open(io.BytesIO(png_header(7, 9, 2, 8, b""))).size == (7, 9)
    assert Image.open(io.BytesIO(jpeg_header(70, 90, 3))).size == (70, 90)
    with pytest.raises(Image.DecompressionBombError, match="268435456 pixels"):
        Image.open(io.BytesIO(webp_header(16384, 16384)))
    assert Image.open(io.BytesIO(VALID_IMAGES[0])).size == (32, 24)
