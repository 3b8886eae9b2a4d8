"""The shipped zoo: complete, small, pickle-free, and every card true to its weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsviz.data.datasets import load_split
from wsviz.training.checkpoint import load_checkpoint, read_card
from wsviz.training.loop import evaluate
from wsviz.zoo import ZOO, write_table

ROOT = Path(__file__).resolve().parents[1]
CK = ROOT / "checkpoints"
SHIPPED = [e.name for e in ZOO if (CK / e.name / "card.json").is_file()]


def test_every_zoo_entry_is_shipped():
    missing = [e.name for e in ZOO if e.name not in SHIPPED]
    assert not missing, f"not in checkpoints/: {missing} (run `python -m wsviz.zoo retrain`)"


def test_checkpoints_are_small_and_pickle_free():
    # What ships: everything but the extra seeds' weights, which `zoo retrain` writes and git ignores.
    files = [p for p in CK.rglob("*") if p.is_file()
             and not (p.name == "weights.safetensors" and p.parent.parent.name == "seeds")]
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
    suffixes = {p.suffix for p in files}
    assert suffixes <= {".safetensors", ".json", ".md", ".npz", ""} , suffixes
    import numpy as np

    for f in (p for p in files if p.suffix == ".npz"):  # per-image predictions: plain integer arrays, no pickle
        with np.load(f, allow_pickle=False) as z:
            assert all(z[k].dtype.kind == "i" for k in z.files), f
    from wsviz.zoo import claimed

    for name in SHIPPED:
        extra = {"seeds"} if name in claimed() else set()  # further training seeds: card + predictions each
        assert {p.name for p in (CK / name).iterdir()} == {"weights.safetensors", "card.json", "predictions.npz"} | extra


_SPLITS: dict[tuple, object] = {}


@pytest.mark.parametrize("name", SHIPPED)
def test_card_matches_a_reevaluation_of_its_weights(name):
    model, card = load_checkpoint(CK / name)
    key = (card["dataset"], card.get("data_seed", 0))
    if key not in _SPLITS:
        _SPLITS[key] = load_split(card["dataset"], card["test_split"], seed=key[1])
    te = _SPLITS[key]
    _, acc, _ = evaluate(model, te.images, te.labels)
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-9)
    assert card["complete"] and card["epochs_done"] == card["epochs"]
    assert card["unique_params"] == sum(p.numel() for p in model.parameters())
    assert card["command"].startswith("python -m wsviz.train")
    entry = next(e for e in ZOO if e.name == name)
    assert card["model"] == entry.model and card["dataset"] == entry.dataset


def test_readme_table_is_generated_from_the_cards(tmp_path):
    import shutil

    for name in SHIPPED:
        shutil.copytree(CK / name, tmp_path / name)
    generated = write_table(tmp_path).read_text()
    assert (CK / "README.md").read_text() == generated
    for name in SHIPPED:
        acc = read_card(CK / name)["test_accuracy"]
        assert f"| `{name}` |" in generated and f"{100 * acc:.2f}" in generated


def test_retrain_command_works_on_two_models(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsviz.zoo", "retrain", "--only", "scale-msws-shared", "rot-cnn",
                           "--epochs", "1", "--max-batches", "3", "--seeds", "0", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("scale-msws-shared", "rot-cnn"):
        model, card = load_checkpoint(tmp_path / name)
        assert card["epochs_done"] == 1 and card["train_config"]["max_batches"] == 3
        assert (tmp_path / name / "predictions.npz").is_file() and not (tmp_path / name / "seeds").exists()
    assert "scale-msws-shared" in (tmp_path / "README.md").read_text()


def test_retrain_trains_three_seeds_of_what_enters_a_claim_and_one_of_the_rest(tmp_path, monkeypatch):
    """The default schedule (no --seeds): seed 0 of every entry, seeds 1 and 2 only of the claimed ones,
    each into its seed folder (the trainings themselves are the command test's job, above)."""
    import wsviz.training.run
    from wsviz import zoo

    runs = []

    def fake_run(model, dataset, folder, cfg, **kw):
        runs.append((Path(folder), cfg.seed))
        return {"test_accuracy": 0.5, "duration_s": 0.0}

    monkeypatch.setattr(wsviz.training.run, "run_training", fake_run)
    monkeypatch.setattr(zoo, "write_predictions", lambda folder, name: None)
    names = ["scale-msws-shared", "scale-repeatnet-dense"]
    assert "scale-msws-shared" in zoo.claimed() and "scale-repeatnet-dense" not in zoo.claimed()
    zoo.retrain(tmp_path, 1, names, log=lambda s: None)
    assert sorted(runs) == sorted([(zoo.seed_folder(tmp_path, "scale-msws-shared", s), s) for s in zoo.SEEDS]
                                  + [(zoo.seed_folder(tmp_path, "scale-repeatnet-dense", 0), 0)])
    assert zoo.seed_folder(tmp_path, "scale-repeatnet-dense", 0) == tmp_path / "scale-repeatnet-dense"
