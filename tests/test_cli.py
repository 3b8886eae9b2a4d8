"""`python -m wsviz ...` writes the tables and figures for every analysis."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from wsviz.cli import main
from wsviz.training.loop import TrainConfig
from wsviz.training.run import run_training


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, max_batches=5)
    a = run_training("msws_resnet_digits", "mnist5k", root / "msws-vanilla", cfg,
                     overrides={"sharing": "vanilla", "depth": 8, "base_width": 8})
    b = run_training("msws_resnet_digits", "mnist5k", root / "msws-shared", cfg,
                     overrides={"sharing": "shared", "depth": 8, "base_width": 8})
    assert a and b
    return [str(root / "msws-vanilla"), str(root / "msws-shared")]


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_models_listing(capsys):
    assert main(["models", "--family", "shardnet"]) == 0
    assert "sl_resnet34" in capsys.readouterr().out


def test_kernels(two_checkpoints, tmp_path):
    assert main(["kernels", "--checkpoint", *two_checkpoints, "--k", "16", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "top_kernels.csv")
    assert len(rows) == 32 and {r["model"] for r in rows} == {"msws-vanilla", "msws-shared"}
    sim = _rows(tmp_path / "kernel_similarity.csv")
    assert 0 < float(sim[0]["similarity"]) <= 1
    assert (tmp_path / "top_kernels.html").stat().st_size > 1000 and (tmp_path / "plotly.min.js").exists()


def test_scale_and_rotation(two_checkpoints, tmp_path):
    assert main(["scale", "--checkpoint", *two_checkpoints, "--limit", "100", "--values", "0.5", "1.0",
                 "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "scale_sweep.csv")
    assert len(rows) == 4 and all(float(r["agreement"]) == 1.0 for r in rows if float(r["scale"]) == 1.0)
    assert main(["rotation", "--checkpoint", two_checkpoints[0], "--limit", "50", "--values", "0", "90",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "rotation_accuracy.html").exists()


def test_compare_prints_significance(two_checkpoints, tmp_path, capsys):
    assert main(["compare", "--checkpoint", *two_checkpoints, "--out", str(tmp_path)]) == 0
    assert "McNemar" in capsys.readouterr().out
    assert len(_rows(tmp_path / "fair_comparison.csv")) == 2 and len(_rows(tmp_path / "significance.csv")) == 1


def test_attribution_embed_cka(two_checkpoints, tmp_path):
    img = tmp_path / "digit.png"
    Image.new("L", (40, 40), 255).save(img)
    assert main(["attribution", "--checkpoint", two_checkpoints[0], "--image", str(img), "--method", "saliency",
                 "--out", str(tmp_path)]) == 0
    assert main(["embed", "--checkpoint", two_checkpoints[0], "--dataset", "mnist5k-rot", "--limit", "100",
                 "--color-by", "angle", "--out", str(tmp_path)]) == 0
    assert len(_rows(tmp_path / "embedding_msws-vanilla.csv")) == 100
    assert main(["cka", "--checkpoint", *two_checkpoints, "--limit", "64", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "cka.json").exists()


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["kernels", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "checkpoint" in capsys.readouterr().err
