"""How an upload becomes a digit model's input when the photo is not a clean scan: uneven lighting,
the constant corners a rotated scan leaves, animations; and the note said before its prediction.

Every image is drawn here with PIL: a thick '7' (or '3') on paper, then darkened across the page or
rotated on its canvas, and compared with the same digit on even paper.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from wsviz.data.uploads import _prepare, explain_upload, load_upload

ROOT = Path(__file__).resolve().parents[1]
PAPER, INK = 235, 40
# The digit layout measures a 1200x900 photo on a 224x168 working copy: two of its pixels are 10 of the photo.
TOL = 10


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def digit(which: str = "7", size=(1200, 900), paper: int = PAPER, ink: int = INK) -> Image.Image:
    """A thick pen digit on even paper, about 360x500 pixels in the middle of a 1200x900 photo."""
    img = Image.new("L", size, paper)
    d = ImageDraw.Draw(img)
    if which == "7":
        d.line([(420, 200), (760, 200), (560, 690)], fill=ink, width=40, joint="curve")
    else:  # a '3': two bowls open to the left
        d.arc((430, 180, 730, 440), 200, 90, fill=ink, width=40)
        d.arc((410, 420, 750, 720), 270, 160, fill=ink, width=40)
    return img


def ink_box(img: Image.Image, paper: int = PAPER) -> tuple[int, int]:
    """(width, height) of what was drawn: pixels at least 20 levels off the paper (the ink threshold: a tenth
    of the ink's contrast)."""
    a = np.asarray(img, dtype=np.int16)
    ink = np.abs(a - paper) >= 20
    ys, xs = np.nonzero(ink)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def darkened(img: Image.Image, right: int, paper: int = PAPER) -> Image.Image:
    """The photo with its lighting falling off to the right: the paper goes from ``paper`` to ``right``."""
    a = np.asarray(img, dtype=np.float32)
    gain = np.linspace(1.0, right / paper, a.shape[1], dtype=np.float32)[None, :]
    return Image.fromarray(np.clip(np.rint(a * gain), 0, 255).astype(np.uint8))


def vignetted(img: Image.Image, corner: int, paper: int = PAPER) -> Image.Image:
    """Bright in the middle, ``corner`` in the corners (a phone photo under one lamp)."""
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape
    y, x = np.mgrid[0:h, 0:w]
    r2 = ((x - w / 2) / (w / 2)) ** 2 / 2 + ((y - h / 2) / (h / 2)) ** 2 / 2
    gain = 1.0 - (1.0 - corner / paper) * r2
    return Image.fromarray(np.clip(np.rint(a * gain), 0, 255).astype(np.uint8))


def prepared(img: Image.Image):
    return _prepare(img, 1, 28, "auto", "digit")


def close_inputs(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()
    return float(d.mean()), float(d.max())


# ---------------------------------------------------------------------------------------
# uneven lighting


@pytest.mark.parametrize("which", ["7", "3"])
@pytest.mark.parametrize(("kind", "level"), [("darkened", 195), ("darkened", 175), ("darkened", 130),
                                              ("vignetted", 170)])
def test_paper_darkening_across_the_photo_is_not_measured_as_the_digit(which, kind, level):
    """Before, paper darkening from 235 to 195 made the '7's box 782x900 (the digit is 364x525) and the
    shipped models read it as 8, 7, 1."""
    even = digit(which)
    photo = darkened(even, level) if kind == "darkened" else vignetted(even, level)
    t0, how0 = prepared(even)
    t, how = prepared(photo)
    want = ink_box(even)
    assert how0.box is not None and max(abs(a - b) for a, b in zip(how0.box, want)) <= TOL, (how0.box, want)
    assert how.box is not None and max(abs(a - b) for a, b in zip(how.box, want)) <= TOL, (how.box, want)
    mean, top = close_inputs(t, t0)
    assert mean < 0.02 and top < 0.35, (mean, top)
    text = how.text()
    assert "uneven" in text and "set to black" in text, text


def test_the_explanation_gives_the_paper_s_range_when_it_is_uneven():
    data = png(darkened(digit(), 175))
    text = explain_upload(data, "photo.png", 1, 28)
    assert "brightness 0.69 to 0.92" in text, text  # 175/255 at the right edge, 235/255 at the left
    even = explain_upload(png(digit()), "photo.png", 1, 28)
    assert "brightness 0.92)" in even and "uneven" not in even, even


def test_white_ink_on_a_dark_board_with_uneven_lighting():
    """Chalk on a board (no inversion): the board brightens towards one side."""
    even = digit(paper=40, ink=220)
    board = Image.fromarray(np.clip(np.asarray(even, dtype=np.int16)
                                    + np.linspace(0, 70, 1200, dtype=np.int16)[None, :], 0, 255).astype(np.uint8))
    t0, how0 = prepared(even)
    t, how = prepared(board)
    assert not how.inverted and not how0.inverted
    assert max(abs(a - b) for a, b in zip(how.box, ink_box(even, paper=40))) <= TOL, how.box
    assert close_inputs(t, t0)[0] < 0.02


# ---------------------------------------------------------------------------------------
# the constant corners of a rotated scan


@pytest.mark.parametrize("angle", [3, 10, 30])
@pytest.mark.parametrize("expand", [False, True])
def test_black_corners_of_a_rotated_scan_are_background(angle, expand):
    """Before, a '7' rotated by 10 degrees on its canvas (black corners) measured 1200x900, the whole
    image, and the page said 'the digit (1200x900 pixels in the upload)'."""
    photo = digit().rotate(angle, resample=Image.Resampling.BILINEAR, expand=expand, fillcolor=0)
    upright = digit().rotate(angle, resample=Image.Resampling.BILINEAR, expand=expand, fillcolor=PAPER)
    t0, how0 = prepared(upright)
    t, how = prepared(photo)
    want = ink_box(upright)
    assert max(abs(a - b) for a, b in zip(how.box, want)) <= TOL, (how.box, want)
    mean, top = close_inputs(t, t0)
    assert mean < 0.01 and top < 0.2, (mean, top)
    text = how.text()
    assert "corner" in text and "background" in text, text
    assert f"{how.box[0]}×{how.box[1]} pixels in the upload" in text


def test_transparent_corners_of_a_rotated_chalk_digit_are_background():
    """A white-on-black digit rotated with transparent corners: composited over white, they are as bright
    as the chalk."""
    chalk = digit(paper=30, ink=230).convert("RGBA")
    rotated = chalk.rotate(12, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(0, 0, 0, 0))
    plain = digit(paper=30, ink=230).rotate(12, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=30)
    data = png(rotated)
    t = load_upload(data, "chalk.png", 1, 28)
    t0, how0 = prepared(plain)
    text = explain_upload(data, "chalk.png", 1, 28)
    want = ink_box(plain, paper=30)
    assert f"{how0.box[0]}×{how0.box[1]} pixels" in text or any(
        f"{want[0] + dx}×{want[1] + dy} pixels" in text for dx in range(-TOL, TOL + 1) for dy in range(-TOL, TOL + 1)), text
    assert close_inputs(t, t0)[0] < 0.01


def test_a_digit_touching_the_image_corner_is_not_taken_for_fill():
    """A tightly cropped pure-black '7' touches the top-left corner with ink of exactly 0: it is the digit,
    not a rotated scan's corner."""
    pen = digit(paper=255, ink=0)
    tight = pen.crop(pen.point(lambda v: 255 - v).getbbox())
    assert tight.getpixel((0, 0)) == 0  # the bar starts in the corner
    t, how = prepared(tight)
    assert not how.blank and max(abs(a - b) for a, b in zip(how.box, tight.size)) <= 3, (how.box, tight.size)
    margin = Image.new("L", (tight.width + 200, tight.height + 200), 255)
    margin.paste(tight, (100, 100))
    assert close_inputs(t, prepared(margin)[0])[0] < 0.01
    assert "corner" not in how.text()


# ---------------------------------------------------------------------------------------
# the page says when the digit's box reaches the edge or is the whole image


def test_a_digit_cut_off_at_the_edge_is_said_to_be():
    cut = digit().crop((0, 0, 1200, 500))  # the '7's leg runs off the bottom
    text = explain_upload(png(cut), "cut.png", 1, 28)
    assert "reaches the bottom edge of the image" in text and "cut off" in text, text
    whole = explain_upload(png(digit()), "whole.png", 1, 28)
    assert "edge" not in whole and "cut off" not in whole, whole


def test_a_box_that_is_the_whole_image_is_said_to_be():
    """When the background cannot be told from the digit (noise everywhere), the box is the whole image."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8))
    text = explain_upload(png(noise), "noise.png", 1, 28)
    assert "whole image" in text, text


# ---------------------------------------------------------------------------------------
# what the shipped models read


@pytest.mark.parametrize("variant", ["scale-msws-vanilla", "scale-resnet20", "rot-cnn"])
def test_shipped_models_read_the_unevenly_lit_and_rotated_photos_as_on_even_paper(variant):
    """Before: darkening 235->195 was read [3, 3, 7] by these models, 235->175 [8, 3, 2] (7 on even paper)."""
    from wsviz.training.checkpoint import load_checkpoint

    if not (ROOT / "checkpoints" / variant / "card.json").is_file():
        pytest.skip(f"needs the shipped checkpoint {variant}")
    model = load_checkpoint(ROOT / "checkpoints" / variant)[0].eval()
    photos = [digit(), darkened(digit(), 195), darkened(digit(), 175), vignetted(digit(), 170),
              digit().rotate(10, resample=Image.Resampling.BILINEAR, fillcolor=0)]
    with torch.no_grad():
        reads = [int(model(load_upload(png(p), "7.png", 1, 28).unsqueeze(0)).argmax()) for p in photos]
    assert reads == [7] * len(photos), reads


# ---------------------------------------------------------------------------------------
# input_note: the warning said before a prediction


def test_input_note_does_not_warn_about_the_size_of_a_digit_photo():
    """The digit layout scales the digit's own box to 20x20 whatever the photo's size, as MNIST's digits were
    scaled from their scans: a 640x480 photo read at 99.9% was said to have been 'shrunk from 640×480 to 28×28
    pixels', its prediction 'says little about the model'."""
    from wsviz.data.inputs import input_note

    photo = png(digit().resize((640, 480), Image.Resampling.BILINEAR))
    for dataset in ("mnist5k-scale", "mnist", None):
        assert input_note(photo, 1, 28, dataset) is None, dataset


def test_input_note_warns_when_a_big_image_is_shrunk_whole():
    """The fit layout shrinks the whole image: a photo four times the input's size loses its detail."""
    from wsviz.data.inputs import input_note

    photo = png(digit().resize((640, 480), Image.Resampling.BILINEAR))
    note = input_note(photo, 1, 28, "fashion-mnist")
    assert note is not None and "it was shrunk from 640×480 to 28×28 pixels" in note and "fashion-mnist" in note
    note = input_note(png(digit().resize((640, 480)).convert("RGB")), 3, 32, "cifar10")
    assert note is not None and "shrunk from 640×480 to 32×32" in note and "colour" in note
    assert input_note(png(digit().resize((100, 75))), 1, 28, "fashion-mnist") is None  # short side 75 <= 4 x 28


def test_input_note_still_says_a_colour_photo_was_turned_grey_for_a_digit_model():
    from wsviz.data.inputs import input_note

    red = Image.merge("RGB", [digit().resize((640, 480))] + [Image.new("L", (640, 480), 30)] * 2)
    note = input_note(png(red), 1, 28, "mnist5k-scale")
    assert note is not None and "it is a colour image and was turned grey" in note and "shrunk" not in note, note
    assert input_note(b"not an image", 1, 28, "mnist") is None  # the decoder proper says what is wrong


# ---------------------------------------------------------------------------------------
# animations: only the first frame is used, and the page says so


def animation(fmt: str, frames: list[Image.Image], **kw) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    return buf.getvalue()


def fade_in(n: int) -> list[Image.Image]:
    """A '7' fading in from black: the first frame is all black."""
    seven = digit(size=(1200, 900)).resize((240, 180))
    return [Image.eval(seven, lambda v, k=k: v * k // (n - 1)) for k in range(n)]


@pytest.mark.parametrize(("fmt", "kw"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_an_animation_fading_in_from_black_says_only_its_first_frame_was_used(fmt, kw):
    """Before, an animation fading in from black said only 'No digit found', and nothing about its frames."""
    data = animation(fmt, fade_in(3), **kw)
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3
    assert float(load_upload(data, "anim", 1, 28).abs().max()) == 0.0  # the first frame: black
    text = explain_upload(data, "anim", 1, 28)
    assert "only its first frame is used (first of 3 frames)" in text and "No digit found" in text, text
    fit = explain_upload(data, "anim", 3, 32)
    assert "(first of 3 frames)" in fit and "fit inside 32×32" in fit, fit


def test_a_multi_page_tiff_says_only_its_first_page_was_used():
    data = animation("TIFF", [digit().resize((240, 180)), Image.new("L", (240, 180), 0)])
    text = explain_upload(data, "scan.tif", 1, 28)
    assert "(first of 2 pages)" in text and text.count("first of") == 1 and "No digit found" not in text, text


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_a_single_frame_upload_says_nothing_about_frames(fmt):
    buf = io.BytesIO()
    digit().resize((240, 180)).save(buf, fmt)
    text = explain_upload(buf.getvalue(), "still", 1, 28)
    assert "first of" not in text and "frame" not in text, text
