"""Upload decoding over a corpus of real files, bad inputs, and model-input preparation.

Every file is written by PIL in memory (or is one of scikit-learn's shipped photos), then
decoded from its bytes; each case checks the decoded pixels mean what the source meant.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from wsviz import WsvizError
from wsviz.data.uploads import (
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    decode_image,
    load_upload,
    prepare_image,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
W, H = 48, 32  # the reference image is wider than tall, so a wrong rotation shows in its size


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves_rgb(left=RED, right=BLUE, size=(W, H)) -> Image.Image:
    """Left half one colour, right half another."""
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def halves_gray(left=40, right=200, size=(W, H), mode="L") -> Image.Image:
    img = Image.new(mode, size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def px(img: Image.Image, side: str) -> tuple[int, ...] | int:
    """A pixel well inside the left or right half (away from JPEG's edge ringing)."""
    x = img.width // 4 if side == "left" else 3 * img.width // 4
    return img.getpixel((x, img.height // 2))


def close(a, b, tol: int) -> bool:
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    return bool(np.all(np.abs(a.astype(int) - b.astype(int)) <= tol))


# ---------------------------------------------------------------------------------------
# the corpus: id -> (bytes, expected mode, expected size, left pixel, right pixel, tolerance)


def _png_rgba() -> bytes:
    img = halves_rgb().convert("RGBA")
    img.paste((0, 0, 0, 0), (W // 2, 0, W, H))  # right half fully transparent black
    return encode(img, "PNG")


def _png_palette_transparent() -> bytes:
    img = Image.new("P", (W, H), 0)
    img.putpalette([0, 0, 0] + list(RED) + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, W // 2, H))  # left: red; right: index 0, transparent black
    return encode(img, "PNG", transparency=0)


def _png_16bit() -> bytes:
    img = halves_gray(left=0, right=65535, mode="I;16")
    assert img.mode == "I;16"
    return encode(img, "PNG")


def _png_1bit() -> bytes:
    return encode(halves_gray(left=0, right=1, mode="1"), "PNG")


def _png_rgb_colour_key() -> bytes:
    return encode(halves_rgb(left=RED, right=(1, 2, 3)), "PNG", transparency=(1, 2, 3))


def _jpeg_cmyk() -> bytes:
    img = Image.new("CMYK", (W, H), (255, 255, 0, 0))  # cyan + magenta = blue
    img.paste((0, 255, 255, 0), (0, 0, W // 2, H))  # magenta + yellow = red
    return encode(img, "JPEG", quality=95)


def _animated(fmt: str, **kw) -> bytes:
    first, second = halves_rgb(), halves_rgb(left=(0, 255, 0), right=(0, 255, 0))
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, **kw)


def _webp_rgba() -> bytes:
    img = halves_rgb().convert("RGBA")
    img.paste((0, 0, 0, 0), (W // 2, 0, W, H))
    return encode(img, "WEBP", lossless=True)


def _gif_palette() -> bytes:
    return encode(halves_rgb().convert("P"), "GIF")


def _tiff_16bit_big_endian() -> bytes:
    arr = np.full((H, W), 65535, dtype=">u2")
    arr[:, : W // 2] = 128 * 257  # -> 128 exactly
    img = Image.frombytes("I;16B", (W, H), arr.tobytes())
    return encode(img, "TIFF")


def _tiff_float() -> bytes:
    arr = np.full((H, W), 1.0, dtype=np.float32)
    arr[:, : W // 2] = 0.25
    img = Image.fromarray(arr)
    assert img.mode == "F"
    return encode(img, "TIFF")


def _tiff_cmyk() -> bytes:
    img = Image.new("CMYK", (W, H), (255, 255, 0, 0))
    img.paste((0, 255, 255, 0), (0, 0, W // 2, H))
    return encode(img, "TIFF")


CORPUS: dict[str, Callable[[], tuple[bytes, str, tuple[int, int], object, object, int]]] = {
    "png-L": lambda: (encode(halves_gray(), "PNG"), "L", (W, H), 40, 200, 0),
    "png-RGB": lambda: (encode(halves_rgb(), "PNG"), "RGB", (W, H), RED, BLUE, 0),
    "png-RGBA-over-white": lambda: (_png_rgba(), "RGB", (W, H), RED, WHITE, 0),
    "png-P-transparency": lambda: (_png_palette_transparent(), "RGB", (W, H), RED, WHITE, 0),
    "png-RGB-colour-key": lambda: (_png_rgb_colour_key(), "RGB", (W, H), RED, WHITE, 0),
    "png-16bit-I;16": lambda: (_png_16bit(), "L", (W, H), 0, 255, 0),
    "png-1bit": lambda: (_png_1bit(), "L", (W, H), 0, 255, 0),
    "jpeg-RGB": lambda: (encode(halves_rgb(), "JPEG", quality=95), "RGB", (W, H), RED, BLUE, 12),
    "jpeg-L": lambda: (encode(halves_gray(), "JPEG", quality=95), "L", (W, H), 40, 200, 6),
    "jpeg-CMYK": lambda: (_jpeg_cmyk(), "RGB", (W, H), RED, BLUE, 12),
    "webp-RGB": lambda: (encode(halves_rgb(), "WEBP", lossless=True), "RGB", (W, H), RED, BLUE, 0),
    "webp-RGBA-over-white": lambda: (_webp_rgba(), "RGB", (W, H), RED, WHITE, 0),
    "webp-animated-first-frame": lambda: (_animated("WEBP", lossless=True), "RGB", (W, H), RED, BLUE, 0),
    "gif-palette": lambda: (_gif_palette(), "RGB", (W, H), RED, BLUE, 0),
    "gif-animated-first-frame": lambda: (_animated("GIF"), "RGB", (W, H), RED, BLUE, 0),
    "bmp-RGB": lambda: (encode(halves_rgb(), "BMP"), "RGB", (W, H), RED, BLUE, 0),
    "tiff-RGB": lambda: (encode(halves_rgb(), "TIFF"), "RGB", (W, H), RED, BLUE, 0),
    "tiff-16bit-I;16B": lambda: (_tiff_16bit_big_endian(), "L", (W, H), 128, 255, 0),
    "tiff-float-F": lambda: (_tiff_float(), "L", (W, H), 64, 255, 0),
    "tiff-CMYK": lambda: (_tiff_cmyk(), "RGB", (W, H), RED, BLUE, 0),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_decode_corpus(case):
    data, mode, size, left, right, tol = CORPUS[case]()
    img = decode_image(data, f"{case}.bin")
    assert img.mode == mode and img.size == size
    assert close(px(img, "left"), left, tol), (px(img, "left"), left)
    assert close(px(img, "right"), right, tol), (px(img, "right"), right)


def test_animated_files_really_have_two_frames():
    """Guard for the first-frame cases: the second frame (all green) must exist to be skipped."""
    for fmt, kw in (("GIF", {}), ("WEBP", {"lossless": True})):
        with Image.open(io.BytesIO(_animated(fmt, **kw))) as im:
            assert im.n_frames == 2


def test_16bit_scales_the_full_range_instead_of_clipping():
    """PIL's own convert('L') clips 16-bit values to 255; decode_image scales 0..65535 to 0..255."""
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).convert("L").getpixel((1, 0)) == 255  # the PIL pitfall
    out = np.asarray(decode_image(data))
    assert (out.ravel() == np.arange(256)).all()


def test_exif_rotated_jpeg_is_decoded_upright():
    original = halves_rgb()  # 48x32, red on the left
    # Orientation 6 says "rotate 90 degrees clockwise to display": store the pixels turned the other way.
    stored = original.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (H, W)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    img = decode_image(data, "phone.jpg")
    assert img.size == (W, H)
    assert close(px(img, "left"), RED, 12) and close(px(img, "right"), BLUE, 12)


def test_one_by_one_pixel_is_valid():
    img = decode_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), "dot.png")
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (10, 200, 30)
    t = prepare_image(img, 3, 8, invert=False)
    assert torch.allclose(t[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0, atol=1e-6)


def test_very_elongated_image():
    img = decode_image(encode(Image.new("L", (1000, 3), 255), "PNG"), "line.png")
    assert img.size == (1000, 3)
    t = prepare_image(img, 1, 28, invert=False)
    rows = t[0].amax(dim=1)
    assert t.shape == (1, 28, 28)
    assert rows[13] > 0.9 and rows.sum() == rows[13]  # one bright row in the middle, black elsewhere


SKLEARN_IMAGES = sorted((Path(__import__("sklearn").__file__).parent / "datasets" / "images").glob("*.jpg"))


@pytest.mark.parametrize("path", SKLEARN_IMAGES, ids=[p.name for p in SKLEARN_IMAGES])
def test_real_photos_from_sklearn(path):
    from sklearn.datasets import load_sample_images

    reference = dict(zip(load_sample_images().filenames, load_sample_images().images, strict=True))
    ref = next(arr for name, arr in reference.items() if Path(name).name == path.name)
    img = decode_image(path.read_bytes(), path.name)
    assert img.mode == "RGB" and img.size == (ref.shape[1], ref.shape[0])
    assert np.abs(np.asarray(img).astype(int) - ref.astype(int)).mean() < 1.0
    t = prepare_image(img, 3, 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    assert float(t.std()) > 0.05  # a photo, not a blank


def test_sklearn_photos_are_present():
    assert {p.name for p in SKLEARN_IMAGES} >= {"china.jpg", "flower.jpg"}


# ---------------------------------------------------------------------------------------
# bad inputs


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR is patched to claim another size, CRC fixed so PIL believes it."""
    png = bytearray(encode(Image.new("L", (8, 8), 255), "PNG"))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # CRC over type + data
    return bytes(png)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("digit.png", encode(Image.new("L", (8, 8)), "PNG"))
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)

BAD: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "zero-bytes": (lambda: b"", "empty.png", "is empty (0 bytes)"),
    "text-named-png": (lambda: b"hello, this is not a picture\n", "notes.png", "not an image PIL can read"),
    "html": (lambda: b"<!DOCTYPE html><html><body><img src='x.png'></body></html>", "x.png", "web page"),
    "zip": (_zip, "digits.png", "ZIP archive"),
    "truncated-png": (lambda: _half(encode(Image.fromarray(NOISE), "PNG")), "cut.png", "damaged or incomplete PNG"),
    "truncated-jpeg": (lambda: _half(encode(Image.fromarray(NOISE), "JPEG")), "cut.jpg", "damaged or incomplete JPEG"),
    "png-signature-then-garbage": (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "bad.png", "cannot be read"),
    # cut inside the header (40 bytes): PIL cannot even identify it, yet it is a PNG, not "not an image"
    "png-cut-in-its-header": (lambda: encode(Image.fromarray(NOISE), "PNG")[:40], "cut.png",
                              "starts like a PNG file but cannot be read: it is cut short or damaged (40 bytes)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_wsviz_error_with_advice(case):
    make, filename, phrase = BAD[case]
    with pytest.raises(WsvizError) as info:
        decode_image(make(), filename)
    msg = str(info.value)
    assert phrase in msg, msg
    assert f"'{filename}'" in msg, msg


def test_messages_without_a_filename_still_read_well():
    with pytest.raises(WsvizError, match=r"^The uploaded file is not an image .*Upload one of those\.$"):
        decode_image(b"plain text")


@pytest.mark.parametrize(
    ("width", "height", "max_pixels", "phrase"),
    [
        (40000, 40000, MAX_PIXELS, "40000x40000 = 1.6 billion pixels, more than the 40 million allowed"),  # PIL's error
        (10000, 10000, 200_000_000, "10000x10000 = 100 million pixels, more than the 89.5 million allowed"),  # PIL warns
        (8000, 6000, MAX_PIXELS, "8000x6000 = 48 million pixels, more than the 40 million allowed"),  # our check
    ],
    ids=["pil-bomb-error", "pil-bomb-warning", "over-max-pixels"],
)
def test_huge_header_is_refused_before_decoding(width, height, max_pixels, phrase, monkeypatch):
    data = png_with_header_size(width, height)
    if width * height < Image.MAX_IMAGE_PIXELS:  # PIL believes the patched header
        assert Image.open(io.BytesIO(data)).size == (width, height)
    decoded = []  # every pixel decode PIL is asked for
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    assert decode_image(encode(halves_rgb(), "PNG")).size == (W, H) and (W, H) in decoded  # the probe sees decodes
    decoded.clear()
    with pytest.raises(WsvizError) as info:
        decode_image(data, "bomb.png", max_pixels=max_pixels)
    assert decoded == []  # refused from the header alone: not one pixel decoded
    assert phrase in str(info.value) and "downscale it first" in str(info.value)


def test_file_over_the_byte_limit_is_refused_before_parsing():
    data = encode(halves_rgb(), "PNG")
    with pytest.raises(WsvizError, match=r"'big\.png' is .* more than the 100 bytes allowed; compress or downscale"):
        decode_image(data, "big.png", max_bytes=100)
    assert decode_image(data, "big.png", max_bytes=len(data)).size == (W, H)  # the limit is inclusive
    assert MAX_UPLOAD_BYTES == 20 * 1024 * 1024


def test_decoding_leaves_pil_and_warnings_state_alone():
    filters = list(warnings.filters)
    for data in (_half(encode(Image.fromarray(NOISE), "PNG")), png_with_header_size(10000, 10000)):
        with pytest.raises(WsvizError):
            decode_image(data, max_pixels=10**9)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert warnings.filters == filters


# ---------------------------------------------------------------------------------------
# prepare_image


def ink_on_paper(size=(56, 56)) -> Image.Image:
    """A thick black vertical stroke (a '1') on white paper."""
    img = Image.new("L", size, 255)
    img.paste(0, (size[0] // 2 - 4, 8, size[0] // 2 + 4, size[1] - 8))
    return img


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 1)])
def test_prepare_shape_dtype_range(channels, size):
    t = prepare_image(halves_rgb(), channels, size)
    assert t.shape == (channels, size, size) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_prepare_rgb_keeps_colours_and_repeats_gray():
    t = prepare_image(halves_rgb(size=(32, 32)), 3, 32, invert=False)
    assert torch.allclose(t[:, 16, 4], torch.tensor([1.0, 0.0, 0.0])) and torch.allclose(t[:, 16, 28], torch.tensor([0.0, 0.0, 1.0]))
    g = prepare_image(halves_gray(size=(32, 32)), 3, 32, invert=False)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert abs(float(g[0, 16, 4]) - 40 / 255) < 1e-6


def test_prepare_keeps_aspect_ratio_with_black_padding():
    wide = Image.new("L", (100, 20), 255)  # 5:1 -> 28 x 5.6, rounded to 6 rows
    t = prepare_image(wide, 1, 28, invert=False)[0]
    rows = t.mean(dim=1)
    bright = torch.nonzero(rows > 0.5).ravel().tolist()
    assert bright == list(range(11, 17))  # a centred band of 6 rows
    assert float(t[:11].max()) == 0.0 and float(t[17:].max()) == 0.0  # black above and below
    assert float(t[11:17].min()) > 0.99  # the band spans the full width

    tall = prepare_image(Image.new("RGB", (20, 100), WHITE), 3, 28)  # RGB: "auto" never inverts
    cols = tall[0].mean(dim=0)
    assert torch.nonzero(cols > 0.5).ravel().tolist() == list(range(11, 17))


def test_auto_inversion_makes_ink_on_paper_white_on_black():
    t = prepare_image(ink_on_paper(), 1, 28)[0]
    assert float(t[0].max()) == 0.0 and float(t[:, 0].max()) == 0.0  # paper -> black background
    assert float(t[14, 14]) > 0.9  # ink -> white stroke
    assert torch.equal(prepare_image(ink_on_paper(), 1, 28, invert=True), prepare_image(ink_on_paper(), 1, 28))

    plain = prepare_image(ink_on_paper(), 1, 28, invert=False)[0]
    assert float(plain[0, 0]) == 1.0 and float(plain[14, 14]) < 0.1


def test_auto_inversion_leaves_white_on_black_and_rgb_alone():
    mnist_like = Image.eval(ink_on_paper(), lambda v: 255 - v)
    t = prepare_image(mnist_like, 1, 28)[0]
    assert float(t[0, 0]) == 0.0 and float(t[14, 14]) > 0.9

    rgb = prepare_image(ink_on_paper().convert("RGB"), 3, 28)
    assert float(rgb[:, 0, 0].min()) == 1.0 and float(rgb[:, 14, 14].max()) < 0.1  # untouched
    inverted = prepare_image(ink_on_paper().convert("RGB"), 3, 28, invert=True)
    assert float(inverted[:, 0, 0].max()) == 0.0 and float(inverted[:, 14, 14].min()) > 0.9


def test_padding_stays_black_after_inversion():
    # a wide ink-on-paper image: the padding above and below must stay black, not turn white
    t = prepare_image(ink_on_paper(size=(112, 28)), 1, 28)[0]
    assert float(t[:7].max()) == 0.0 and float(t[-7:].max()) == 0.0


@pytest.mark.parametrize(
    ("channels", "size", "invert", "phrase"),
    [
        (2, 28, "auto", "channels must be 1"),
        (0, 28, "auto", "channels must be 1"),
        (True, 28, "auto", "channels must be 1"),
        (1, 0, "auto", "size must be"),
        (1, -3, "auto", "size must be"),
        (1, 2.5, "auto", "size must be"),
        (1, 28, "yes", "invert must be"),
    ],
)
def test_prepare_validates_arguments(channels, size, invert, phrase):
    with pytest.raises(WsvizError, match=phrase):
        prepare_image(Image.new("L", (4, 4)), channels, size, invert=invert)


def test_load_upload_end_to_end():
    data = encode(ink_on_paper().convert("RGBA"), "PNG")
    t = load_upload(data, "my_digit.png", 1, 28)
    assert t.shape == (1, 28, 28)
    assert float(t[0, 0, 0]) == 0.0 and float(t[0, 14, 14]) > 0.9
    deep = encode(Image.fromarray(np.asarray(ink_on_paper()).astype(np.uint16) * 257), "TIFF")  # 16-bit scan
    assert torch.allclose(load_upload(deep, "scan.tif", 1, 28), t, atol=1e-6)
    with pytest.raises(WsvizError, match="'my_digit.png' is empty"):
        load_upload(b"", "my_digit.png", 1, 28)


def test_corrupted_files_only_ever_raise_wsviz_error():
    """Seeded byte flips of every corpus file: each decode returns an L/RGB image or raises WsvizError."""
    rng = np.random.default_rng(1)
    seeds = [CORPUS[case]()[0] for case in CORPUS]
    outcomes = {"decoded": 0, "refused": 0}
    for data in seeds:
        for _ in range(15):
            buf = bytearray(data)
            for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 6))):
                buf[pos] = int(rng.integers(0, 256))
            try:
                img = decode_image(bytes(buf), "fuzz.bin")
            except WsvizError as exc:
                assert str(exc).startswith("The ")
                outcomes["refused"] += 1
            else:
                assert img.mode in ("L", "RGB") and img.width >= 1 and img.height >= 1
                outcomes["decoded"] += 1
    assert outcomes["decoded"] > 0 and outcomes["refused"] > 0


# ---------------------------------------------------------------------------------------
# the whole corpus, as the app-level test (tests/test_security.py) pushes it through the Compare page


def upload_corpus() -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file the app-level upload test sends: the decodable corpus,
    the bad inputs, three decompression bombs, scikit-learn's photos and a seeded byte-flipped
    copy of each corpus file."""
    ext = {"jpeg": "jpg", "tiff": "tif"}
    files = [(f"{case}.{ext.get(case.split('-')[0], case.split('-')[0])}", make()[0]) for case, make in CORPUS.items()]
    files += [(f"bad-{case}-{filename}", make()) for case, (make, filename, _) in BAD.items()]
    files += [(f"bomb-{w}x{h}.png", png_with_header_size(w, h)) for w, h in ((40000, 40000), (10000, 10000), (8000, 6000))]
    files += [(p.name, p.read_bytes()) for p in SKLEARN_IMAGES]
    rng = np.random.default_rng(7)
    for i, (_, data) in enumerate(list(files[: len(CORPUS)])):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), size=4):
            buf[pos] = int(rng.integers(0, 256))
        files.append((f"fuzz-{i}.png", bytes(buf)))
    return files


def test_readme_states_the_size_of_the_upload_corpus():
    """The README's figure is the number of files the app-level test really sends."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = [int(n) for n in re.findall(r"A corpus of\s+(\d+)\s+files", readme)]
    assert stated == [len(upload_corpus())], f"README states {stated}; the test sends {len(upload_corpus())} files"


# ---------------------------------------------------------------------------------------
# every rule and message of decode_image / prepare_image on its own (written against the
# survivors of mutation testing: benchmarks/mutation/SURVIVORS.md, section uploads)

FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF"


def refusal(data, filename=None, **kw) -> str:
    with pytest.raises(WsvizError) as info:
        decode_image(data, filename, **kw)
    return str(info.value)


def not_an_image(advice: str, filename: str | None = "x.bin") -> str:
    what = f"The file '{filename}'" if filename else "The uploaded file"
    return f"{what} is not an image PIL can read ({FORMATS_TEXT}). {advice}"


def test_decode_image_needs_bytes():
    with pytest.raises(TypeError, match=r"^decode_image needs the file's bytes, got str$"):
        decode_image("photo.png")  # a path is not the file's content
    img = decode_image(bytearray(encode(halves_rgb(), "PNG")))  # bytearray and memoryview are bytes too
    assert img.size == (W, H) and decode_image(memoryview(encode(halves_rgb(), "PNG"))).size == (W, H)


@pytest.mark.parametrize(
    ("n", "limit", "says"),
    [
        (1024, 1023, "is 1 KB, more than the 1023 bytes allowed"),  # KB from 1024 bytes on
        (1076, 1024, "is 1.1 KB, more than the 1 KB allowed"),  # 1076 / 1024 = 1.051 -> one decimal
        (1024 * 1024, 1024 * 1024 - 1, "is 1 MB, more than the 1024 KB allowed"),  # MB from 1024 KB on
        (1_101_005, 1024 * 1024, "is 1.1 MB, more than the 1 MB allowed"),  # 1.0500002 MB -> 1.1
    ],
)
def test_byte_limit_message_sizes(n, limit, says):
    assert refusal(b"\0" * n, "f.png", max_bytes=limit) == f"The file 'f.png' {says}; compress or downscale it first."


HTML_ADVICE = "It looks like a web page (HTML); save the picture itself (right-click it, 'Save image as') and upload that."
TEXT_ADVICE = "It looks like a text file. Upload one of those."
PDF_ADVICE = "It looks like a PDF; export the page as PNG and upload that."
PLAIN_ADVICE = "Upload one of those."

NOT_IMAGES = {
    "zip": (_zip, "It looks like a ZIP archive; unpack it and upload one image from it."),
    "html doctype, leading blank lines": (lambda: b"\r\n  <!DOCTYPE HTML>\n<head><title>x</title></head>", HTML_ADVICE),
    "html after a comment": (lambda: b"<!-- saved page -->\n<HTML><body></body></html>", HTML_ADVICE),
    "pdf after a blank line": (lambda: b"\n%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", PDF_ADVICE),
    "text": (lambda: b"name,label\r\nseven.png,7\n\tdone\n", TEXT_ADVICE),
    "text: only the first 512 bytes are read": (lambda: b"a" * 512 + b"\x00\x01", TEXT_ADVICE),
    "text: <html cut at byte 512": (lambda: b"x" * 508 + b"<html>", TEXT_ADVICE),
    "UTF-8 text, a character cut at byte 512": (lambda: ("a" * 511 + "é, ü\n" * 4).encode(), TEXT_ADVICE),
    "UTF-8 text, invalid before the cut": (lambda: b"a" * 500 + b"\xc3" + b"a" * 40, PLAIN_ADVICE),
    "binary, not UTF-8": (lambda: b"\x00\xff\xfe\x81" * 16, PLAIN_ADVICE),
    "UTF-8 control characters": (lambda: b"\x00\x01\x02abc\x7f" * 8, PLAIN_ADVICE),
    "ppm (PIL reads it, wsviz does not try)": (lambda: encode(halves_gray(), "PPM"), PLAIN_ADVICE),
    "pcx": (lambda: encode(halves_rgb(), "PCX"), PLAIN_ADVICE),
    "ico": (lambda: encode(halves_rgb(), "ICO"), PLAIN_ADVICE),
}


@pytest.mark.parametrize("case", list(NOT_IMAGES))
def test_not_an_image_messages_in_full(case):
    make, advice = NOT_IMAGES[case]
    assert refusal(make(), "x.bin") == not_an_image(advice)


def test_formats_outside_the_list_are_never_opened():
    """PPM, PCX and ICO are formats PIL reads: the refusal above is wsviz's format list at work."""
    for fmt, img in (("PPM", halves_gray()), ("PCX", halves_rgb()), ("ICO", halves_rgb())):
        assert Image.open(io.BytesIO(encode(img, fmt))).format == fmt


def test_a_header_claiming_zero_width_is_not_an_image():
    # Pillow refuses a zero size before wsviz sees it; the signature says what it was meant to be
    assert refusal(png_with_header_size(0, 8), "zero.png") == (
        "The file 'zero.png' starts like a PNG file but cannot be read: it is cut short or damaged (73 bytes). "
        "Upload it again, or re-save it with an image editor.")


def gif_with_screen_size(width: int, height: int) -> bytes:
    """A valid 8x8 GIF whose logical screen (bytes 6..9, little-endian) claims another size."""
    gif = bytearray(encode(Image.new("P", (8, 8), 0), "GIF"))
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


@pytest.mark.parametrize(
    ("data", "max_pixels", "says"),
    [
        (lambda: png_with_header_size(8000, 6000), MAX_PIXELS, "8000x6000 = 48 million pixels, more than the 40 million"),
        (lambda: encode(Image.new("L", (8, 8)), "PNG"), 63, "8x8 = 64 pixels, more than the 63"),
        (lambda: png_with_header_size(1000, 1000), 999_999, "1000x1000 = 1 million pixels, more than the 999,999"),
        (lambda: png_with_header_size(1050, 1000), 1_000_000, "1050x1000 = 1.1 million pixels, more than the 1 million"),
        # PIL's own refusal (over twice Image.MAX_IMAGE_PIXELS), the count taken from its message
        (lambda: png_with_header_size(40000, 25000), MAX_PIXELS, "40000x25000 = 1 billion pixels, more than the 40 million"),
        (lambda: png_with_header_size(42000, 25000), MAX_PIXELS, "42000x25000 = 1.1 billion pixels, more than the 40 million"),
        (lambda: png_with_header_size(2**24 + 3, 100), MAX_PIXELS,
         "16777219x100 = 1.7 billion pixels, more than the 40 million"),  # all four bytes of the width
        (lambda: png_with_header_size(100, 2**24 + 3), MAX_PIXELS, "100x16777219 = 1.7 billion pixels, more than the 40 million"),
        (lambda: png_with_header_size(2**31 + 1, 1), MAX_PIXELS, "2147483649x1 = 2.1 billion pixels, more than the 40 million"),
        (lambda: gif_with_screen_size(40000, 40000), MAX_PIXELS, "1.6 billion pixels, more than the 40 million"),  # no PNG: no size
    ],
    ids=["ours", "ours-at-the-limit", "million", "million-rounding", "pil-billion", "pil-billion-rounding",
         "pil-wide", "pil-tall", "pil-unsigned", "pil-gif"],
)
def test_too_many_pixels_messages_in_full(data, max_pixels, says):
    assert refusal(data(), "big.img", max_pixels=max_pixels) == f"The image 'big.img' is {says} allowed; downscale it first."
    assert refusal(data(), max_pixels=max_pixels).startswith(f"The uploaded image is {says} allowed")


def test_the_pixel_limit_is_inclusive():
    data = encode(Image.new("L", (8, 8)), "PNG")
    assert decode_image(data, max_pixels=64).size == (8, 8)


def test_a_pil_refusal_without_a_pixel_count_still_names_the_limit(monkeypatch):
    """Should Pillow's wording change, the count falls back to one over the limit."""
    def refuse(*args, **kwargs):
        raise Image.DecompressionBombError("decompression bomb")

    monkeypatch.setattr(Image, "open", refuse)
    assert refusal(encode(Image.new("L", (8, 8)), "PNG"), "x.png", max_pixels=1000) == (
        "The image 'x.png' is 8x8 = 1,001 pixels, more than the 1,000 allowed; downscale it first.")


@pytest.mark.parametrize("kind", ["error", "warning"])
def test_a_bomb_found_while_decoding_is_refused(kind, monkeypatch):
    """PIL checks some sizes only while decoding (GIF frame extents, TIFF tiles); a warning counts too."""
    text = "Image size (200000000 pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack."

    def load(im):
        if kind == "error":
            raise Image.DecompressionBombError(text)
        warnings.warn(text, Image.DecompressionBombWarning, stacklevel=1)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert refusal(encode(halves_rgb(), "PNG"), "x.png") == (
        f"The image 'x.png' is too large to decode safely ({text}); downscale it first.")
    assert refusal(encode(halves_rgb(), "PNG")).startswith("The uploaded image is too large to decode safely")


def test_a_truncated_file_message_in_full():
    data = _half(encode(Image.fromarray(NOISE), "PNG"))
    with pytest.raises(OSError) as pil:  # what PIL itself says
        Image.open(io.BytesIO(data)).load()
    assert refusal(data) == (f"The uploaded file is a damaged or incomplete PNG file ({pil.value}). "
                             "Upload it again, or open and re-save it with an image editor.")


def apng_with_frame_count(n_frames: int) -> bytes:
    """The reference PNG with an APNG animation-control chunk (acTL) after its IHDR."""
    png = encode(halves_rgb(), "PNG")
    body = struct.pack(">II", n_frames, 0)
    chunk = struct.pack(">I", len(body)) + b"acTL" + body + struct.pack(">I", zlib.crc32(b"acTL" + body))
    return png[:33] + chunk + png[33:]  # 8-byte signature + 25-byte IHDR chunk


def test_an_invalid_apng_shows_its_default_image():
    """PIL warns (a UserWarning) on an acTL chunk announcing 0 frames and shows the still image:
    only decompression-bomb warnings are errors while decoding, not every warning."""
    data = apng_with_frame_count(0)
    with pytest.warns(UserWarning, match="Invalid APNG"):
        img = decode_image(data, "anim.png")
    assert img.size == (W, H) and px(img, "left") == RED and px(img, "right") == BLUE


def test_unreadable_exif_is_ignored_with_a_warning(monkeypatch, caplog):
    def broken(img):
        raise ValueError("bad EXIF block")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    data = encode(halves_rgb(), "JPEG", quality=95)
    with caplog.at_level("WARNING", logger="wsviz.data.uploads"):
        img = decode_image(data, "phone.jpg")
        assert decode_image(data).size == (W, H)
    assert img.mode == "RGB" and img.size == (W, H) and close(px(img, "left"), RED, 12)  # the image, as stored
    assert caplog.messages == ["ignoring unreadable EXIF orientation of phone.jpg: bad EXIF block",
                               "ignoring unreadable EXIF orientation of upload: bad EXIF block"]


def test_each_decode_is_logged_at_debug_level(caplog):
    with caplog.at_level("DEBUG", logger="wsviz.data.uploads"):
        decode_image(_png_rgba(), "a.png")
        decode_image(encode(halves_gray(), "JPEG"))
    assert caplog.messages == ["decoded a.png: PNG RGBA (48, 32) -> RGB", "decoded upload: JPEG L (48, 32) -> L"]


def _cmyk_convert_fails(monkeypatch, exc: Exception) -> None:
    real = Image.Image.convert

    def convert(self, mode=None, *args, **kwargs):
        if self.mode == "CMYK":
            raise exc
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "convert", convert)


def test_a_colour_mode_pil_cannot_convert_is_named(monkeypatch):
    """Pillow 13 converts every mode it decodes to RGB; should one fail, the message names it."""
    _cmyk_convert_fails(monkeypatch, ValueError("conversion from CMYK to RGB not supported"))
    assert refusal(_jpeg_cmyk(), "scan.jpg") == (
        "The image 'scan.jpg' uses the colour mode 'CMYK', which wsviz cannot convert; re-save it as RGB or grayscale.")
    assert refusal(_jpeg_cmyk()).startswith("The uploaded image uses the colour mode 'CMYK'")


def test_running_out_of_memory_while_converting_is_the_uploads_fault(monkeypatch):
    _cmyk_convert_fails(monkeypatch, MemoryError("cannot allocate 4 GB"))
    assert refusal(_jpeg_cmyk(), "scan.jpg") == (
        "The image 'scan.jpg' could not be converted to 8-bit RGB/grayscale (cannot allocate 4 GB); "
        "re-save it as an 8-bit PNG or JPEG.")
    assert refusal(_jpeg_cmyk()).startswith("The uploaded image could not be converted")


# modes beyond the corpus: colour keys and alpha on grayscale, 32-bit integers, floats

def _png_l_colour_key() -> bytes:
    return encode(halves_gray(left=40, right=200), "PNG", transparency=200)


def _png_la() -> bytes:
    img = Image.merge("LA", (halves_gray(left=40, right=0), halves_gray(left=255, right=0)))  # right: transparent
    return encode(img, "PNG")


def _png_16bit_colour_key() -> bytes:
    arr = np.full((H, W), 128 * 257, dtype=np.uint16)  # -> 128
    arr[:, : W // 2] = 1000  # the transparent value
    return encode(Image.fromarray(arr), "PNG", transparency=1000)


MORE_MODES = {
    "png-L-colour-key": (_png_l_colour_key, "L", 40, 255),
    "png-LA-over-white": (_png_la, "L", 40, 255),
    "png-16bit-colour-key": (_png_16bit_colour_key, "L", 255, 128),
}


@pytest.mark.parametrize("case", list(MORE_MODES))
def test_decode_more_modes(case):
    make, mode, left, right = MORE_MODES[case]
    img = decode_image(make(), case)
    assert img.mode == mode and img.size == (W, H)
    assert (px(img, "left"), px(img, "right")) == (left, right)


def _row_tiff(values, dtype) -> bytes:
    img = Image.fromarray(np.array([values], dtype=dtype))
    assert img.mode == ("F" if dtype == np.float32 else "I")
    return encode(img, "TIFF")


NAN, INF = float("nan"), float("inf")
DEEP = {  # values of a one-row 32-bit image -> the 8-bit values, by the rule in _scale_deep's docstring
    "I within 0..255: as is": ([0, 100, 255], np.int32, [0, 100, 255]),
    "I up to 256: as 16-bit": ([0, 128, 256], np.int32, [0, 0, 1]),  # 256 * 255 / 65535 = 0.996
    "I up to 65535: as 16-bit": ([300, 30000, 65535], np.int32, [1, 117, 255]),  # 300 -> 1.17, 30000 -> 116.7
    "I as 16-bit, near halves": ([0, 386, 33025, 65535], np.int32, [0, 2, 129, 255]),  # 1.502 -> 2, 128.502 -> 129
    "I over 65535: min..max": ([300, 30000, 65536], np.int32, [0, 116, 255]),  # 29700 * 255 / 65236 = 116.1
    "I negative: min..max": ([-100, 0, 1000], np.int32, [0, 23, 255]),  # 100 * 255 / 1100 = 23.2
    "I negative, small range: min..max": ([-100, 0, 200], np.int32, [0, 85, 255]),
    "I constant: black": ([-7, -7], np.int32, [0, 0]),
    "F within 0..1: x 255": ([0.0, 0.25, 1.0], np.float32, [0, 64, 255]),  # 63.75 -> 64
    "F up to 2: as 8-bit": ([0.0, 1.5, 2.0], np.float32, [0, 2, 2]),
    "F non-finite: 0": ([NAN, INF, -INF, 0.5, 1.0], np.float32, [0, 0, 0, 128, 255]),  # 127.5 -> 128 (to even)
}


@pytest.mark.parametrize("case", list(DEEP))
def test_deep_grayscale_is_scaled_by_its_range(case):
    values, dtype, expected = DEEP[case]
    img = decode_image(_row_tiff(values, dtype), "deep.tif")
    assert img.mode == "L" and np.asarray(img)[0].tolist() == expected


def test_16bit_maps_every_value_to_the_nearest_8bit_one():
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(decode_image(encode(Image.fromarray(v), "PNG")))
    assert (out == np.rint(v.astype(np.float64) * 255 / 65535)).all()


def _premultiplied(mode: str) -> Image.Image:
    """A 2x1 image in PIL's premultiplied-alpha mode ("La" / "RGBa"): left opaque, right transparent."""
    straight = {"La": "LA", "RGBa": "RGBA"}[mode]
    img = Image.new(straight, (2, 1), (40,) * (len(straight) - 1) + (0,))
    img.putpixel((0, 0), (40,) * (len(straight) - 1) + (255,))
    return img.convert(mode)


@pytest.mark.parametrize(("mode", "channels"), [("La", 1), ("RGBa", 3), ("PA", 3)])
def test_prepare_composites_premultiplied_and_palette_alpha_over_white(mode, channels):
    if mode == "PA":
        img = Image.new("PA", (2, 1), (1, 255))
        img.putpalette([0, 0, 0, 40, 40, 40])
        img.putpixel((1, 0), (1, 0))  # the same colour, transparent
    else:
        img = _premultiplied(mode)
    assert img.mode == mode
    t = prepare_image(img, channels, 2, invert=False)
    assert torch.allclose(t[:, 0, 0], torch.full((channels,), 40 / 255)) and torch.equal(t[:, 0, 1], torch.ones(channels))
    assert float(t[:, 1].abs().max()) == 0.0  # the padding row


def test_prepare_upscales_bilinearly():
    """2 -> 4 pixels: output pixel centres fall at 0.25, 0.75, 1.25, 1.75 source pixels, so a
    0 | 255 step becomes 0, 255/4, 3*255/4, 255 (63.75 -> 64, 191.25 -> 191)."""
    img = Image.fromarray(np.array([[0, 255], [0, 255]], dtype=np.uint8))
    t = prepare_image(img, 1, 4, invert=False)[0]
    assert (t * 255).round().tolist() == [[0, 64, 191, 255]] * 4


def test_prepare_shrinks_big_images_by_a_box_filter_first():
    """60 -> 6 pixels: an integer 3x3 box average (to 20) then bilinear, as the comment says."""
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 60), dtype=np.uint8))
    t = prepare_image(img, 1, 6, invert=False)[0]
    two_step = img.reduce(3).resize((6, 6), Image.Resampling.BILINEAR)
    assert img.resize((6, 6), Image.Resampling.BILINEAR).tobytes() != two_step.tobytes()  # the steps matter
    assert torch.equal(t, torch.from_numpy(np.asarray(two_step, dtype=np.float32) / 255.0))


def test_inverting_is_exactly_the_negative():
    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    negative = Image.fromarray(255 - np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert torch.equal(prepare_image(ramp, 1, 16, invert=True), prepare_image(negative, 1, 16, invert=False))
    assert torch.equal(prepare_image(ramp, 1, 16, invert=False)[0].ravel(), torch.arange(256) / torch.tensor(255.0))


def test_auto_inversion_needs_a_border_strictly_above_half():
    half = Image.fromarray(np.array([[0, 0, 255, 255]] * 4, dtype=np.uint8))  # border: 6 dark, 6 bright
    assert torch.equal(prepare_image(half, 1, 4), prepare_image(half, 1, 4, invert=False))
    gray = Image.new("L", (4, 4), 128)  # 128 / 255 = 0.502: just above half
    assert torch.equal(prepare_image(gray, 1, 4), prepare_image(gray, 1, 4, invert=True))


@pytest.mark.parametrize("shape", [(5, 6), (5, 3), (3, 5), (4, 1), (1, 4), (2, 5), (2, 2)])
def test_border_mean_is_the_mean_of_the_outer_ring(shape):
    from wsviz.data.uploads import _border_mean

    arr = (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1) ** 2  # distinct values
    ring = np.ones(shape, dtype=bool)
    ring[1:-1, 1:-1] = False  # every pixel once; a 1- or 2-wide array is all ring
    assert _border_mean(arr) == pytest.approx(float(arr[ring].mean()), rel=1e-12)


def test_load_upload_passes_invert_on():
    data = encode(ink_on_paper(), "PNG")
    plain = load_upload(data, "ink.png", 1, 28, invert=False, layout="fit")
    assert float(plain[0, 0, 0]) == 1.0 and float(plain[0, 14, 14]) < 0.1  # not inverted: white paper
    assert torch.equal(plain, prepare_image(ink_on_paper(), 1, 28, invert=False))
    # the digit layout with the paper taken for the background and the ink darker still: nothing is left
    assert float(load_upload(data, "ink.png", 1, 28, invert=False).max()) == 0.0
    assert float(load_upload(data, "ink.png", 1, 28, invert=True).max()) == 1.0


# ---------------------------------------------------------------------------------------
# the digit layout: uploads look like the digits the shipped models were trained on

ROOT = Path(__file__).resolve().parents[1]


def _test_digits(n: int = 200):
    """``n`` mnist5k test digits (a seeded draw over all classes) as float arrays in [0, 1], and labels."""
    from wsviz.data.datasets import load_split

    te = load_split("mnist5k", "test")
    idx = torch.randperm(len(te.labels), generator=torch.Generator().manual_seed(0))[:n]
    return te.images[idx, 0].float().numpy(), te.labels[idx]


def _png(a: np.ndarray) -> bytes:
    return encode(Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)), "PNG")


def _shipped(name: str):
    from wsviz.training.checkpoint import load_checkpoint

    if not (ROOT / "checkpoints" / name / "card.json").is_file():
        pytest.skip(f"needs the shipped checkpoint {name}")
    return load_checkpoint(ROOT / "checkpoints" / name)[0].eval()


def _accuracy(model, arrays, labels) -> float:
    """Accuracy on these images, each saved as a PNG and read back through the app's upload path."""
    x = torch.stack([load_upload(_png(a), "upload.png", 1, 28) for a in arrays])
    with torch.no_grad():
        return float((model(x).argmax(1) == labels).float().mean())


def _direct_accuracy(model, arrays, labels) -> float:
    """Accuracy on the test digits themselves, as the model was evaluated (no upload path): the reference."""
    with torch.no_grad():
        return float((model(torch.from_numpy(np.stack(arrays)).unsqueeze(1)).argmax(1) == labels).float().mean())


def _tight(a: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(a > 0)
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_the_digit_layout_is_the_one_measured_on_the_training_data():
    """DIGIT_BOX and DIGIT_CENTRE are what the shipped digit models' training images show: the unscaled
    digits (mnist5k, what mnist5k-scale shrinks and mnist5k-rot rotates) fill a 20-pixel box of 28
    with their centre of mass at pixel 14; mnist5k-scale's largest digits are that size."""
    from wsviz.data.datasets import load_split
    from wsviz.data.uploads import DIGIT_BOX, DIGIT_CENTRE

    def measure(name):
        x = load_split(name, "train").images[:, 0].float().numpy()
        longs, rows, cols = [], [], []
        for a in x:
            ys, xs = np.nonzero(a > 0)
            longs.append(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
            r, c = np.indices(a.shape)
            rows.append(float((a * r).sum() / a.sum()))
            cols.append(float((a * c).sum() / a.sum()))
        return np.array(longs), np.median(rows), np.median(cols)

    longs, row, col = measure("mnist5k")
    assert np.mean(longs == round(DIGIT_BOX * 28)) > 0.99
    assert abs(row - DIGIT_CENTRE * 28) < 0.1 and abs(col - DIGIT_CENTRE * 28) < 0.1
    scaled, _, _ = measure("mnist5k-scale")
    assert np.percentile(scaled, 95) == round(DIGIT_BOX * 28) and np.median(scaled) < 0.75 * DIGIT_BOX * 28


def test_an_mnist_digit_comes_back_as_it_was():
    arrays, _ = _test_digits(300)
    same = [np.allclose(load_upload(_png(a), "d.png", 1, 28)[0].numpy(), a / a.max(), atol=1e-6) for a in arrays]
    assert np.mean(same) > 0.99


def test_digits_on_off_white_paper_are_read_as_well_as_on_white():
    """Dark ink on grey paper: the paper becomes exactly black, as MNIST's background is. Before, paper of
    brightness 0.9 arrived as a 0.1 haze and scale-msws-vanilla read 8.5% of these digits (95.5% on white)."""
    model = _shipped("scale-msws-vanilla")
    arrays, labels = _test_digits()
    white = _accuracy(model, [1 - a for a in arrays], labels)
    assert white >= _direct_accuracy(model, arrays, labels) - 0.01
    for paper, ink in [(0.95, 0.05), (0.9, 0.1), (0.8, 0.2), (0.45, 0.05)]:
        acc = _accuracy(model, [paper + (ink - paper) * a for a in arrays], labels)
        assert acc >= white - 0.02, (paper, ink, acc, white)


def test_noisy_paper_photo_is_read_nearly_as_well():
    model = _shipped("scale-resnet20")
    arrays, labels = _test_digits(100)
    rng = np.random.default_rng(0)
    clean = _direct_accuracy(model, arrays, labels)
    big = [np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((112, 112), Image.Resampling.BILINEAR)) / 255
           for a in arrays]
    noisy = [np.clip(0.85 - 0.7 * b + rng.normal(0, 0.03, b.shape), 0, 1) for b in big]
    assert _accuracy(model, noisy, labels) >= clean - 0.05


@pytest.mark.parametrize("variant", ["scale-msws-vanilla", "scale-resnet20"])
def test_tightly_cropped_digits_are_read_as_well_as_uncropped(variant):
    """A digit cropped to its bounding box is laid out in MNIST's 20x20 box: before, it filled the frame at
    1.4x the training scale (scale-msws-vanilla 67%, scale-resnet20 58%, against 97% / 98%)."""
    model = _shipped(variant)
    arrays, labels = _test_digits()
    whole = _direct_accuracy(model, arrays, labels)
    assert _accuracy(model, arrays, labels) >= whole - 0.01
    assert _accuracy(model, [_tight(a) for a in arrays], labels) >= whole - 0.03
    assert _accuracy(model, [0.9 - 0.8 * _tight(a) for a in arrays], labels) >= whole - 0.03  # and on paper
    sheet = []
    for a in arrays:  # a small digit in a corner of a big white sheet
        s = np.ones((140, 100))
        s[10:38, 60:88] = 1 - a
        sheet.append(s)
    assert _accuracy(model, sheet, labels) >= whole - 0.03


def _box_and_centre(t: torch.Tensor) -> tuple[int, float, float]:
    a = t[0].numpy()
    ys, xs = np.nonzero(a > 0.1)
    r, c = np.indices(a.shape)
    return max(ys.max() - ys.min(), xs.max() - xs.min()) + 1, (a * r).sum() / a.sum(), (a * c).sum() / a.sum()


@pytest.mark.parametrize("where", ["tight", "corner of a big sheet", "tiny"])
def test_digit_layout_puts_the_digit_in_the_20_pixel_box_at_the_centre(where):
    stroke = Image.new("L", (30, 60), 255)
    stroke.paste(0, (4, 0, 26, 12))  # a '7'-like shape: a bar and a slanted leg
    for y in range(12, 60):
        stroke.paste(0, (18 - y // 4, y, 26 - y // 4, y + 1))
    if where == "corner of a big sheet":
        img = Image.new("L", (600, 400), 240)
        img.paste(stroke, (500, 300))
    elif where == "tiny":
        img = stroke.resize((5, 10), Image.Resampling.BILINEAR)
    else:
        img = stroke
    t = prepare_image(img, 1, 28, layout="digit")
    long, row, col = _box_and_centre(t)
    assert 19 <= long <= 21 and abs(row - 14) <= 0.6 and abs(col - 14) <= 0.6, (long, row, col)
    assert float(t.max()) == 1.0 and float(t[0, 0].max()) == 0.0  # contrast stretched, background black


def test_digit_layout_on_a_blank_image_is_black_and_says_so():
    from wsviz.data.uploads import explain_upload

    data = encode(Image.new("L", (40, 40), 230), "PNG")
    assert float(load_upload(data, "blank.png", 1, 28).abs().max()) == 0.0
    assert explain_upload(data, "blank.png", 1, 28).startswith("No digit found")


def test_explain_upload_says_what_was_done():
    from wsviz.data.uploads import explain_upload

    paper = encode(Image.eval(ink_on_paper(size=(56, 84)), lambda v: 30 + v * 200 // 255), "PNG")
    text = explain_upload(paper, "ink.png", 1, 28)
    for part in ("inverted", "brightness 0.90", "set to black", "contrast stretched", "(8×68 pixels in the upload)",
                 "20×20 box", "centre of mass", "28×28"):
        assert part in text, (part, text)
    assert explain_upload(paper, "ink.png", 3, 32).startswith("The image was fit inside 32×32")
    assert "fit inside 28×28" in explain_upload(paper, "ink.png", 1, 28, dataset="fashion-mnist")


@pytest.mark.parametrize(("channels", "dataset", "layout"), [
    (1, None, "digit"), (1, "mnist5k-scale", "digit"), (1, "mnist-rot", "digit"), (1, "mnist", "digit"),
    (1, "fashion-mnist", "fit"), (3, None, "fit"), (3, "cifar10", "fit")])
def test_default_layout_is_the_digit_layout_only_for_digit_models(channels, dataset, layout):
    from wsviz.data.uploads import default_layout

    assert default_layout(channels, dataset) == layout
    data = encode(ink_on_paper(size=(40, 70)).convert("RGB"), "PNG")
    assert torch.equal(load_upload(data, "x.png", channels, 28, dataset=dataset),
                       prepare_image(ink_on_paper(size=(40, 70)).convert("RGB"), channels, 28, layout=layout))


@pytest.mark.parametrize(("channels", "layout"), [(3, "digit"), (1, "centre"), (1, None)])
def test_prepare_validates_the_layout(channels, layout):
    with pytest.raises(WsvizError, match="layout must be one of fit, digit, crop"):
        prepare_image(Image.new("L", (4, 4)), channels, 8, layout=layout)
