"""Encoding benchmark: ``encoding.encode`` against Pillow's default PNG and the other candidates.

Usage: ``python -m bench.encode [--rounds N]``, from the repository root (~30 s on 2 cores;
exits 0). ``encoding`` is ``worker/outputs/encoding.py``. Prints, for a 1024x1024
generated-looking RGB image: median ms of N interleaved rounds (order shuffled per round, so drift
on a shared machine hits every row alike), size in KiB, and the time ratio against Pillow's
default PNG (``image.save(buf, "PNG")``, level 6) measured in the same rounds. Every PNG row is
checked lossless against the source. Candidates whose package is missing are listed as skipped;
to time them too: ``pip install imagecodecs opencv-python-headless simplejpeg pybase64``.
Then: base64 cost, WebP by method on smoother content, the PNG path on other content (smoother,
pure noise, flat), and the payload of four images as base64 against RunPod's 10 MB ``/run`` limit.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import io
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
from PIL import Image

from schemas import OUTPUT_FORMATS
from worker.outputs import encoding

BASELINE = "Pillow PNG default (level 6)"
RUN_LIMIT = 10 * 1000 * 1000  # RunPod /run result limit, bytes


def make_image(kind: str = "generated", size: int = 1024, sigma: float = 0.03,
               seed: int = 0) -> np.ndarray:
    """A deterministic uint8 HxWx3 test image.

    ``generated``: smooth sinusoid gradients, 12 Gaussian colour blobs and Gaussian noise of
    ``sigma`` (0.03 is ~7.6 grey levels), like a diffusion output (offline-testing.md §4).
    ``noise``: uniform random bytes (incompressible). ``flat``: one colour.
    """
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if kind == "flat":
        return np.full((size, size, 3), (200, 120, 40), dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    for c in range(3):
        fx, fy, px, py = rng.uniform(0.5, 2.0, 4) * (1, 1, 2 * np.pi, 2 * np.pi)
        img[..., c] = 0.5 + 0.2 * np.sin(2 * np.pi * fx * x + px) * np.cos(2 * np.pi * fy * y + py)
    for _ in range(12):
        cx, cy = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.03, 0.2)
        colour = rng.uniform(-0.4, 0.4, 3).astype(np.float32)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))[..., None] * colour
    img += rng.normal(0, sigma, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def pillow(image: Image.Image, fmt: str, **options: object) -> Callable[[], bytes]:
    def run() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()
    return run


def optional(module: str) -> object | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def candidates(array: np.ndarray) -> tuple[dict[str, Callable[[], bytes]], list[str]]:
    """name -> encoder; and the names skipped because their package is missing."""
    image = Image.fromarray(array)
    rows: dict[str, Callable[[], bytes]] = {
        BASELINE: pillow(image, "PNG"),
        "encoding png (PIL in) = fpng": lambda: encoding.encode(image, "png"),
        "encoding png (numpy in) = fpng": lambda: encoding.encode(array, "png"),
        "Pillow PNG level 1": pillow(image, "PNG", compress_level=1),
        "Pillow PNG level 0 (stored)": pillow(image, "PNG", compress_level=0),
        "encoding jpeg q90 (Pillow, 4:2:0)": lambda: encoding.encode(image, "jpeg", 90),
        "Pillow JPEG q90 4:4:4": pillow(image, "JPEG", quality=90, subsampling=0),
        f"encoding webp q90 (method {encoding.WEBP_METHOD})": lambda: encoding.encode(image,
                                                                                     "webp", 90),
    }
    for method in range(7):
        if method != encoding.WEBP_METHOD:
            rows[f"Pillow WebP q90 method {method}"] = pillow(image, "WEBP", quality=90,
                                                              method=method)
    skipped = []
    bgr = np.ascontiguousarray(array[..., ::-1])
    if (ic := optional("imagecodecs")) is not None:
        rows["imagecodecs PNG level 1 RLE SUB"] = lambda: bytes(ic.png_encode(
            array, level=1, strategy=ic.PNG.STRATEGY.RLE, filter=ic.PNG.FILTER.SUB))
    else:
        skipped.append("imagecodecs")
    if (cv2 := optional("cv2")) is not None:
        rows["OpenCV PNG level 1 RLE"] = lambda: cv2.imencode(".png", bgr, [
            cv2.IMWRITE_PNG_COMPRESSION, 1,
            cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])[1].tobytes()
    else:
        skipped.append("opencv-python-headless")
    if (sj := optional("simplejpeg")) is not None:
        rows["simplejpeg q90 4:2:0"] = lambda: sj.encode_jpeg(array, 90, colorsubsampling="420")
    else:
        skipped.append("simplejpeg")
    return rows, skipped


def measure(rows: dict[str, Callable[[], bytes]], rounds: int) -> dict[str, float]:
    """Median seconds per row over interleaved rounds, in shuffled order."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def check_lossless(data: bytes, array: np.ndarray, name: str) -> None:
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if not np.array_equal(decoded, array):
        raise SystemExit(f"{name}: PNG does not decode to the source pixels")


