"""The Models page's tables say what the cards and the accounting say, and nothing made up when a card
lacks a field; the sharing map's layer axis runs in the order the network applies its layers."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-models-views-runs-"))

from conftest import copy_checkpoint, needs, open_app  # noqa: E402


def _variants_table(at):
    return next(d.value for d in at.dataframe if "test accuracy (this checkpoint)" in d.value.columns)


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def test_a_card_missing_its_counts_shows_blanks_not_a_made_up_compression(checkpoints):
    needs("scale-msws-shared")
    whole = copy_checkpoint("scale-msws-shared", checkpoints / "whole")
    for name, drop in (("no-unique", ("unique_params",)), ("no-effective", ("effective_params", "flops"))):
        folder = copy_checkpoint("scale-msws-shared", checkpoints / name)
        card = json.loads((folder / "card.json").read_text())
        for key in drop:
            card.pop(key, None)
        (folder / "card.json").write_text(json.dumps(card))
    at = open_app("pages/models.py", [])
    assert not at.exception
    rows = {r["variant"]: r for r in _variants_table(at).to_dict("records")}
    card = json.loads((whole / "card.json").read_text())
    assert rows["whole"]["compression"] == round(card["effective_params"] / card["unique_params"], 2)
    assert rows["whole"]["MFLOPs"] == round(card["flops"] / 1e6, 1)
    assert _blank(rows["no-unique"]["params"]) and _blank(rows["no-unique"]["compression"])  # was 172218.0
    assert _blank(rows["no-effective"]["compression"]) and _blank(rows["no-effective"]["MFLOPs"])  # were 0.0
    assert _blank(rows["no-effective"]["effective params"])


def test_compression_is_over_the_real_valued_parameters_not_the_stored_entries():
    """f-RepeatNet stores sign masks as bits: over its real-valued parameters it compresses 12.53x; over every
    stored entry (masks counted as parameters) it would read 0.95x. A shared model with no masks cannot tell."""
    needs("rot-repeat-bireal-c8")
    at = open_app("pages/models.py", [])
    rows = {r["variant"]: r for r in _variants_table(at).to_dict("records")}
    card = json.loads((Path(__file__).resolve().parents[1] / "checkpoints" / "rot-repeat-bireal-c8" / "card.json")
                      .read_text())
    real = card["unique_params"] - card["sign_mask_params"]  # the card's parts (it predates float_params)
    assert rows["rot-repeat-bireal-c8"]["compression"] == round(card["effective_params"] / real, 2)
    assert rows["rot-repeat-bireal-c8"]["compression"] > 10


@pytest.mark.parametrize("field,value", [("float_params", None), ("sign_mask_params", "none")])
def test_a_card_with_a_malformed_count_is_refused_alone_not_the_whole_page(checkpoints, field, value):
    needs("scale-msws-shared")
    copy_checkpoint("scale-msws-shared", checkpoints / "good")
    folder = copy_checkpoint("scale-msws-shared", checkpoints / "bad-count")
    card = json.loads((folder / "card.json").read_text())
    card[field] = value
    (folder / "card.json").write_text(json.dumps(card))
    at = open_app("pages/models.py", [])
    assert not at.exception, at.exception
    rows = {r["variant"] for r in _variants_table(at).to_dict("records")}
    assert rows == {"good"}


def test_the_test_over_seeds_is_stale_once_a_seeds_predictions_change(checkpoints):
    """Seeds 1 and 2 retrained in place rewrite only seeds/seed<k>/predictions.npz: the comparison read
    from them must not stay on screen."""
    import shutil

    import numpy as np

    pair = needs("scale-msws-shared", "scale-msws-vanilla")
    for n in pair:
        shutil.copytree(Path(__file__).resolve().parents[1] / "checkpoints" / n, checkpoints / f"copy-{n}")
    chosen = [f"copy-{n}" for n in pair]
    at = open_app("pages/models.py", chosen)
    next(b for b in at.button if b.label == "Evaluate the chosen variants").click().run()
    assert not at.exception, at.exception
    assert any("(n = 3)" in m.value for m in at.markdown)
    seed1 = checkpoints / chosen[0] / "seeds" / "seed1" / "predictions.npz"
    z = dict(np.load(seed1))
    z["test"] = (z["test"] + 1) % 10  # another run's answers
    np.savez_compressed(seed1, **z)
    at.run()
    assert not any("(n = 3)" in m.value for m in at.markdown), "the old test over seeds was still shown"
    assert any("changed since the last evaluation" in c.value for c in at.caption)


def test_sharing_map_columns_run_in_the_order_the_network_applies_them():
    from wsviz.figures import sharing_map_figure
    from wsviz.models import create_model, summarize
    from wsviz.sharingmap import SharingMap

    s = summarize(create_model("wsms_resnet_digits"))
    m = SharingMap.from_summary(s)
    axis = list(sharing_map_figure(m).layout.xaxis.categoryarray)
    forward = list(dict.fromkeys(u.site or "(model)" for u in s.uses))  # the trace's order
    assert axis == [site for site in forward if site in axis]
    assert axis[:2] != ["branches.0.0.0", "branches.1.0.0"]  # not parameter by parameter
    again = SharingMap.from_dict(json.loads(json.dumps(m.to_dict())))  # the shipped file keeps the order
    assert list(sharing_map_figure(again).layout.xaxis.categoryarray) == axis


def test_a_tiled_weight_says_every_shape_it_is_applied_as_and_its_direct_use():
    from wsviz.models import create_model, summarize

    r = summarize(create_model("repeatnet_vgg")).reuse()["features.8.weight"]
    text = r.describe()
    tiled = [u for u in r.uses if u.kind == "tiled"]
    shapes = {"x".join(map(str, u.applied_shape)) for u in tiled}
    assert len(shapes) > 1 and all(sh in text for sh in shapes), text
    assert "applied directly at 1 place" in text, text
    assert f"{r.factor:.3g}x" in text or f"{sum(u.applied for u in tiled) / r.numel:.3g}x" in text


def test_places_are_listed_whole_in_the_download_and_marked_when_shortened_on_the_page():
    from wsviz.sharingmap import ParamReuse, ParamUse

    sites = [f"trunk.stage{i}.block{j}.conv" for i in range(3) for j in range(12)]
    r = ParamReuse("w", (4, 4, 3, 3), tuple(ParamUse("w", x, "conv2d", (4, 4, 3, 3), False, applied=144)
                                             for x in sites), 144 * len(sites))
    short = r.places(120)
    kept = short.split(", … ")[0].split(", ")
    assert len(short) <= 140 and short.endswith(f", … (+{len(sites) - len(kept)} more)"), short
    assert kept == sites[:len(kept)]  # cut at a whole name
    assert r.places() == ", ".join(sites)  # no limit: the whole list


def test_the_catalog_keeps_compression_and_flops_unrounded_so_one_model_shows_one_value():
    from wsviz.catalog import load_catalog, load_sharing_map

    for row in load_catalog():
        s = load_sharing_map(row["name"])
        assert f"{row['compression']:.2f}" == f"{s.compression:.2f}", row["name"]
        assert f"{row['gflops']:.3f}" == f"{s.flops / 1e9:.3f}", row["name"]


def test_pages_without_any_checkpoint_say_where_variants_come_from(checkpoints):
    for page in ("pages/compare.py", "pages/embeddings.py", "pages/kernels.py", "pages/rotation.py", "pages/scale.py"):
        at = open_app(page, [])
        said = " ".join(i.value for i in at.info)
        assert "No trained variants" in said and "python -m wsviz.zoo retrain" in said and "Train" in said, (page, said)


def test_models_page_says_there_is_no_trained_variant_to_trace(checkpoints):
    at = open_app("pages/models.py", [])
    assert any("No trained variants to trace" in i.value for i in at.info), [i.value for i in at.info]


def _shown(element):
    """The table's cells as the page displays them (a pandas Styler's formatted strings)."""
    import pyarrow as pa

    return pa.ipc.open_stream(element.proto.arrow_data.styler.display_values).read_all().to_pandas()


def test_accuracies_show_one_decimal_in_every_row_not_84_beside_85_2():
    import re

    needs("scale-msws-vanilla", "rot-repeat-linear-c4")  # 84.0% on its card: the preset printed "84%"
    at = open_app("pages/models.py", [])
    table = next(d for d in at.dataframe if "test accuracy (this checkpoint)" in d.value.columns)
    cells = _shown(table)["test accuracy (this checkpoint)"].tolist()
    assert cells and all(re.fullmatch(r"\d{1,3}\.\d%", c) for c in cells if c), cells
    row = table.value["variant"].tolist().index("rot-repeat-linear-c4")
    assert cells[row] == f"{100 * table.value['test accuracy (this checkpoint)'][row]:.1f}%"  # values kept
