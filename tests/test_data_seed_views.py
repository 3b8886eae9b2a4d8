"""Analyses evaluate a checkpoint on the test split its card's data seed held out (for an image folder,
another seed's "test" images are partly this model's training images)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import pytest

os.environ.setdefault("WSVIZ_RUNS", tempfile.mkdtemp(prefix="wsviz-data-seed-runs-"))

from conftest import copy_checkpoint, needs, open_app, wait_for  # noqa: E402

from wsviz.errors import WsvizError  # noqa: E402
from wsviz.training.cards import evaluation_seed  # noqa: E402


def test_the_evaluation_seed_is_the_cards_and_mixed_seeds_are_refused():
    cards = {"a": {"dataset": "folder:/d", "data_seed": 1}, "b": {"dataset": "folder:/d", "data_seed": 1},
             "c": {"dataset": "mnist5k", "data_seed": 4}}
    assert evaluation_seed(cards, "folder:/d") == 1
    assert evaluation_seed(cards, "mnist5k") == 4
    assert evaluation_seed(cards, "mnist5k-rot") == 0  # none trained on it
    with pytest.raises(WsvizError, match=r"a \(seed 1\), b \(seed 2\)"):
        evaluation_seed({"a": {"dataset": "folder:/d", "data_seed": 1}, "b": {"dataset": "folder:/d", "data_seed": 2}},
                        "folder:/d")


def test_cli_analyses_read_the_test_split_of_the_cards_seed(monkeypatch):
    import wsviz.cli as cli
    import wsviz.data.stream as stream

    seen = {}
    monkeypatch.setattr(stream, "eval_data", lambda *a, **k: seen.update(k) or "data")
    models = {"m": __import__("wsviz").create_model("msws_resnet_digits")}
    args = argparse.Namespace(dataset="mnist5k-scale", eval_transform="auto")
    assert cli._data(args, models, {"m": {"dataset": "mnist5k-scale", "data_seed": 3}}, 100) == "data"
    assert seen["seed"] == 3


def _seeded_copy(src: str, dst):
    """The shipped checkpoint ``src`` copied to ``dst`` with its card saying it trained on data seed 1."""
    needs(src)
    folder = copy_checkpoint(src, dst)
    card = json.loads((folder / "card.json").read_text())
    card["data_seed"] = 1
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def _spy_on_eval_data(monkeypatch) -> list[tuple[str, dict]]:
    """Every eval_data call from now on, as (split, keyword arguments); the real one still answers."""
    import wsviz.data.stream as stream

    real, seen = stream.eval_data, []

    def spy(*a, **k):
        seen.append((a[1] if len(a) > 1 else k.get("split", "test"), k))
        return real(*a, **k)

    monkeypatch.setattr(stream, "eval_data", spy)
    return seen


def test_the_scale_sweep_reads_the_test_split_of_the_cards_seed(checkpoints, monkeypatch):
    _seeded_copy("scale-msws-vanilla", checkpoints / "seed1")
    seen = _spy_on_eval_data(monkeypatch)
    at = open_app("pages/scale.py", ["seed1"])
    next(s for s in at.slider if s.label == "Images").set_value(100).run()
    next(m for m in at.multiselect if m.label == "Scales").set_value([1.0]).run()
    next(s for s in at.selectbox if s.label == "Test data").set_value("mnist5k-scale").run()
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    wait_for(at, lambda _: seen, "the sweep reading its test data", timeout=60)
    assert seen[0][1].get("seed") == 1, seen


def test_embeddings_read_the_test_split_of_the_cards_seed(checkpoints, monkeypatch):
    _seeded_copy("scale-msws-vanilla", checkpoints / "seed1")
    seen = _spy_on_eval_data(monkeypatch)
    at = open_app("pages/embeddings.py", ["seed1"])
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert seen and all(k.get("seed") == 1 for _, k in seen), seen


def test_cli_opportunities_calibrate_on_the_training_split_of_the_cards_seed(monkeypatch, tmp_path):
    from wsviz.cli import main

    folder = _seeded_copy("scale-sharesnet-unshared", tmp_path / "seed1")
    calls = _spy_on_eval_data(monkeypatch)
    main(["opportunities", "--checkpoint", str(folder), "--calibration", "16", "--limit", "32", "--out",
          str(tmp_path / "out")])
    seen = [(split, k.get("seed")) for split, k in calls]
    assert ("train", 1) in seen and ("test", 1) in seen and all(s == 1 for _, s in seen), seen


def test_one_evaluation_transform_for_a_sweep_or_a_note_naming_who_differs():
    from wsviz.training.cards import shared_evaluation_transform

    d = "folder:/data/pets"
    net = {"dataset": d, "train_config": {"augment": "imagenet"}}
    small = {"dataset": d, "train_config": {"augment": "cifar"}}  # cifar's evaluation is a letterbox, as none's
    assert shared_evaluation_transform({"a": net, "b": dict(net)}, d) == ("imagenet", None)
    assert shared_evaluation_transform({"a": small, "b": {"dataset": d}}, d) == ("none", None)
    assert shared_evaluation_transform({"a": net}, "folder:/data/other") == ("none", None)  # not its own data
    preset, note = shared_evaluation_transform({"a": net, "b": small}, d)
    assert preset == "none"
    assert note.startswith(f"these models were tested on {d} under different transforms (a: resize to 8/7 and "
                           "centre crop (imagenet); b: letterbox (none))")
