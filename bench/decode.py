"""Decode work benchmark: what decoding in the pool costs, and what the refused files would cost.

Usage: ``python -m bench.decode [--rounds 15]``, from the repository root (~1 min on 2 cores;
exits 0). Prints three markdown tables for bench/RESULTS.md, "Decode work":

1. ``inputs/pool`` overhead: a 1024² image (``bench.encode.make_image``, the generated kind) as
   Pillow's default PNG and a q90 JPEG, decoded to RGB by ``images.decode_flat`` in this thread
   and by a warm pool child (``DecodePool().job()``, the same function plus the request and the
   3 MiB of pixels over pipes), interleaved, median wall ms of ``--rounds``; and a cold start
   (a new pool's first decode: the child's interpreter, Pillow, numpy, then the decode).
2. The largest accepted image, 4096², decoded in this thread: CPU seconds, which set
   ``pool.CPU_S_PER_JOB``.
3. Work bombs (``tests/support/image_bombs``): each file's CPU seconds decoded by Pillow with
   nothing refusing it (``Image.open`` and ``load``, as before the structure checks), the CPU
   seconds of the file it was made from (the same pixels), and the seconds ``decode_flat``
   takes to refuse it; ratios to the normal decode. Single runs for the slow ones.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import struct
import sys
import time
import zlib
from collections.abc import Callable
from importlib.metadata import version

from PIL import Image, features

from bench.encode import make_image
from tests.support import image_bombs as bombs
from worker.errors import InputError
from worker.inputs.images import DEFAULT_LIMITS, decode_flat
from worker.inputs.pool import DecodePool


def cpu_s(work: Callable[[], object], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def pillow(data: bytes) -> Callable[[], object]:
    def decode() -> object:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    return decode


def refuse(data: bytes) -> Callable[[], object]:
    def check() -> object:
        try:
            decode_flat(data, "image", DEFAULT_LIMITS, "RGB", 255)
        except InputError as exc:
            return str(exc)
        raise AssertionError("not refused")
    return check


def overhead(rounds: int) -> None:
    generated = Image.fromarray(make_image("generated", 1024))
    files = {"PNG (Pillow default)": bombs.encode(generated, "PNG"),
             "JPEG q90": bombs.encode(generated, "JPEG", quality=90)}
    print("| 1024² RGB | KiB | in thread ms | pool child ms | overhead ms |")
    print("|---|---:|---:|---:|---:|")
    with DecodePool() as pool:
        pool.job()(files["JPEG q90"], "image", DEFAULT_LIMITS, "RGB", 255)  # start one child
        for name, data in files.items():
            here, there = [], []
            for _ in range(rounds):
                for times, decoder in ((here, decode_flat), (there, pool.job())):
                    start = time.perf_counter()
                    decoder(data, "image", DEFAULT_LIMITS, "RGB", 255)
                    times.append((time.perf_counter() - start) * 1000)
            a, b = statistics.median(here), statistics.median(there)
            print(f"| {name} | {len(data) // 1024} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    cold = []
    for _ in range(5):
        with DecodePool() as fresh:
            start = time.perf_counter()
            fresh.job()(files["JPEG q90"], "image", DEFAULT_LIMITS, "RGB", 255)
            cold.append((time.perf_counter() - start) * 1000)
    print(f"\nCold start (a new child's first JPEG q90 decode): median "
          f"{statistics.median(cold):.0f} ms of 5 (min {min(cold):.0f}, max {max(cold):.0f})\n")


def largest() -> None:
    image = Image.fromarray(make_image("generated", 4096))
    files = {"PNG (Pillow default)": bombs.encode(image, "PNG"),
             "JPEG q90 4:2:0": bombs.encode(image, "JPEG", quality=90),
             "JPEG q95 4:4:4 progressive": bombs.encode(image, "JPEG", quality=95, subsampling=0,
                                                        progressive=True),
             "WebP lossless (method 0)": bombs.encode(image, "WEBP", lossless=True, method=0),
             "WebP q90": bombs.encode(image, "WEBP", quality=90)}
    print("| 4096² (the largest accepted) | MiB | decode_flat CPU s |")
    print("|---|---:|---:|")
    for name, data in files.items():
        seconds = cpu_s(lambda data=data: decode_flat(data, "image", DEFAULT_LIMITS, "RGB", 255))
        print(f"| {name} | {len(data) / 2**20:.1f} | {seconds:.2f} |")
    print()


def zlib_overrun() -> bytes:
    """A 16x16 PNG whose IDAT inflates to 1 GiB: Pillow's decoder stops at the last row."""
    header = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + bombs.png_chunk(b"IHDR", header)
            + bombs.png_chunk(b"IDAT", zlib.compress(bytes(2**30), 9))
            + bombs.png_chunk(b"IEND", b""))


