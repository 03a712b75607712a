"""outputs/encoding: every format decodes, PNG is lossless, data URIs match the bytes, bad input
is named.

Small images keep this fast; timings live in bench/encode.py, never in assertions here.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from schemas import OUTPUT_FORMATS as FORMATS
from worker.formats import sniff
from worker.outputs import encoding
from worker.outputs.encoding import MAX_ENCODABLE_SIDE as MAX_SIDE
from worker.outputs.encoding import MIME_TYPES

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
HEIGHT, WIDTH = 64, 96  # not square, so a transposed result shows


def generated(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """A small generated-looking RGB image: gradients, a colour blob and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    img = np.stack([0.2 + 0.6 * x, 0.2 + 0.6 * y, 0.5 + 0.3 * np.sin(6 * x + 3 * y)], axis=-1)
    img += np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02)[..., None] * (0.3, -0.2, 0.1)
    img += rng.normal(0, 0.01, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


CONTENT = {
    "generated": generated(),
    "noise": np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8),
    "flat": np.full((HEIGHT, WIDTH, 3), (200, 120, 40), dtype=np.uint8),
    "1x1": np.array([[[1, 2, 3]]], dtype=np.uint8),
    "odd 17x33": generated(17, 33),
}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data))


class TestRoundTrip:
    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("source", ["pil", "numpy"])
    def test_every_format_decodes_at_the_size_in_rgb(self, fmt: str, source: str) -> None:
        array = generated()
        image = Image.fromarray(array) if source == "pil" else array
        decoded = decode(encoding.encode(image, fmt))
        assert decoded.format == PIL_FORMATS[fmt]
        assert decoded.size == (WIDTH, HEIGHT)
        assert decoded.mode == "RGB"

    @pytest.mark.parametrize("fmt", ["jpeg", "webp"])
    def test_lossy_formats_stay_close_to_the_source(self, fmt: str) -> None:
        # Catches swapped channels or a shifted layout, which would still decode at the right size.
        array = generated()
        error = np.abs(pixels(encoding.encode(array, fmt, 90)).astype(int) - array).mean()
        assert error < 4

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_the_input_is_not_modified(self, fmt: str) -> None:
        array = generated()
        image = Image.fromarray(array)
        encoding.encode(array, fmt)
        encoding.encode(image, fmt)
        assert np.array_equal(array, generated())
        assert np.array_equal(np.asarray(image), array)


class TestPngIsLossless:
    @pytest.mark.parametrize("name", CONTENT)
    def test_pil_input_is_bit_exact(self, name: str) -> None:
        array = CONTENT[name]
        assert np.array_equal(pixels(encoding.encode(Image.fromarray(array), "png")), array)

    @pytest.mark.parametrize("name", CONTENT)
    def test_numpy_input_is_bit_exact(self, name: str) -> None:
        array = CONTENT[name]
        assert np.array_equal(pixels(encoding.encode(array, "png")), array)

    def test_pil_and_numpy_input_give_the_same_file(self) -> None:
        array = generated()
        assert encoding.encode(array) == encoding.encode(Image.fromarray(array))

    def test_quality_does_not_change_a_png(self) -> None:
        array = generated()
        assert encoding.encode(array, "png", 1) == encoding.encode(array, "png", 100)


class TestDataUri:
    SIGNATURES = {
        "png": lambda data: data[:4] == b"\x89PNG",
        "jpeg": lambda data: data[:3] == b"\xff\xd8\xff",
        "webp": lambda data: data[:4] == b"RIFF" and data[8:12] == b"WEBP",
    }

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_mime_type_matches_the_magic_bytes(self, fmt: str) -> None:
        data = encoding.encode(generated(), fmt)
        assert self.SIGNATURES[fmt](data)
        uri = encoding.data_uri(data, fmt)
        header, payload = uri.split(",", 1)
        assert header == f"data:{MIME_TYPES[fmt]};base64"
        assert base64.b64decode(payload, validate=True) == data

    @pytest.mark.parametrize("fmt", FORMATS)
    def test_without_a_format_the_bytes_decide(self, fmt: str) -> None:
        data = encoding.encode(generated(), fmt)
        assert sniff(data) == PIL_FORMATS[fmt]
        assert encoding.data_uri(data) == encoding.data_uri(data, fmt)

    def test_bytes_labelled_with_another_format_are_rejected(self) -> None:
        jpeg = encoding.encode(generated(), "jpeg")
        with pytest.raises(ValueError, match="data is jpeg, not 'png'"):
            encoding.data_uri(jpeg, "png")

    @pytest.mark.parametrize("data", [b"", b"GIF89a....", b"RIFF\0\0\0\0WAVE"])
    def test_unknown_bytes_are_rejected(self, data: bytes) -> None:
        assert sniff(data) in (None, "GIF")
        with pytest.raises(ValueError, match="not PNG, JPEG or WebP data"):
            encoding.data_uri(data)

    def test_extensions_and_mime_types_cover_every_format(self) -> None:
        assert set(encoding.MIME_TYPES) == set(encoding.EXTENSIONS) == set(FORMATS)
        assert encoding.EXTENSIONS["jpeg"] == ".jpg"


