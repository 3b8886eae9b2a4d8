"""Decoding of user-uploaded images into model input.

Uploads are untrusted bytes. ``decode_image`` turns them into an upright 8-bit ``"L"`` or
``"RGB"`` image or raises ``WsvizError`` with a message that says what to do; it never
raises anything else for bad data and never decodes more than ``max_pixels`` pixels: the
header is read first (``Image.open`` is lazy) and the size checked before ``load()``.
Only PNG, JPEG, WebP, GIF, BMP and TIFF are tried, so PIL's other parsers (EPS runs
Ghostscript) never see an upload. Decoding works on an in-memory buffer; no temporary
files, and no change to PIL's global settings (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays
as it is, so a truncated file is an error, not a half-grey image).

``prepare_image`` makes a tensor the way wsviz's training data looks, values in [0, 1]. Its
``"fit"`` layout fits the image inside a ``size`` x ``size`` square keeping its aspect ratio,
centred, zero (black) padded; for one channel ``invert="auto"`` inverts an image whose border
is mostly bright. Its ``"digit"`` layout, what ``load_upload`` uses for one-channel digit
models, makes an upload look like the MNIST digits they were trained on: white ink on an
exactly black background, contrast stretched, the digit in a 20x20 box of the 28x28 input
with its centre of mass at the centre (measured on the training data: see ``DIGIT_BOX``).
People photograph dark ink on off-white paper and crop tightly; without this, the paper
arrives as a grey haze and the digit 1.4x the training scale, and the predictions are
mostly wrong. Uneven lighting and the flat corners of a rotated scan are told apart from the
digit; ``explain_upload`` says, for the page, what was done.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from wsviz.errors import WsvizError

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000

# PIL format names tried on an upload ("DIB" is the BMP plugin's headerless variant). The
# JPEG opener also returns the multi-picture JPEGs ("MPO") many phone cameras write.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF")
FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF"

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


# ---------------------------------------------------------------------------------------
# messages


def _what(filename: str | None, noun: str = "file") -> str:
    return f"The {noun} '{filename}'" if filename else "The uploaded " + noun


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{_num(n / 1024)} KB"
    return f"{_num(n / (1024 * 1024))} MB"


def _human_count(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{_num(n / 1e9)} billion"
    if n >= 1_000_000:
        return f"{_num(n / 1e6)} million"
    return f"{n:,}"


def _num(x: float) -> str:
    """One decimal, without a trailing '.0' (40.0 -> '40', 1.6 -> '1.6')."""
    s = f"{x:.1f}"
    return s[:-2] if s.endswith(".0") else s


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WebP"))


def _not_an_image(data: bytes, filename: str | None) -> WsvizError:
    """Say the data is no supported image, with a hint when it is plainly something else."""
    head = data[:512].lstrip().lower()
    advice = "Upload one of those."
    kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
    if kind and not (kind == "WebP" and data[8:12] != b"WEBP"):
        return WsvizError(f"{_what(filename)} starts like a {kind} file but cannot be read: it is cut short or damaged "
                          f"({_human_bytes(len(data))}). Upload it again, or re-save it with an image editor.")
    if data.startswith(b"PK\x03\x04"):
        advice = "It looks like a ZIP archive; unpack it and upload one image from it."
    elif head.startswith(b"<!doctype html") or b"<html" in head:
        advice = "It looks like a web page (HTML); save the picture itself (right-click it, 'Save image as') and upload that."
    elif head.startswith(b"%pdf"):
        advice = "It looks like a PDF; export the page as PNG and upload that."
    elif _looks_like_text(data[:512]):
        advice = "It looks like a text file. Upload one of those."
    return WsvizError(f"{_what(filename)} is not an image PIL can read ({FORMATS_TEXT}). {advice}")


def _looks_like_text(sample: bytes) -> bool:
    """Printable UTF-8; ``sample`` is the file's head, so a character its end cuts in two is no evidence
    against (the incremental decoder holds those bytes back instead of failing on them)."""
    import codecs

    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t" for ch in text)


def _too_many_pixels(filename: str | None, pixels: int, max_pixels: int, size: tuple[int, int] | None) -> WsvizError:
    dims = f"{size[0]}x{size[1]} = " if size else ""
    return WsvizError(
        f"{_what(filename, 'image')} is {dims}{_human_count(pixels)} pixels, more than the "
        f"{_human_count(max_pixels)} allowed; downscale it first."
    )


# ---------------------------------------------------------------------------------------
# decoding


def decode_image(
    data: bytes,
    filename: str | None = None,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode uploaded bytes into an upright 8-bit image, mode ``"L"`` or ``"RGB"``.

    Grayscale sources (``"1"``, ``"L"``, ``"LA"``, 16-bit, 32-bit int, float) give ``"L"``,
    everything else ``"RGB"``. Transparency is composited over white; an animated GIF/WebP/PNG
    gives its first frame, a multi-page TIFF its first page (``frame_count`` says how many there
    are, ``explain_upload`` says so); the EXIF orientation is applied. Any problem with the data
    raises ``WsvizError`` naming ``filename`` (when given) and saying what to do.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_image needs the file's bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise WsvizError(f"{_what(filename)} is empty (0 bytes). Choose the image file again, or upload another one.")
    if len(data) > max_bytes:
        raise WsvizError(
            f"{_what(filename)} is {_human_bytes(len(data))}, more than the {_human_bytes(max_bytes)} allowed; "
            "compress or downscale it first."
        )

    # PIL warns (rather than raises) between Image.MAX_IMAGE_PIXELS and twice that; make it an
    # error here. catch_warnings restores the filters on exit (it is not thread-safe before
    # Python 3.14, but only ever adds this one filter for the duration of a decode).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open_header(data, filename, max_pixels)
        _load(img, filename)

    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block should not cost the user a good image
        logger.warning("ignoring unreadable EXIF orientation of %s: %s", filename or "upload", exc)
        upright = img
    try:
        out = _to_8bit(upright, filename)
    except WsvizError:
        raise
    except Exception as exc:  # e.g. MemoryError on a huge image: still the upload's fault
        raise WsvizError(
            f"{_what(filename, 'image')} could not be converted to 8-bit RGB/grayscale ({exc}); "
            "re-save it as an 8-bit PNG or JPEG."
        ) from None
    logger.debug("decoded %s: %s %s %s -> %s", filename or "upload", img.format, img.mode, img.size, out.mode)
    return out


def _open_header(data: bytes, filename: str | None, max_pixels: int) -> Image.Image:
    """Parse the header only and refuse an image too large to decode."""
    try:
        img = Image.open(io.BytesIO(data), formats=_available_formats())
    except UnidentifiedImageError:
        raise _not_an_image(data, filename) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses inside Image.open, before we see the size; its message has the count. Its
        # own limit (Image.MAX_IMAGE_PIXELS, read, never changed here) may be below max_pixels.
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(m.group(1)) if m else max_pixels + 1
        allowed = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise _too_many_pixels(filename, pixels, allowed, _png_size(data)) from None
    except Exception as exc:  # any parser failure on untrusted data is the data's fault
        raise WsvizError(
            f"{_what(filename)} has a damaged header and cannot be read ({exc}). "
            f"Re-save it with an image editor as {FORMATS_TEXT}, or upload another file."
        ) from None
    # A header claiming a zero width or height never gets here: Pillow's ImageFile refuses it as
    # "not identified", so it is reported as not an image.
    width, height = img.size
    if width * height > max_pixels:
        raise _too_many_pixels(filename, width * height, max_pixels, (width, height))
    return img


def _available_formats() -> list[str]:
    """FORMATS this Pillow can open: Image.open raises KeyError for a name it has no opener for."""
    Image.init()  # registers the plugins, as Image.open itself would
    return [f for f in FORMATS if f in Image.OPEN]


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR (for messages only), or None if not a PNG. Only called
    once Pillow has parsed the header, so a PNG here holds its whole IHDR."""
    if data.startswith(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"):  # the signature, then IHDR's length (13) and type
        return struct.unpack(">II", data[16:24])
    return None


def _load(img: Image.Image, filename: str | None) -> None:
    """Decode the pixels (first frame); truncated or corrupt data becomes a WsvizError."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise WsvizError(f"{_what(filename, 'image')} is too large to decode safely ({exc}); downscale it first.") from None
    except Exception as exc:
        raise WsvizError(  # img.format: the opener's format name, always set by Image.open
            f"{_what(filename)} is a damaged or incomplete {img.format} file ({exc}). "
            "Upload it again, or open and re-save it with an image editor."
        ) from None


def _to_8bit(img: Image.Image, filename: str | None = None) -> Image.Image:
    """Any PIL image as 8-bit ``"L"`` (grayscale sources) or ``"RGB"``, alpha over white.

    PIL's own ``convert("L")`` clips 16-bit values above 255 to white and truncates floats
    to 0, so deep images are scaled here instead (see ``_scale_deep``).
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        if "transparency" in img.info:  # tRNS colour key: that colour is transparent
            return _over_white(img.convert("LA" if mode == "L" else "RGBA"))
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("LA", "La"):
        return _over_white(img.convert("LA"))
    if mode in _16BIT_MODES or mode in ("I", "F"):
        return _scale_deep(img)
    if mode in ("P", "PA", "RGBA", "RGBa"):  # an opaque palette image over white is its own colours
        return _over_white(img.convert("RGBA"))
    try:  # CMYK, YCbCr, HSV, RGBX, ...
        return img.convert("RGB")
    except (ValueError, OSError):
        raise WsvizError(
            f"{_what(filename, 'image')} uses the colour mode {mode!r}, which wsviz cannot convert; "
            "re-save it as RGB or grayscale."
        ) from None


def _over_white(img: Image.Image) -> Image.Image:
    """Composite an ``"LA"`` / ``"RGBA"`` image over a white background."""
    base = Image.new(img.mode, img.size, (255,) * len(img.mode))
    out = Image.alpha_composite(base, img)
    return out.convert(img.mode[:-1])


def _scale_deep(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit int or float grayscale as 8-bit ``"L"``.

    16-bit modes map their full range 0..65535 onto 0..255 (65535 -> 255). For ``"I"`` and
    ``"F"`` the container is inferred from the values: within [0, 1] (normalised floats)
    -> x 255, within [0, 255] -> as is, within [0, 65535] -> as 16-bit; anything else
    (negative values, wider ranges) is stretched from its min..max. Non-finite values are 0.
    """
    arr = np.asarray(img)
    transparent = None
    if "transparency" in img.info and isinstance(img.info["transparency"], int):
        transparent = arr == img.info["transparency"]
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode in _16BIT_MODES:
        lo, hi = 0.0, 65535.0
    else:
        vmin, vmax = float(arr.min()), float(arr.max())  # an image has at least one pixel
        if vmin >= 0.0 and vmax <= 1.0 and img.mode == "F":
            lo, hi = 0.0, 1.0
        elif vmin >= 0.0 and vmax <= 255.0:
            lo, hi = 0.0, 255.0
        elif vmin >= 0.0 and vmax <= 65535.0:
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = vmin, vmax
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip(np.rint((arr - lo) * scale), 0, 255).astype(np.uint8)
    if transparent is not None:
        out[transparent] = 255
    return Image.fromarray(out)  # 2-D uint8 -> "L"


# ---------------------------------------------------------------------------------------
# model input

LAYOUTS = ("fit", "digit", "crop")

# Measured on the training images of the shipped digit models (mnist5k train, 4,000 digits at 28x28;
# tests/test_uploads.py re-measures it): the unrotated, unscaled digits mnist5k-rot and mnist5k-scale are
# made from have a bounding box (pixels above 0) whose long side is 20 of the 28 pixels in 3,999 of them
# (19 in the other), and their centre of mass at pixel (14.0, 14.0) (median, rows and columns; 13.55..14.45 for
# 90% of them): MNIST's own layout, a 20x20 box centred by centre of mass in 28x28. mnist5k-scale shrinks
# that about the image centre by a factor in [0.3, 1] (long side 7..20, median 14) and mnist5k-rot rotates
# it, so the unscaled upright layout is the one both protocols start from (the Scale page's factor 1).
DIGIT_BOX = 20 / 28  # long side of the digit's bounding box, as a fraction of the model's input size
DIGIT_CENTRE = 14 / 28  # where its centre of mass goes (row and column, pixel index), as a fraction
DIGIT_DATASETS = ("mnist", "mnist5k")  # these and their -rot / -scale protocols
_WORK = 8  # the digit layout works on the upload shrunk to at most 8x the input size (long side)
# A pixel is part of the digit (its bounding box) when it, and the mean of its 3x3 neighbourhood, are above
# this fraction of the brightest neighbourhood: that finds the 20-pixel box in 3,991 of the 4,000 training
# digits, while paper noise and lone specks stay out.
_INK = 0.1
_BLANK = 4 / 255  # nothing on the image: no pixel this much brighter than the background
# Uneven lighting (a photo darker on one side, a lamp's vignette): the background is measured as a smooth
# surface (a quadratic in x and y, fit robustly to the medians of a grid of at most _GRID x _GRID cells, so
# the ink's cells are left out) and subtracted, instead of one level for the whole image. When that surface
# varies by no more than _EVEN x the ink threshold, or by less than _TREND x the scatter of the cells it was fit
# to, or when no more of the image lies that near it than near the one level, the one level (the border's
# median) is used as before: the paper then stays out of the digit's box anyway, and an evenly lit upload
# gives exactly the input it did.
_GRID = 16
_EVEN = 0.5
_TREND = 10
# A rotated scan or photo leaves flat corners: a triangle of one colour (black, or white where it was
# transparent) in each corner of the canvas. Such a corner (values within _FLAT of 0 or 1, the staircase of a
# straight edge) is set apart from the picture, neither paper nor ink, when under _FILL_SHARE of the rest of
# the image has its colour and it is one of four at a rotation's angles, or would be taken for ink (see
# _fill_matters; else it is the paper itself, e.g. beside a tightly cropped slanted '1').
_FLAT = 16 / 255  # JPEG leaves a black corner ragged by a few levels along its edge
_FILL_SHARE = 0.15
_FILL_MARGIN = 3  # work pixels beyond a flat corner's edge also left out: the blend of its edge with the paper
_WHOLE = 0.9  # a digit's box covering this share of the upload is "(nearly) the whole image"


def is_digit_dataset(dataset: str | None) -> bool:
    """Whether ``dataset`` is one of MNIST's digit datasets (``mnist``, ``mnist5k`` and their ``-rot`` /
    ``-scale`` protocols); Fashion-MNIST is not."""
    return bool(dataset) and dataset.partition("-")[0] in DIGIT_DATASETS


def default_layout(channels: int, dataset: str | None = None, evaluation: str = "none") -> str:
    """``"digit"`` for a one-channel model trained on digits, or one whose dataset is not given (every
    shipped one-channel checkpoint is a digit model); otherwise ``"crop"`` for a model whose training
    evaluated its images with the ``imagenet`` preset (``evaluation``, the card's
    :func:`wsviz.training.cards.evaluation_transform`: resize to 8/7 of the input, centre crop), else
    ``"fit"`` (RGB, Fashion-MNIST: the whole image in the square, as image folders are read without a preset)."""
    if channels == 1 and (dataset is None or is_digit_dataset(dataset)):
        return "digit"
    return "crop" if evaluation == "imagenet" else "fit"


@dataclass(frozen=True)
class Preparation:
    """What ``prepare_image`` did to an image, for the page to say (``text()``)."""

    layout: str
    channels: int
    size: int
    inverted: bool
    background: float | None = None  # digit layout: the paper's / background's brightness in the upload, 0..1
    contrast: float | None = None  # digit layout: how much brighter than the background the strongest ink was
    box: tuple[int, int] | None = None  # digit layout: the digit's bounding box (width, height), upload pixels
    blank: bool = False  # digit layout: nothing brighter than the background
    # digit layout, uneven lighting: the darkest and brightest level of the background surface subtracted
    # (0..1, as in the upload); None when one level (``background``) was used for the whole image
    background_range: tuple[float, float] | None = None
    fill: float = 0.0  # digit layout: share of the upload in flat corners (a rotated canvas) taken as background
    fill_value: float | None = None  # their brightness, 0 (black) or 1 (white, e.g. transparent)
    edges: tuple[str, ...] = ()  # digit layout: the sides of the upload the digit's box reaches
    cover: float | None = None  # digit layout: the share of the upload's area the digit's box covers
    # how many frames (pages, images) the uploaded file holds, of which only the first is used; what they are
    # called ("frames" of an animation, "pages" of a TIFF, "images" of a phone's multi-picture JPEG)
    frames: int = 1
    frame_unit: str = "frames"

    def text(self) -> str:
        return self._first() + self._made()

    def _first(self) -> str:
        """That only the first of several frames was used, or nothing."""
        if self.frames <= 1:
            return ""
        n, unit = self.frames, self.frame_unit
        if unit == "frames":
            return f"The upload is an animation: only its first frame is used (first of {n} frames). "
        return f"The upload holds several {unit}: only the first is used (first of {n} {unit}). "

    def _made(self) -> str:
        s = self.size
        if self.layout == "fit":
            return (f"The image was fit inside {s}×{s} pixels keeping its aspect ratio, padded with black"
                    + (", and inverted." if self.inverted else "."))
        if self.layout == "crop":
            return (f"The image was resized so its short side is {round(s * 8 / 7)} pixels and its centre "
                    f"{s}×{s} cropped, as this model's training evaluated its images (imagenet preset)"
                    + (", and inverted." if self.inverted else "."))
        box = max(1, round(DIGIT_BOX * s))
        flip = " (dark on light, so inverted: MNIST digits are white on black)" if self.inverted else ""
        if self.background_range is not None:
            lo, hi = self.background_range
            level = f"brightness {lo:.2f} to {hi:.2f}: uneven, so measured across the image"
        else:
            level = f"brightness {self.background:.2f}"
        corners = ""
        if self.fill > 0.0:
            colour = "white" if (self.fill_value or 0.0) > 0.5 else "black"
            corners = (f" The flat {colour} corners ({_pct(self.fill)} of the image, as a rotated scan or photo "
                       "leaves them) were taken as background.")
        if self.blank:
            return (f"No digit found{flip}: nothing on the image stands out from its background ({level}), "
                    f"so the model sees a black {s}×{s} input.{corners}")
        w, h = self.box
        return (f"Prepared like the training digits{flip}: the {'paper' if self.inverted else 'background'} "
                f"({level}) was set to black and the contrast stretched so the strongest stroke is white; the "
                f"digit ({w}×{h} pixels in the upload) was scaled to fit a {box}×{box} box and moved so its "
                f"centre of mass is at the centre of the {s}×{s} input, as in MNIST.{corners}{self._reach()}")

    def _reach(self) -> str:
        """What the digit's box reaching the upload's edges, or filling it, may mean."""
        sides = _and(self.edges)
        plural = "s" if len(self.edges) > 1 else ""
        if self.cover is not None and self.cover >= _WHOLE:
            whole = "the whole image" if self.cover >= 0.995 else f"nearly the whole image ({_pct(self.cover)} of it)"
            return (f" The digit's box is {whole}: either the digit fills the frame, or its background was not "
                    "told apart from it (then crop the photo to the digit with some paper around it).")
        if self.edges:
            return (f" The digit's box reaches the {sides} edge{plural} of the image, so the digit may be cut off "
                    "there.")
        return ""


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%" if share >= 0.01 else "under 1%"


def _and(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1] if words else ""


def prepare_image(img: Image.Image, channels: int, size: int, *, invert: bool | str = "auto",
                  layout: str = "fit") -> torch.Tensor:
    """A float tensor (channels, size, size) in [0, 1], laid out like wsviz's training data.

    ``layout="fit"``: the image is fit inside a ``size`` x ``size`` square keeping its aspect
    ratio (bilinear, antialiased when shrinking), centred and padded with black. ``channels`` 1
    gives luminance, 3 gives RGB (grayscale repeated). ``invert``: True / False, or ``"auto"``,
    which for one channel inverts an image whose 1-pixel border averages above 0.5 (dark ink on
    white paper becomes white-on-black like MNIST) and never inverts RGB. Inversion is applied
    before padding, so the padding stays black.

    ``layout="digit"`` (one channel only) makes an upload look like the digits the models were
    trained on (see ``DIGIT_BOX``): ``"auto"`` inverts when the ink is darker than the paper
    (the darkest spot is further below the border's median than the brightest is above it, so
    grey paper counts too); the background (the border's median) becomes 0, exactly as in
    MNIST, and the contrast is stretched so the brightest pixel is 1 (ink on off-white paper
    otherwise arrives as a grey haze). Where the lighting is uneven (a photo darker on one
    side), a smooth surface fit to the paper across the image is subtracted instead of one level
    (see ``_GRID``), and the flat corners a rotated canvas leaves count as background (see
    ``_FLAT``): either would otherwise be measured as part of the digit. The digit is scaled so the long side of its bounding box
    is ``DIGIT_BOX`` of the input and shifted (whole pixels) so its centre of mass lies at
    ``DIGIT_CENTRE``, like MNIST's 20x20 box in 28x28 (a tightly cropped digit otherwise
    arrives 1.4x the training scale). An MNIST digit comes back as it was (where its brightest
    pixel is 254, stretched to 255).

    ``layout="crop"``: the ``imagenet`` preset's evaluation transform itself
    (:func:`wsviz.data.loaders.transforms_for`: the short side resized to 8/7 of ``size``, the
    centre ``size`` x ``size`` cropped), for a model whose training tested it that way.
    """
    return _prepare(img, channels, size, invert, layout)[0]


def _prepare(img: Image.Image, channels: int, size: int, invert: bool | str,
             layout: str) -> tuple[torch.Tensor, Preparation]:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise WsvizError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}; use the model's input channels.")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise WsvizError(f"size must be a whole number of pixels >= 1, got {size!r}; use the model's input size.")
    if not (isinstance(invert, bool) or invert == "auto"):
        raise WsvizError(f"invert must be True, False or 'auto', got {invert!r}.")
    if layout not in LAYOUTS or (layout == "digit" and channels != 1):
        raise WsvizError(f"layout must be one of {', '.join(LAYOUTS)} ('digit' for one channel only), got {layout!r}.")
    size = int(size)

    img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    if layout == "digit":
        canvas, how = _digit_layout(img, size, invert)
        return torch.from_numpy(canvas).unsqueeze(0), how
    if layout == "crop":  # the imagenet preset's evaluation transform itself, as training tested the model
        from wsviz.data.loaders import transforms_for

        pixels = transforms_for("imagenet", size, train=False, from_pil=True)(img).float()  # (C, size, size) 0..255
        do_invert = (channels == 1 and _border_mean(pixels[0].numpy()) > 127.5) if invert == "auto" else bool(invert)
        if do_invert:
            pixels = 255.0 - pixels
        return (pixels / 255.0).contiguous(), Preparation("crop", channels, size, do_invert)
    w, h = img.size
    scale = size / max(w, h)
    new_w, new_h = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    if (new_w, new_h) != (w, h):
        # reducing_gap: shrink big photos by an integer box filter first (fast), then bilinear.
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)

    pixels = np.asarray(img, dtype=np.float32)  # 0..255
    if invert == "auto":
        do_invert = channels == 1 and _border_mean(pixels) > 127.5
    else:
        do_invert = bool(invert)
    if do_invert:
        pixels = 255.0 - pixels  # exact, so an inverted image is exactly its negative
    arr = pixels / 255.0

    canvas = np.zeros((size, size) if channels == 1 else (size, size, 3), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = arr
    t = torch.from_numpy(canvas)
    how = Preparation("fit", channels, size, do_invert)
    return (t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()), how


def _digit_layout(img: Image.Image, size: int, invert: bool | str) -> tuple[np.ndarray, Preparation]:
    """An ``"L"`` image as a (size, size) MNIST-style digit in [0, 1] (see ``prepare_image``)."""
    w, h = img.size
    shrink = min(1.0, _WORK * size / max(w, h))
    if shrink < 1.0:  # big photos: work at 8x the input size, plenty to find and measure the digit
        img = img.resize((max(1, round(w * shrink)), max(1, round(h * shrink))), Image.Resampling.BILINEAR,
                         reducing_gap=3.0)
    a = np.asarray(img, dtype=np.float32) / 255.0
    smooth = _box3(a)  # a lone noisy pixel neither decides the inversion nor widens the digit's box
    fill, out, fill_value, rotated = _corner_fill(a)  # a rotated canvas's flat corners: neither paper nor ink
    if fill is not None and not _fill_matters(a, smooth, fill_value, rotated, invert):
        fill = out = None  # they are background as measured with them: the paper of a tight crop, say
    keep = None
    if fill is not None:
        keep = ~out
        if not keep.any():
            fill = out = keep = None
    if keep is None:
        ring = _ring(a)
    else:  # the border without the corners; where they are most of it, the rest of the image
        ring_keep = _ring(keep)
        ring = _ring(a)[ring_keep] if ring_keep.sum() >= max(8, 0.1 * ring_keep.size) else a[keep]
    paper = float(np.median(ring))
    s_in = smooth if keep is None else smooth[keep]
    inverted = (paper - float(s_in.min()) > float(s_in.max()) - paper) if invert == "auto" else bool(invert)
    if inverted:
        a, smooth, ring = 1.0 - a, 1.0 - smooth, 1.0 - ring
    background = float(np.median(ring))
    fit = _background_surface(a, keep)
    bg: float | np.ndarray = background
    level_range = None
    if fit is not None:
        surface, scatter = fit
        s_keep = surface if keep is None else surface[keep]
        spread = float(s_keep.max() - s_keep.min())
        s_peak = float((smooth - surface if keep is None else (smooth - surface)[keep]).max())
        near = _EVEN * _INK * max(s_peak, _BLANK)
        a_keep = a if keep is None else a[keep]
        # uneven: the surface varies more than the ink threshold allows, far more than its cells scatter about
        # it, and more of the image lies near it than near the one level (else it is no trend, but bent by the
        # ink's cells it was fit to: a tightly cropped digit's)
        if (spread > near and spread >= _TREND * scatter
                and np.count_nonzero(np.abs(a_keep - s_keep) <= near)
                > 1.1 * np.count_nonzero(np.abs(a_keep - background) <= near)):
            bg = surface
            lo, hi = float(s_keep.min()), float(s_keep.max())
            level_range = (1.0 - hi, 1.0 - lo) if inverted else (lo, hi)
    v = np.clip(a - bg, 0.0, None)
    sv = smooth - bg
    if out is not None:
        v[out] = 0.0
        sv[out] = 0.0
    peak = float(sv.max())
    how = dict(layout="digit", channels=1, size=size, inverted=inverted, background=paper,
               background_range=level_range)
    if fill is not None:
        how.update(fill=float(fill.mean()), fill_value=fill_value)
    canvas = np.zeros((size, size), dtype=np.float32)
    if peak < _BLANK:
        return canvas, Preparation(**how, contrast=max(peak, 0.0), blank=True)

    ys, xs = np.nonzero((v > _INK * peak) & (sv > _INK * peak))
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    hh, ww = a.shape
    edges = tuple(side for side, at in (("top", top == 0), ("bottom", bottom == hh), ("left", left == 0),
                                        ("right", right == ww)) if at)
    how.update(edges=edges, cover=(bottom - top) * (right - left) / (hh * ww))
    box = max(1, round(DIGIT_BOX * size))
    f = box / max(bottom - top, right - left)
    # everything that can land on the canvas: the bounding box and a canvas-wide margin around it
    m = math.ceil(size / f) + 1
    win = v[max(0, top - m):bottom + m, max(0, left - m):right + m]
    if f != 1.0:
        wh, ww = win.shape
        win = np.asarray(Image.fromarray(win, "F").resize((max(1, round(ww * f)), max(1, round(wh * f))),
                                                          Image.Resampling.BILINEAR), dtype=np.float32)
        win = np.clip(win, 0.0, None)
    total = float(win.sum())
    if total <= 0.0:
        return canvas, Preparation(**how, contrast=peak, blank=True)
    rows, cols = np.indices(win.shape)
    target = DIGIT_CENTRE * size
    dy = int(np.rint(target - float((win * rows).sum()) / total))
    dx = int(np.rint(target - float((win * cols).sum()) / total))
    # paste win at (dy, dx), clipped to the canvas
    y0, x0 = max(0, dy), max(0, dx)
    y1, x1 = min(size, dy + win.shape[0]), min(size, dx + win.shape[1])
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = win[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
    top_value = float(canvas.max())
    if top_value > 0.0 and top_value != 1.0:
        canvas = np.clip(canvas / top_value, 0.0, 1.0)
    box_wh = (round((right - left) / shrink), round((bottom - top) / shrink))
    return canvas, Preparation(**how, contrast=peak, box=box_wh, blank=top_value <= 0.0)


def _background_surface(a: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, float] | None:
    """The background under the bright ink of ``a`` (ink already bright) as a smooth surface of a's shape:
    a quadratic in x and y fit to the medians of a grid of cells (cells mostly outside ``keep`` are left
    out), first to the darker half of them, then to those near the last fit (not the ink's) until they no
    longer change; and the scatter of those cells about it (a standard deviation, from their median absolute
    deviation). None when too few cells are left to fit it (tiny images, or ink in most of the cells)."""
    h, w = a.shape
    cell = math.ceil(max(h, w) / _GRID)
    ny, nx = math.ceil(h / cell), math.ceil(w / cell)
    if cell < 4 or ny * nx < 12:  # a cell's median says little below 4x4 pixels (an MNIST-sized upload)
        return None
    vals, cy, cx = [], [], []
    for i in range(ny):
        for j in range(nx):
            block = a[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
            if keep is not None:
                k = keep[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
                if k.mean() < 0.5:
                    continue
                block = block[k]
            vals.append(float(np.median(block)))
            cy.append((i * cell + min((i + 1) * cell, h)) / 2.0)  # the cell's centre (a last cell may be cut)
            cx.append((j * cell + min((j + 1) * cell, w)) / 2.0)
    if len(vals) < 12:
        return None
    b = np.asarray(vals)
    half = max(h, w) / 2.0

    y, x = (np.asarray(cy) - h / 2.0) / half, (np.asarray(cx) - w / 2.0) / half
    A = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    sel = b <= np.median(b)  # start from the darker half of the cells: the ink (bright) is not in it
    for _ in range(20):
        coef = np.linalg.lstsq(A[sel], b[sel], rcond=None)[0]
        r = b - A @ coef
        spread = 1.4826 * float(np.median(np.abs(r[sel])))
        new = np.abs(r) <= max(3.0 * spread, 2 / 255)
        if new.sum() < max(6, 0.3 * len(b)):
            return None
        if np.array_equal(new, sel):
            break
        sel = new
    y = ((np.arange(h, dtype=np.float64) + 0.5 - h / 2.0) / half)[:, None]  # pixel centres, as the cells'
    x = (np.arange(w, dtype=np.float64) + 0.5 - w / 2.0) / half
    c0, cx_, cy_, cxx, cxy, cyy = coef
    surface = (c0 + cx_ * x + cy_ * y + cxx * x * x + cxy * x * y + cyy * y * y).astype(np.float32)
    # not far beyond the levels of the cells it was fit to: a quadratic bends away outside them (the half
    # cell between the outermost cells' centres and the image's edge is extrapolated)
    lo, hi = float(b[sel].min()), float(b[sel].max())
    margin = 0.25 * (hi - lo) + 1 / 255
    return np.clip(surface, lo - margin, hi + margin), spread


def _corner_fill(a: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, float | None, bool]:
    """The flat corners a rotated canvas leaves (see ``_FLAT``): (mask, mask grown over the blend of their
    edge with the picture, value 0 or 1, whether they are in all four corners at the angles a rotation
    leaves: one angle at the top left and bottom right, 90 degrees less it at the other two), or
    (None, None, None, False). A corner counts when its pixel is within _FLAT of 0 or 1 and the pixels of
    that value connected to it form a triangle on the corner (a staircase down a straight edge, reaching
    neither far side), and under _FILL_SHARE of the rest of the image has that value (else it is the paper,
    or the ink, itself: a tightly cropped digit's corner)."""
    from scipy import ndimage

    h, w = a.shape
    if h < 8 or w < 8:
        return None, None, None, False
    found: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    labels: dict[float, np.ndarray] = {}
    for fy in (1, -1):
        for fx in (1, -1):
            c = float(a[::fy, ::fx][0, 0])
            if _FLAT < c < 1.0 - _FLAT:
                continue
            value = 0.0 if c <= _FLAT else 1.0
            if value not in labels:
                labels[value] = ndimage.label(np.abs(a - value) <= _FLAT)[0]
            lab = labels[value][::fy, ::fx]
            comp = ndimage.binary_fill_holes(lab == lab[0, 0])  # holes: specks of JPEG noise
            legs = _wedge_legs(comp)
            if legs is None:
                continue
            # the triangle grown by _FILL_MARGIN pixels across its long edge, which the resampling blends
            # with the picture over a band that, along a shallow edge, is many pixels long
            lx, ly = legs
            y, x = (np.arange(h) + 0.5)[:, None], np.arange(w) + 0.5  # pixel centres, this corner at (0, 0)
            reach = (x / lx + y / ly - 1.0) / math.hypot(1.0 / lx, 1.0 / ly)
            grown = (reach <= _FILL_MARGIN) | _grow(comp, 1)
            found.append((comp[::fy, ::fx], grown[::fy, ::fx], value, math.degrees(math.atan2(ly, lx))))
    if not found:
        return None, None, None, False
    everything = np.zeros(a.shape, dtype=bool)
    for _, grown, _, _ in found:
        everything |= grown
    rest = a[~everything]
    fill, out = np.zeros(a.shape, dtype=bool), np.zeros(a.shape, dtype=bool)
    values, angles = [], []
    for comp, grown, value, angle in found:
        if rest.size and float(np.mean(np.abs(rest - value) <= _FLAT)) < _FILL_SHARE:
            fill |= comp
            out |= grown
            values.append(value)
            angles.append(angle)
    if not fill.any():
        return None, None, None, False
    rotated = len(angles) == 4 and len(set(values)) == 1 and max(  # top left, top right, bottom left, bottom right
        abs(angles[0] - angles[3]), abs(angles[1] - angles[2]), abs(angles[0] + angles[1] - 90.0)) <= 5.0
    return fill, out, max(values, key=values.count), rotated


def _fill_matters(a: np.ndarray, smooth: np.ndarray, value: float, rotated: bool, invert: bool | str) -> bool:
    """Whether flat corners of ``value`` must be set apart from the picture: they are a rotated canvas's four
    corners (see ``_corner_fill``), or, measured as part of the picture, they would be taken for ink: on the
    ink's side of the border's median (below it when the image is inverted, above it otherwise). Else they
    may be the paper of a tightly cropped digit, beside a slanted '1' say, and are measured as before."""
    if rotated:
        return True
    paper = float(np.median(_ring(a)))
    inverted = (paper - float(smooth.min()) > float(smooth.max()) - paper) if invert == "auto" else bool(invert)
    return value < paper - _FLAT if inverted else value > paper + _FLAT


def _wedge_legs(comp: np.ndarray) -> tuple[float, float] | None:
    """The legs (along the top, down the left side) of the corner triangle ``comp`` (a mask holding its
    top-left pixel), or None when it is no such triangle: each row a run from the left edge, the runs
    shrinking down a straight edge, reaching neither the right nor the bottom side."""
    h, w = comp.shape
    rows = np.flatnonzero(comp.any(axis=1))
    height = int(rows.max()) + 1
    runs = np.where(comp.all(axis=1), w, np.argmin(comp, axis=1))[:height].astype(np.float64)
    if height >= h or runs[0] >= w:
        return None
    if comp.sum() > 1.03 * runs.sum() + 2:  # parts not in a run from the left edge: not a staircase
        return None
    if np.any(runs > np.minimum.accumulate(runs) + 2.0 + 0.03 * runs[0]):  # a run longer than one above it
        return None
    if height < 3 or runs[0] <= 3 and height <= 3:  # too few rows to see the edge's course
        return float(runs[0]) + 0.5, float(height) + 0.5
    # a straight edge: the runs fall along a line from (row 0, runs[0]) to (row height, 0)
    y = np.arange(height) + 0.5
    slope, at0 = np.polyfit(y, runs, 1)
    if slope >= 0 or np.max(np.abs(runs - (at0 + slope * y))) > 2.0 + 0.1 * runs[0]:
        return None
    return max(float(at0), 1.0), max(-float(at0) / float(slope), 1.0)


def _grow(mask: np.ndarray, by: int) -> np.ndarray:
    """``mask`` grown by ``by`` pixels (a square neighbourhood)."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), dtype=bool), iterations=by)


def _ring(arr: np.ndarray) -> np.ndarray:
    """The outermost 1-pixel ring of a 2-D array, every pixel once (all of it when 1 or 2 wide)."""
    h, w = arr.shape
    if h <= 2 or w <= 2:
        return arr.ravel()
    return np.concatenate([arr[0].ravel(), arr[-1].ravel(), arr[1:-1, 0].ravel(), arr[1:-1, -1].ravel()])


def _box3(arr: np.ndarray) -> np.ndarray:
    """3x3 mean with the edges repeated."""
    p = np.pad(arr, 1, mode="edge")
    h, w = arr.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _border_mean(arr: np.ndarray) -> float:
    """Mean of the outermost 1-pixel ring of a 2-D array (one channel: only those are inverted)."""
    return float(_ring(arr).mean())


def load_upload(
    data: bytes, filename: str | None, channels: int, size: int, invert: bool | str = "auto", *,
    dataset: str | None = None, layout: str | None = None,
) -> torch.Tensor:
    """Uploaded bytes to a model input tensor (channels, size, size): decode + prepare.

    ``layout`` None: ``default_layout(channels, dataset)``, the digit layout for a one-channel
    digit model (or one whose ``dataset`` is not given), else fit."""
    return prepare_image(decode_image(data, filename), channels, size, invert=invert,
                         layout=layout or default_layout(channels, dataset))


def explain_upload(
    data: bytes, filename: str | None, channels: int, size: int, invert: bool | str = "auto", *,
    dataset: str | None = None, layout: str | None = None,
) -> str:
    """What ``load_upload`` with the same arguments does to this upload, in a sentence for the page (and
    that only its first frame is used, when it holds several)."""
    img = decode_image(data, filename)
    how = _prepare(img, channels, size, invert, layout or default_layout(channels, dataset))[1]
    frames, unit = frame_count(data)
    if frames > 1:
        how = dataclasses.replace(how, frames=frames, frame_unit=unit)
    return how.text()


def frame_count(data: bytes) -> tuple[int, str]:
    """(how many frames, what they are called) in an upload ``decode_image`` has read: an animated GIF, WebP
    or PNG has "frames", a TIFF "pages", a phone's multi-picture JPEG "images"; decode_image uses the first.
    (1, "frames") for a still image, or when the count cannot be read (a damaged later frame): then the page
    says nothing it does not know."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. an invalid APNG's, said when it was decoded
            with Image.open(io.BytesIO(data), formats=_available_formats()) as img:
                n = int(getattr(img, "n_frames", 1))  # headers only: no frame is decoded
                fmt = img.format
    except Exception:  # noqa: BLE001 - an upload's later frames may be damaged; the first decoded fine
        return 1, "frames"
    return max(n, 1), {"TIFF": "pages", "MPO": "images"}.get(fmt, "frames")