def main_table(array: np.ndarray, rounds: int) -> float:
    """Print the main table; return the chosen PNG's ratio."""
    rows, skipped = candidates(array)
    outputs = {name: run() for name, run in rows.items()}  # warm-up, and the sizes
    for name, data in outputs.items():
        if data.startswith(b"\x89PNG"):
            check_lossless(data, array, name)
    medians = measure(rows, rounds)
    base = medians[BASELINE]
    print(f"{'encoder':40} {'ms':>7} {'KiB':>6} {'ratio':>6} {'PSNR dB':>8}")
    for name in sorted(rows, key=medians.get):
        print(f"{name:40} {medians[name] * 1e3:7.1f} {len(outputs[name]) / 1024:6.0f} "
              f"{medians[name] / base:6.3f} {psnr(outputs[name], array):>8}")
    if skipped:
        print(f"(skipped, not installed: {', '.join(skipped)})")
    return max(medians[name] / base for name in rows if name.startswith("encoding png"))


def psnr(data: bytes, array: np.ndarray) -> str:
    """PSNR of the decoded file against the source, "lossless" for an exact match."""
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
    mse = np.mean((decoded - array) ** 2)
    return "lossless" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f}"


def webp_table(rounds: int) -> None:
    """libwebp's method on smoother content, where the choice of method matters more."""
    array = make_image(sigma=0.01)
    image = Image.fromarray(array)
    rows = {m: pillow(image, "WEBP", quality=90, method=m) for m in range(7)}
    outputs = {m: run() for m, run in rows.items()}
    medians = measure(rows, rounds)
    print("\nWebP q90 by method, generated with noise sigma 0.01")
    for m in rows:
        print(f"method {m}{' (encoding default)' if m == encoding.WEBP_METHOD else '':32} "
              f"{medians[m] * 1e3:7.1f} {len(outputs[m]) / 1024:6.0f} {'':6} "
              f"{psnr(outputs[m], array):>8}")


def base64_table(array: np.ndarray, rounds: int) -> None:
    png, jpeg = encoding.encode(array, "png"), encoding.encode(array, "jpeg")
    rows: dict[str, Callable[[], object]] = {
        f"base64.b64encode, {len(png) >> 10} KiB PNG": lambda: base64.b64encode(png),
        f"encoding.data_uri, {len(png) >> 10} KiB PNG": lambda: encoding.data_uri(png),
        f"encoding.data_uri, {len(jpeg) >> 10} KiB JPEG": lambda: encoding.data_uri(jpeg),
    }
    if (pybase64 := optional("pybase64")) is not None:
        rows[f"pybase64.b64encode, {len(png) >> 10} KiB PNG"] = lambda: pybase64.b64encode(png)
    medians = measure(rows, rounds)
    print("\nbase64")
    for name, median in medians.items():
        print(f"{name:40} {median * 1e3:7.2f} ms")


def content_table(rounds: int) -> None:
    """The PNG choice on other content: time, size, lossless."""
    print(f"\nPNG on other content{'':20} {'default ms':>10} {'KiB':>6} {'fpng ms':>8} "
          f"{'KiB':>6} {'ratio':>6}")
    for label, array in (("generated, noise sigma 0.01", make_image(sigma=0.01)),
                         ("pure noise", make_image("noise")), ("flat colour", make_image("flat"))):
        image = Image.fromarray(array)
        rows = {"pillow": pillow(image, "PNG"), "fpng": lambda a=array: encoding.encode(a)}
        outputs = {name: run() for name, run in rows.items()}
        check_lossless(outputs["fpng"], array, label)
        medians = measure(rows, rounds)
        print(f"{label:40} {medians['pillow'] * 1e3:10.1f} {len(outputs['pillow']) >> 10:6} "
              f"{medians['fpng'] * 1e3:8.1f} {len(outputs['fpng']) >> 10:6} "
              f"{medians['fpng'] / medians['pillow']:6.3f}")


def payload_table() -> None:
    """Four images as base64 data URIs, as a /run response carries them."""
    print("\n4 images as data URIs (RunPod /run limit 10 MB)")
    for label, array in (("1024², noise sigma 0.03", make_image()),
                         ("1024², noise sigma 0.01", make_image(sigma=0.01)),
                         ("1536², noise sigma 0.01", make_image(size=1536, sigma=0.01))):
        default = pillow(Image.fromarray(array), "PNG")()
        total = 4 * len(encoding.data_uri(default))
        sizes = [f"png Pillow default {total / 1e6:5.1f} MB{' OVER' if total > RUN_LIMIT else ''}"]
        for fmt in OUTPUT_FORMATS:
            total = 4 * len(encoding.data_uri(encoding.encode(array, fmt, 90)))
            sizes.append(f"{fmt} {total / 1e6:5.1f} MB{' OVER' if total > RUN_LIMIT else ''}")
        print(f"{label:30} " + ", ".join(sizes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    print(f"{platform.python_implementation()} {platform.python_version()}, "
          f"Pillow {Image.__version__}, numpy {np.__version__}, fpng {version('fpng')}, "
          f"{platform.machine()}; 1024x1024 RGB, generated (noise sigma 0.03), "
          f"median of {args.rounds}\n")
    array = make_image()
    ratio = main_table(array, args.rounds)
    base64_table(array, max(args.rounds, 15))
    webp_table(args.rounds)
    content_table(args.rounds)
    payload_table()
    print(f"\ngoal: PNG ratio <= 0.1 -> {ratio:.3f}, {'met' if ratio <= 0.1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