class TestQuality:
    @pytest.mark.parametrize("fmt", ["jpeg", "webp"])
    def test_lower_quality_gives_smaller_files(self, fmt: str) -> None:
        array = generated(128, 128)
        sizes = [len(encoding.encode(array, fmt, q)) for q in (20, 95)]
        assert sizes[0] < sizes[1]

    def test_numpy_integers_are_accepted(self) -> None:
        array = generated()
        assert encoding.encode(array, "jpeg", np.int64(80)) == encoding.encode(array, "jpeg", 80)

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("quality", [0, 101, -5, True, False, 90.0, "90", None])
    def test_bad_quality_is_named(self, fmt: str, quality: object) -> None:
        # Checked for png too, where it is otherwise ignored: a bad value is a caller's bug.
        with pytest.raises(ValueError, match="quality") as info:
            encoding.encode(generated(), fmt, quality)  # type: ignore[arg-type]
        assert repr(quality) in str(info.value)


class TestFormat:
    @pytest.mark.parametrize("fmt", ["gif", "PNG", "jpg", "", None, "png "])
    def test_bad_format_is_named(self, fmt: object) -> None:
        with pytest.raises(ValueError, match="unsupported output format") as info:
            encoding.encode(generated(), fmt)  # type: ignore[arg-type]
        assert repr(fmt) in str(info.value)


class TestNumpyInput:
    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("view", ["reversed columns", "every other pixel", "bgr view",
                                      "fortran order"])
    def test_non_contiguous_arrays_are_encoded(self, fmt: str, view: str) -> None:
        base = generated(128, 192)
        array = {"reversed columns": base[:, ::-1], "every other pixel": base[::2, ::2],
                 "bgr view": base[..., ::-1], "fortran order": np.asfortranarray(base)}[view]
        assert not array.flags.c_contiguous
        decoded = pixels(encoding.encode(array, fmt))
        assert decoded.shape == array.shape
        if fmt == "png":
            assert np.array_equal(decoded, array)

    @pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, bool])
    def test_other_dtypes_are_rejected(self, dtype: type) -> None:
        # fpng would silently cast (floats in [0, 1] becoming black): refuse instead.
        with pytest.raises(ValueError, match="expected a uint8 array"):
            encoding.encode(generated().astype(dtype))

    @pytest.mark.parametrize("shape", [(HEIGHT, WIDTH), (HEIGHT, WIDTH, 4), (HEIGHT, WIDTH, 1),
                                       (1, HEIGHT, WIDTH, 3)])
    def test_other_shapes_are_rejected(self, shape: tuple[int, ...]) -> None:
        with pytest.raises(ValueError, match=r"shape \(height, width, 3\)"):
            encoding.encode(np.zeros(shape, np.uint8))

    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("shape", [(0, 8, 3), (8, 0, 3), (1, MAX_SIDE + 1, 3),
                                       (MAX_SIDE + 1, 1, 3)])
    def test_empty_or_oversized_images_are_rejected(self, fmt: str,
                                                    shape: tuple[int, ...]) -> None:
        # fpng returns b"" for empty images and corrupt files from 65536 px wide.
        with pytest.raises(ValueError, match="each side must be 1 to"):
            encoding.encode(np.zeros(shape, np.uint8), fmt)

    def test_the_largest_side_is_accepted(self) -> None:
        array = np.zeros((1, MAX_SIDE, 3), np.uint8)
        assert np.array_equal(pixels(encoding.encode(array)), array)

    @pytest.mark.parametrize("image", [[[[0, 0, 0]]], b"\x89PNG", None])
    def test_other_types_are_rejected(self, image: object) -> None:
        with pytest.raises(TypeError, match="expected a PIL image or a numpy array"):
            encoding.encode(image)  # type: ignore[arg-type]


class TestPilModes:
    @pytest.mark.parametrize("fmt", FORMATS)
    @pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1", "CMYK"])
    def test_eight_bit_modes_are_converted_to_rgb(self, fmt: str, mode: str) -> None:
        image = Image.fromarray(generated()).convert(mode)
        decoded = decode(encoding.encode(image, fmt))
        assert (decoded.mode, decoded.size) == ("RGB", (WIDTH, HEIGHT))
        if fmt == "png":
            assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))

    def test_alpha_is_dropped_not_composited(self) -> None:
        array = generated()
        rgba = Image.fromarray(np.dstack([array, np.zeros(array.shape[:2], np.uint8)]))
        assert np.array_equal(pixels(encoding.encode(rgba)), array)

    @pytest.mark.parametrize("mode", ["F", "I", "I;16"])
    def test_high_bit_depth_modes_are_rejected(self, mode: str) -> None:
        image = Image.new(mode, (WIDTH, HEIGHT))
        with pytest.raises(ValueError, match=f"mode '{mode}'"):
            encoding.encode(image)
