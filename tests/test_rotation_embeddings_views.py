"""The Rotation and Embeddings pages say what they measure: each angle counted once, FLOPs as the
accounting counts them (no claimed match that does not hold), embeddings of the checkpoint as it is now,
the embedded layer named, and a checkpoint that cannot be used named with why (AppTest, shipped checkpoints).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-rotemb-runs-"))

from conftest import copy_checkpoint, needs, open_app, wait_for  # noqa: E402

from wsviz.analysis.rotation import distinct_angles, flops_group, flops_matches, rotation_summary  # noqa: E402
from wsviz.analysis.sweeps import SweepResult  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"


def unescaped(text: str) -> str:
    """Markdown as read: the pages escape names and reasons (pages._shared.plain)."""
    return str(text).replace("\\", "")


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
    parts += [w.value for w in at.warning] + [e.value for e in at.error]
    return unescaped("\n".join(str(p) for p in parts))


# ------------------------------------------------------------------------- rotation: each angle once
def test_rotation_summary_counts_360_as_0_once():
    angles = np.array([0.0, 90.0, 180.0, 270.0, 360.0])
    res = SweepResult("angle", angles, accuracy={"m": np.array([1.0, 0.2, 0.4, 0.6, 1.0])},
                      agreement={"m": np.array([1.0, 0.3, 0.5, 0.7, 1.0])})
    (s,) = rotation_summary(res)
    assert s.angles == 4
    assert s.mean_accuracy == pytest.approx(0.55)  # not 0.64, the mean over the 5 listed values
    assert (s.worst_angle, s.worst_accuracy) == (90.0, pytest.approx(0.2))
    assert s.mean_agreement == pytest.approx(0.5)  # 90, 180, 270: 0 (and 360, which is 0) left out
    assert list(distinct_angles([0, 15, 360, -90, 270, 720, 359.9999999])) == [0, 1, 3]
    assert len(distinct_angles(np.arange(0, 360 + 1e-9, 15))) == 24


def test_rotation_page_means_count_each_angle_once():
    variant = needs("scale-resnet20")[0]  # not trained on rotations: 0 (and 360) is its best angle by far
    at = open_app("pages/rotation.py", [variant])
    at.slider[0].set_value(100).run()
    at.select_slider[0].set_value(45).run()
    next(b for b in at.button if b.label == "Run the rotation sweep").click().run()
    assert not at.exception, at.exception
    wait_for(at, lambda a: any("mean accuracy" in d.value.columns for d in a.dataframe), "the rotation sweep")
    res = at.session_state["rot-work"].future.result()
    acc = res.accuracy[variant]
    assert list(res.values) == [0, 45, 90, 135, 180, 225, 270, 315, 360]
    distinct = float(np.mean(acc[:-1]))
    assert float(np.mean(acc)) - distinct > 0.01  # the doubled 0 would show
    table = next(d.value for d in at.dataframe if "mean accuracy" in d.value.columns)
    row = table.iloc[0]
    assert row["mean accuracy"] == pytest.approx(distinct)
    assert row["distinct angles"] == 8
    worst = int(np.argmin(acc[:-1]))
    assert row["worst angle"] == 45.0 * worst and row["accuracy at the worst angle"] == pytest.approx(acc[worst])
    assert row["agreement with 0° (mean over the other angles)"] == pytest.approx(
        float(np.mean(res.agreement[variant][1:-1])))
    assert "over the 8 distinct angles" in texts(at)


# ------------------------------------------------------------------------- rotation: FLOPs as counted
def test_rotation_page_states_flops_from_the_accounting_and_claims_no_match_that_fails():
    from wsviz.models import summarize
    from wsviz.training.checkpoint import load_checkpoint

    trio = needs("rot-cnn", "rot-repeat-swish-c8", "rot-steerable-c8")
    at = open_app("pages/rotation.py", trio)
    assert not at.error, [e.value for e in at.error]
    shown = texts(at)
    assert "matched in inference FLOPs" not in shown and "matched in FLOPs" not in shown
    table = next(d.value for d in at.dataframe if "FLOPs per image" in d.value.columns).set_index("model")
    assert list(table.index) == trio
    s = {v: summarize(load_checkpoint(CKPT / v)[0]) for v in trio}
    for v in trio:
        assert table.loc[v, "FLOPs per image"] == s[v].flops
        assert table.loc[v, "params"] == s[v].float_params
        assert table.loc[v, "effective params"] == s[v].effective_params
    rep, ste = s["rot-repeat-swish-c8"].flops, s["rot-steerable-c8"].flops
    gap = abs(rep - ste) / ste
    assert 0.05 < gap < 0.08  # 54.07 vs 57.78 MFLOPs at width 0.25: not a match
    assert (f"rot-repeat-swish-c8 ({rep / 1e6:.2f} MFLOPs) and rot-steerable-c8 ({ste / 1e6:.2f} MFLOPs): "
            f"matched within {100 * gap:.1f}%") in shown
    assert "matched within 6.4%" in shown
    assert not any(f"rot-cnn ({s['rot-cnn'].flops / 1e6:.2f} MFLOPs) and" in line for line in shown.splitlines())


def test_flops_pairs_come_from_the_cards():
    import json

    cards = {v: json.loads((CKPT / v / "card.json").read_text())
             for v in needs("rot-cnn", "rot-repeat-linear-c4", "rot-steerable-c4", "rot-steerable-c8")}
    assert [flops_group(cards[v]) for v in cards] == [None, "C4", "C4", "C8"]
    (m,) = flops_matches(cards, {v: c["flops"] for v, c in cards.items()})
    assert (m.repeat, m.steerable) == ("rot-repeat-linear-c4", "rot-steerable-c4") and m.gap < 0.001


# ------------------------------------------------------------------------- a temporary checkpoint folder
def rewrite_weights(folder: Path, change) -> None:
    """The weights rewritten in place (a retraining at the same folder), with a newer modification time."""
    from safetensors.torch import load_file, save_file

    w = folder / "weights.safetensors"
    tensors = load_file(str(w))
    save_file({k: change(k, v).contiguous() for k, v in tensors.items()}, str(w))
    later = w.stat().st_mtime + 2
    os.utime(w, (later, later))


def chart_specs(at) -> list[str]:
    return [c.proto.spec for c in at.get("plotly_chart")]


# ------------------------------------------------------------------------- embeddings
def test_embeddings_follow_a_checkpoint_retrained_at_the_same_folder(checkpoints):
    import torch

    needs("rot-cnn")
    folder = copy_checkpoint("rot-cnn", checkpoints / "rot-cnn-retrained")
    at = open_app("pages/embeddings.py", ["rot-cnn-retrained"])
    at.slider[0].set_value(200).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    before = chart_specs(at)
    assert len(before) == 1
    at.run()
    assert chart_specs(at) == before  # nothing changed: the same picture (from the cache)
    gen = torch.Generator().manual_seed(0)
    rewrite_weights(folder, lambda k, v: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen)
                    if k.startswith("features") and k.endswith("weight") and v.ndim == 4 else v)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    after = chart_specs(at)
    assert len(after) == 1 and after != before, "the page showed the old checkpoint's embedding"


def test_embeddings_page_names_the_layer_and_the_variance_before_alignment():
    from wsviz.analysis.embeddings import embedded_layer
    from wsviz.training.checkpoint import load_checkpoint

    pair = needs("rot-cnn", "rot-steerable-c8")
    at = open_app("pages/embeddings.py", pair)
    at.slider[0].set_value(200).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    captions = [c.value for c in at.caption]
    for v in pair:
        layer = embedded_layer(load_checkpoint(CKPT / v)[0])
        assert layer.describe() in captions
        assert layer.head == (64, 10)
    assert "Embedded: the 22 values per image at the `embedding` tap, the input of the classifier head " \
           "(22→64→10): read before its 64-unit hidden layer, not that layer's output." in captions
    pca = [c for c in captions if c.startswith("PCA explained variance")]
    assert len(pca) == 2
    assert pca[0].startswith("PCA explained variance of rot-cnn's own components: ") and "before" not in pca[0]
    assert pca[1].startswith("PCA explained variance of rot-steerable-c8's own components: ")
    assert pca[1].endswith("(before the alignment: the rotated axes drawn here are not those components)")


def test_embeddings_page_shows_the_variant_that_works_beside_one_that_fails(checkpoints):
    import torch

    needs("rot-cnn")
    copy_checkpoint("rot-cnn", checkpoints / "good")
    bad = copy_checkpoint("rot-cnn", checkpoints / "diverged")
    rewrite_weights(bad, lambda k, v: torch.full_like(v, float("nan")) if k == "features.0.weight" else v)
    at = open_app("pages/embeddings.py", ["diverged", "good"])
    at.slider[0].set_value(200).run()
    assert not at.exception, at.exception
    errors = [unescaped(e.value) for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("Variant diverged cannot be used: ") and "NaN" in errors[0]
    assert len(at.get("plotly_chart")) == 1  # the working variant, on its own
    assert any(c.value.startswith("Embedded: the 22 values") for c in at.caption)


# ------------------------------------------------------------------------- rotation zoo button
def test_rotation_zoo_button_names_each_checkpoint_it_leaves_out(checkpoints):
    import pages._shared as shared

    needs("rot-cnn", "rot-steerable-c8")
    copy_checkpoint("rot-cnn", checkpoints / "rot-cnn")
    (checkpoints / "rot-steerable-c8").mkdir()
    shutil.copy2(CKPT / "rot-steerable-c8" / "card.json", checkpoints / "rot-steerable-c8" / "card.json")
    at = open_app("pages/rotation.py", [])
    why = shared.refused_checkpoints()["rot-steerable-c8"]
    next(b for b in at.button if b.label.startswith("Compare the rotation zoo instead")).click().run()
    assert not at.exception, at.exception
    assert at.session_state["variants"] == ["rot-cnn"]
    warnings = [unescaped(w.value) for w in at.warning]
    assert f"rot-steerable-c8 is left out of the rotation zoo: {why}" in warnings
    assert any(w.startswith("rot-repeat-swish-c8 is left out of the rotation zoo: there is no checkpoint "
                            "rot-repeat-swish-c8 in ") for w in warnings), warnings
    at.run()
    assert not any("left out of the rotation zoo" in unescaped(w.value) for w in at.warning)  # said once


# ------------------------------------------------------------------------- rotation: what a result belongs to
def _run_rotation(at, digits: int = 100, step: float = 45):
    at.slider[0].set_value(digits).run()
    at.select_slider[0].set_value(step).run()
    next(b for b in at.button if b.label == "Run the rotation sweep").click().run()
    assert not at.exception, at.exception
    wait_for(at, lambda a: any("mean accuracy" in d.value.columns for d in a.dataframe), "the rotation sweep")


def test_rotation_page_drops_a_result_when_its_checkpoint_is_retrained_in_place(checkpoints):
    import torch

    needs("rot-cnn")
    folder = copy_checkpoint("rot-cnn", checkpoints / "rot-cnn-retrained")
    at = open_app("pages/rotation.py", ["rot-cnn-retrained"])
    _run_rotation(at)
    rewrite_weights(folder, lambda k, v: torch.zeros_like(v) if k == "features.0.weight" else v)
    at.run()
    assert not at.exception, at.exception
    assert not any("mean accuracy" in d.value.columns for d in at.dataframe), "the old checkpoint's sweep is shown"
    assert "The settings changed since the last rotation sweep" in texts(at)


def test_rotation_page_leaves_out_a_model_of_other_classes_and_says_why(checkpoints):
    import json

    needs("rot-cnn")
    copy_checkpoint("rot-cnn", checkpoints / "digits")
    other = copy_checkpoint("rot-cnn", checkpoints / "clothes")
    card = json.loads((other / "card.json").read_text())
    card["dataset"] = "fashion-mnist"  # the same network, trained on ten classes that are not digits
    (other / "card.json").write_text(json.dumps(card))
    at = open_app("pages/rotation.py", ["clothes", "digits"])
    assert any(unescaped(w.value).startswith("clothes is left out of the sweep: the mnist5k test digits cannot "
                                             "score it (it was trained on fashion-mnist")
               for w in at.warning), [w.value for w in at.warning]
    _run_rotation(at)
    res = at.session_state["rot-work"].future.result()
    assert list(res.accuracy) == ["digits"]
    table = next(d.value for d in at.dataframe if "mean accuracy" in d.value.columns)
    assert list(table.iloc[:, 0]) == ["digits"]


def test_embeddings_open_on_the_data_the_variants_were_trained_on_and_warn_about_other_data():
    pair = needs("scale-msws-vanilla", "scale-msws-shared")  # both trained on mnist5k-scale
    at = open_app("pages/embeddings.py", pair)
    data = next(s for s in at.selectbox if s.label == "Data")
    assert data.value == "mnist5k-scale"
    assert not at.warning, [w.value for w in at.warning]
    data.set_value("mnist5k-rot").run()
    assert not at.exception
    warned = [unescaped(w.value) for w in at.warning]
    assert len(warned) == 1 and "trained on mnist5k-scale" in warned[0] and "mnist5k-rot" in warned[0], warned
    assert all(v in warned[0] for v in pair)


def test_alignment_says_reflected_only_when_it_reflects():
    from wsviz.analysis.embeddings import Projection, align

    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 2))
    turn = np.array([[np.cos(1.0), -np.sin(1.0)], [np.sin(1.0), np.cos(1.0)]])
    idx = np.arange(50)
    ref = Projection(coords=a, index=idx, method="pca", explained_variance=None)
    rotated = align(ref, Projection(coords=a @ turn * 3.0, index=idx, method="pca", explained_variance=None))
    mirrored = align(ref, Projection(coords=a * np.array([-1.0, 1.0]), index=idx, method="pca", explained_variance=None))
    assert rotated.disparity < 1e-9 and mirrored.disparity < 1e-9
    assert not rotated.reflected and mirrored.reflected
    assert "reflected" not in rotated.describe("ref") and "Rotated and scaled onto ref's layout" in rotated.describe("ref")
    assert mirrored.describe("ref").startswith("Rotated, reflected and scaled onto ref's layout")


def test_a_missing_umap_package_is_said_once_not_blamed_on_each_variant(monkeypatch):
    import importlib.util

    pair = needs("scale-msws-vanilla", "scale-msws-shared")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "umap" else real(name, *a))
    at = open_app("pages/embeddings.py", pair)
    next(s for s in at.selectbox if s.label == "Projection").set_value("umap").run()
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "umap-learn" in errors[0] and "cannot be used" not in errors[0], errors


def test_embeddings_offer_the_image_folder_a_variant_was_trained_on(checkpoints, tmp_path):
    """A variant trained on an image folder opens on that folder's test split (not on a digit set it never saw,
    with a warning that the data is not its own): the folder is offered, chosen first and embedded."""
    import json

    from PIL import Image

    from wsviz.data.datasets import load_split

    needs("scale-resnet20")
    images = tmp_path / "digits-folder"
    te = load_split("mnist5k", "test")
    for c in range(10):
        (images / f"c{c}").mkdir(parents=True)
        for j, i in enumerate((te.labels == c).nonzero()[:10, 0].tolist()):
            Image.fromarray((te.images[i, 0].numpy() * 255).astype(np.uint8)).save(images / f"c{c}" / f"{j}.png")
    folder = copy_checkpoint("scale-resnet20", checkpoints / "on-a-folder")
    card = json.loads((folder / "card.json").read_text())
    card["dataset"] = f"folder:{images}"
    (folder / "card.json").write_text(json.dumps(card))
    at = open_app("pages/embeddings.py", ["on-a-folder"])
    data = next(s for s in at.selectbox if s.label == "Data")
    assert data.value == f"folder:{images}", data.options
    assert not at.warning, [unescaped(w.value) for w in at.warning]
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) == 1
    data.set_value("mnist5k").run()  # the digit sets stay on offer, with the warning
    warned = [unescaped(w.value) for w in at.warning]
    assert len(warned) == 1 and f"trained on folder:{images}" in warned[0], warned
    shutil.rmtree(images)  # a folder that is gone is not offered: the page says why and opens on a digit set
    at = open_app("pages/embeddings.py", ["on-a-folder"])
    assert next(s for s in at.selectbox if s.label == "Data").value == "mnist5k-rot"
    warned = [unescaped(w.value) for w in at.warning]
    assert any(w.startswith(f"on-a-folder was trained on folder:{images}, which cannot be read here: ") for w in warned)