def work_bombs() -> None:
    generated = Image.fromarray(make_image("generated", 1024))
    png, jpeg = bombs.encode(generated, "PNG"), bombs.encode(generated, "JPEG", quality=90)
    gif = bombs.encode(generated.quantize(), "GIF")
    cases = [  # name, bomb, the file it was made from
        ("JPEG 1024², last scan repeated 1000x", bombs.repeated_scans(1024, 1024, 1000),
         bombs.repeated_scans(1024, 1024, 0)),
        ("JPEG 4096², last scan repeated 1000x", bombs.repeated_scans(4096, 4096, 1000),
         bombs.repeated_scans(4096, 4096, 0)),
        ("JPEG 1024² + 4 MiB of 0xFF header padding", bombs.jpeg_padding(jpeg, 4 * 2**20), jpeg),
        ("JPEG 1024² + 1M empty COM segments", bombs.jpeg_segments(jpeg, 2**20), jpeg),
        ("PNG 1024² + 1M empty ancillary chunks", bombs.png_chunks(png, 2**20), png),
        ("PNG 1024², pixel data in 1-byte IDATs", bombs.png_split_idat(png, 1), png),
        ("WebP 1024², 100k frames", bombs.webp_frames(100_000, (1024, 1024)),
         bombs.webp_frames(1, (1024, 1024))),
        ("GIF 1024² + 1M one-byte comment sub-blocks", bombs.gif_blocks(gif, 2**20), gif),
    ]
    print("| file | KiB | Pillow, unchecked, CPU s | same pixels, normal file, CPU s | refused in"
          " ms | bomb / normal | refusal / normal |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    limits_gif = DEFAULT_LIMITS.__class__(formats={"GIF"})
    for name, bomb, normal in cases:
        slow = cpu_s(pillow(bomb))
        base = cpu_s(pillow(normal), repeats=5)
        if name.startswith("GIF"):
            def check(bomb: bytes = bomb) -> object:
                try:
                    decode_flat(bomb, "image", limits_gif, "RGB", 255)
                except InputError as exc:
                    return exc
                raise AssertionError("not refused")
        else:
            check = refuse(bomb)
        refused = cpu_s(check, repeats=5)
        print(f"| {name} | {len(bomb) // 1024} | {slow:.3f} | {base:.4f} | {refused * 1000:.3f} "
              f"| {slow / base:.0f} | {refused / base:.3f} |")
    overrun = zlib_overrun()
    print(f"\nNot refused: a 16x16 PNG whose IDAT inflates to 1 GiB ({len(overrun) // 1024} KiB): "
          f"{cpu_s(pillow(overrun), repeats=3) * 1000:.2f} ms of CPU (the decoder stops at the "
          f"last row)\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"Pillow {version('pillow')} (libjpeg-turbo {features.version('libjpeg_turbo')}, zlib "
          f"{features.version('zlib')}, libwebp {features.version('webp')})\n")
    overhead(args.rounds)
    largest()
    work_bombs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
