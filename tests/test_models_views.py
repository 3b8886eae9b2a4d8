"""The Models page's tables say what the cards and the accounting say, and nothing made up when a card
lacks a field; the sharing map's layer axis runs in the order the network applies its layers."""

from __future__ import annotations

import json
import math
import os
import tempfile

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
