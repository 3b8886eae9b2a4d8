"""What the Compare page is given is what it shows: two uploads with one file name stay two images, a
prediction on a blank input says it is about nothing, and a link naming a variant that is not here says so."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-compare-inputs-runs-"))

from conftest import needs, open_app  # noqa: E402


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def _digit(label: int) -> bytes:
    from wsviz.data.datasets import load_split

    te = load_split("mnist5k", "test")
    a = te.images[int((te.labels == label).nonzero()[0, 0]), 0].numpy()
    return _png(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8))


def _attribution_classes(at) -> list[str]:
    import json

    from wsviz.figures import title_parts

    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if (json.loads(c.proto.spec)["layout"].get("title") or {}).get("text", "").startswith("saliency"))
    heads = [title_parts(a["text"])[0] for a in spec["layout"]["annotations"]]
    return [h.split(" → ")[1] for h in heads if " → " in h]


def test_two_uploads_with_one_name_stay_two_images():
    at = open_app("pages/compare.py", needs("scale-msws-vanilla"))
    at.file_uploader[0].set_value([("image.png", _digit(3), "image/png"), ("image.png", _digit(7), "image/png")]).run()
    assert not at.exception
    assert [h.value for h in at.subheader][:2] == ["image.png", "image (2).png"]
    table = at.dataframe[0].value
    assert list(table["image"]) == ["image.png", "image (2).png"] and list(table["predicted"]) == [3, 7]
    menu = next(s for s in at.selectbox if s.label == "Image for feature maps and attributions")
    assert menu.options == ["image.png", "image (2).png"]
    next(s for s in at.selectbox if s.label == "Method").set_value("saliency").run()
    menu = next(s for s in at.selectbox if s.label == "Image for feature maps and attributions")
    menu.set_value("image (2).png").run()
    assert not at.exception
    assert _attribution_classes(at) == ["7"]  # the second upload's maps, not the first's


def test_a_prediction_on_a_blank_input_says_so():
    at = open_app("pages/compare.py", needs("scale-msws-vanilla"))
    clear = np.zeros((40, 40, 4), np.uint8)  # fully transparent: no digit
    at.file_uploader[0].set_value([("clear.png", _png(clear, "RGBA"), "image/png"),
                                   ("seven.png", _digit(7), "image/png")]).run()
    assert not at.exception
    table = at.dataframe[0].value
    blank = dict(zip(table["image"], table["input"]))
    assert blank["clear.png"] == "blank input (one colour)"
    assert not isinstance(blank["seven.png"], str)  # a real digit: no such note
    assert any("about nothing" in c.value for c in at.caption)


def test_a_link_naming_an_unknown_variant_says_so():
    shipped = needs("scale-msws-shared")[0]
    at = open_app(url_variants=f"{shipped},scale-msws-sharedd")
    assert at.session_state["variants"] == [shipped]
    said = [w.value.replace("\\", "") for w in at.sidebar.warning if "no such variant" in w.value]
    assert len(said) == 1 and "scale-msws-sharedd" in said[0] and "others it named" in said[0]
    at = open_app(url_variants="no-such-model")
    said = [w.value.replace("\\", "") for w in at.sidebar.warning if "no such variant" in w.value]
    assert len(said) == 1 and "no-such-model" in said[0] and "default variants" in said[0]
    at = open_app(url_variants=shipped)
    assert not [w for w in at.sidebar.warning if "no such variant" in w.value]


def _folder_model(checkpoints, name: str, augment: str):
    import json

    from conftest import copy_checkpoint

    folder = copy_checkpoint(needs("scale-resnet20")[0], checkpoints / name)
    card = json.loads((folder / "card.json").read_text())
    card["dataset"] = "folder:/data/photos"
    card["train_config"] = {**card.get("train_config", {}), "augment": augment}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def test_an_upload_reaches_an_imagenet_preset_model_as_its_training_evaluated_images(checkpoints):
    """A model trained on an image folder with the imagenet preset was tested on images resized to 8/7 of its
    input and centre-cropped: a letterboxed upload (black bars, the whole photo smaller) is another input."""
    from PIL import Image

    from wsviz.data.loaders import transforms_for
    from wsviz.training.checkpoint import load_checkpoint

    _folder_model(checkpoints, "crop-net", "imagenet")
    _folder_model(checkpoints, "box-net", "none")
    wide = np.zeros((60, 160), np.uint8)
    wide[10:50, 20:60], wide[5:55, 90:140] = 255, 128  # a wide photo: letterboxing and cropping differ
    data = _png(wide)
    model, _ = load_checkpoint(checkpoints / "crop-net")
    own = transforms_for("imagenet", 28, train=False, from_pil=True)(Image.open(io.BytesIO(data)).convert("L"))
    x = own.float().unsqueeze(0) / 255.0
    import torch

    with torch.no_grad():
        want = torch.softmax(model(x), 1)[0]
    at = open_app("pages/compare.py", ["crop-net", "box-net"])
    at.file_uploader[0].set_value([("wide.png", data, "image/png")]).run()
    assert not at.exception and not at.error
    table = at.dataframe[0].value
    row = table[table["variant"] == "crop-net"].iloc[0]
    assert row["predicted"] == int(want.argmax()) and abs(row["confidence"] - float(want.max())) < 1e-5
    said = [c.value for c in at.caption if c.value.startswith("Input for")]
    assert any("crop-net" in c and "centre 28×28 cropped" in c for c in said), said
    assert any("box-net" in c and "fit inside 28×28" in c for c in said), said


def test_upload_layout_follows_the_cards_data_and_evaluation_transform():
    from wsviz.training.cards import upload_layout

    folder = {"dataset": "folder:/data/photos"}
    assert upload_layout(1, {"dataset": "mnist5k-scale"}) == "digit"
    assert upload_layout(1, {}) == "digit"  # no dataset said: every shipped one-channel model is a digit model
    assert upload_layout(1, {"dataset": "fashion-mnist"}) == "fit"
    assert upload_layout(3, {**folder, "train_config": {"augment": "imagenet"}}) == "crop"
    assert upload_layout(3, {**folder, "train_config": {"augment": "none"}}) == "fit"
    assert upload_layout(3, {**folder, "train_config": {"augment": "cifar"}}) == "fit"  # cifar evaluates unchanged
    assert upload_layout(1, {"dataset": "mnist", "train_config": {"augment": "imagenet"}}) == "digit"
