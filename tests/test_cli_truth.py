"""The CLI tells the truth and keeps what the user has (review 3): it never overwrites a checkpoint or
a weights file, imported models take the input size of their data, checkpoints that share a folder
name stay apart, sweeps give no accuracy against labels a model never learned, a tie measured on a
subset says so, and every message names the CLI's own flags."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
import torchvision

import wsviz.cli
from wsviz.cli import build_parser, main, model_names
from wsviz.models import create_model, summarize
from wsviz.training.checkpoint import load_checkpoint

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
TWIN = CKPT / "scale-sharesnet-unshared"
SMALL = CKPT / "scale-msws-vanilla"
MASKED = CKPT / "scale-repeatnet-f"
GROUP = "stages.2.1.conv2,stages.2.2.conv2"


def _need(*folders: Path) -> None:
    for f in folders:
        if not (f / "card.json").is_file():
            pytest.skip(f"needs the shipped checkpoint {f.name}")


def _md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _copy(src: Path, dst: Path, **card_changes) -> Path:
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    for k, v in card_changes.items():
        if v is None:
            card.pop(k, None)
        else:
            card[k] = v
    (dst / "card.json").write_text(json.dumps(card))
    return dst


# ------------------------------------------------------------------------------- tie --out
@pytest.mark.parametrize("where", ["source", "card", "weights"])
@pytest.mark.parametrize("finetune", [False, True])
def test_tie_refuses_to_overwrite_a_checkpoint(tmp_path, capsys, where, finetune):
    _need(TWIN)
    src = _copy(TWIN, tmp_path / "src")
    out = tmp_path / "out"
    if where == "source":
        out = src
    else:
        out.mkdir()
        (out / ("card.json" if where == "card" else "weights.safetensors")).write_bytes(b"mine")
    before_src, before_out = _md5s(src), _md5s(out)
    args = ["tie", "--checkpoint", str(src), "--out", str(out), "--group", GROUP, "--calibration", "32"] + (
        ["--finetune-epochs", "1", "--max-batches", "1"] if finetune else ["--limit", "50"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and ("new folder" in err)
    assert _md5s(src) == before_src and _md5s(out) == before_out


def test_tie_limit_compares_on_the_same_images_and_says_so(tmp_path, capsys):
    _need(TWIN)
    out = tmp_path / "t"
    assert main(["tie", "--checkpoint", str(TWIN), "--out", str(out), "--group", GROUP, "--init", "mean",
                 "--calibration", "64", "--limit", "60"]) == 0
    printed = capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["test_accuracy"] is None and card["test_limit"] == 60 and card["tied"]["test_limit"] == 60
    # the untied accuracy printed is the source's on those 60 images, not the card's full-split number
    from wsviz.data.datasets import load_split
    from wsviz.training.loop import evaluate

    model0, card0 = load_checkpoint(TWIN)
    te = load_split(card0["dataset"], "test", seed=card0.get("data_seed", 0)).spread(60)
    untied = evaluate(model0, te.images, te.labels)[1]
    assert f"on 60 of 1,000 test images {untied:.4f} untied" in printed
    assert f"{card['tied']['accuracy_after_tying']:.4f} tied" in printed
    assert str(card0["test_accuracy"]) + " untied" not in printed


# ----------------------------------------------------------------------------- import --out
def _digits_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = create_model("msws_resnet_digits", depth=8, base_width=8)
    path = tmp_path / "mine.pt"
    torch.save(m.state_dict(), path)
    return path


def _import(weights: Path, out: Path, *extra: str) -> int:
    return main(["import", "--model", "msws_resnet_digits", "--set", "depth=8", "--set", "base_width=8",
                 "--weights", str(weights), "--out", str(out), *extra])


def test_import_keeps_a_weights_file_already_in_out(tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    theirs = out / "weights.safetensors"  # the user's own file under the name wsviz would write
    theirs.write_bytes(b"torchvision layout, not mine to lose")
    assert _import(_digits_weights(tmp_path), out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "weights.safetensors" in err
    assert theirs.read_bytes() == b"torchvision layout, not mine to lose" and not (out / "card.json").exists()


def test_import_refuses_weights_it_would_overwrite(tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    weights = out / "weights.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(create_model("msws_resnet_digits", depth=8, base_width=8).state_dict(), str(weights))
    before = weights.read_bytes()
    assert _import(weights, out) == 2
    assert "--weights" in capsys.readouterr().err
    assert weights.read_bytes() == before


# --------------------------------------------------------------------------- import --dataset
def test_import_takes_the_datasets_input_size(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    assert main(["import", "--model", "msws_resnet18", "--set", "sharing=vanilla", "--weights", str(weights),
                 "--out", str(tmp_path / "a"), "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "card.json").read_text())["config"]["input_size"] == 32
    assert "32-px input" in out
    # said explicitly, the size the weights were trained at wins
    assert main(["import", "--model", "msws_resnet18", "--set", "sharing=vanilla", "--set", "input_size=64",
                 "--weights", str(weights), "--out", str(tmp_path / "b"), "--dataset", "cifar10"]) == 0
    assert json.loads((tmp_path / "b" / "card.json").read_text())["config"]["input_size"] == 64


def test_import_refuses_a_model_that_cannot_take_the_datasets_size(tmp_path, capsys, monkeypatch):
    import wsviz.models as models  # import_weights looks create_model up here when it runs

    made = models.create_model

    def fixed_size(name, **kw):  # a model built for one input size only
        if kw.get("input_size") not in (None, 28):
            raise ValueError("this model takes 28-px inputs only")
        return made(name, **kw)

    monkeypatch.setattr(models, "create_model", fixed_size)
    assert _import(_digits_weights(tmp_path), tmp_path / "ck", "--dataset", "cifar10") == 2
    err = capsys.readouterr().err
    assert "--set input_size=" in err and "cifar10" in err


def test_import_help_and_readme_name_set_input_size():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "--set input_size=" in sub.choices["import"].format_help()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "--set input_size=" in readme
    assert "no\nmean/std normalisation" in readme or "no mean/std normalisation" in " ".join(readme.split())


def test_import_prints_the_normalisation_note_and_float_params_with_mask_bits(tmp_path, capsys):
    _need(MASKED)
    card0 = json.loads((MASKED / "card.json").read_text())
    weights = tmp_path / "f.safetensors"
    shutil.copy(MASKED / "weights.safetensors", weights)
    sets = [a for k, v in card0["config"].items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    assert main(["import", "--model", card0["model"], *sets, "--weights", str(weights),
                 "--out", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    s = summarize(load_checkpoint(tmp_path / "ck")[0])
    assert s.mask_bits > 0
    assert f"{s.float_params:,} parameters + {s.mask_bits:,} mask bits" in out  # as `models --summary` counts
    assert f"{s.unique_params:,} parameters" not in out
    assert "normalis" in out and "[0, 1]" in out


# ------------------------------------------------------------------------ checkpoint names
def test_model_names_are_the_shortest_unique_path_ends(tmp_path):
    assert model_names([str(tmp_path / "a" / "m"), str(tmp_path / "b" / "m"), str(tmp_path / "c")]) == \
        ["a/m", "b/m", "c"]
    assert model_names([str(tmp_path / "x" / "a" / "m"), str(tmp_path / "y" / "a" / "m")]) == ["x/a/m", "y/a/m"]


def test_kernels_keeps_checkpoints_that_share_a_folder_name(tmp_path):
    _need(SMALL)
    a = _copy(SMALL, tmp_path / "a" / "m")
    b = _copy(SMALL, tmp_path / "b" / "m")
    assert main(["kernels", "--checkpoint", str(a), str(b), "--k", "4", "--out", str(tmp_path / "o")]) == 0
    assert {r["model"] for r in _rows(tmp_path / "o" / "top_kernels.csv")} == {"a/m", "b/m"}


def test_a_file_given_as_checkpoint_points_to_import(tmp_path, capsys):
    f = tmp_path / "r18.pth"
    f.write_bytes(b"x")
    for command in ("kernels", "compare"):
        assert main([command, "--checkpoint", str(f), "--out", str(tmp_path / "o")]) == 2
        assert "python -m wsviz import" in capsys.readouterr().err


# ---------------------------------------------------------------------- sweeps and defaults
def test_sweep_gives_no_accuracy_against_labels_the_model_never_learned(tmp_path, capsys):
    _need(SMALL)
    known = _copy(SMALL, tmp_path / "known")
    blind = _copy(SMALL, tmp_path / "blind", dataset="cifar10")  # its card: trained on other classes
    assert main(["scale", "--checkpoint", str(known), str(blind), "--dataset", "mnist5k", "--limit", "40",
                 "--values", "0.5", "1.0", "--no-cache", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if line.startswith("note: blind")]
    assert len(note) == 1 and "cifar10" in note[0] and "agreement only" in note[0]
    rows = _rows(tmp_path / "o" / "scale_sweep.csv")
    assert all(math.isnan(float(r["accuracy"])) for r in rows if r["model"] == "blind")
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows if r["model"] == "known")
    assert all(float(r["agreement"]) == 1.0 for r in rows if float(r["scale"]) == 1.0)
    assert json.loads((tmp_path / "o" / "scale_sweep.json").read_text())["agreement_only"].keys() == {"blind"}


def test_opportunities_defaults_to_the_cards_dataset(tmp_path, monkeypatch):
    _need(SMALL)
    ck = _copy(SMALL, tmp_path / "rot", dataset="mnist5k-rot")
    import wsviz.data.stream as stream

    asked = []

    class Stop(Exception):
        pass

    def eval_data(name, *a, **kw):
        asked.append(name)
        raise Stop

    monkeypatch.setattr(stream, "eval_data", eval_data)
    with pytest.raises(Stop):
        main(["opportunities", "--checkpoint", str(ck), "--out", str(tmp_path / "o")])
    assert asked == ["mnist5k-rot"]


# ------------------------------------------------------------------------------- messages
def test_compare_without_a_dataset_names_the_cli_flag(tmp_path, capsys):
    _need(SMALL)
    ck = _copy(SMALL, tmp_path / "nodata", dataset=None)
    assert main(["compare", "--checkpoint", str(ck), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--dataset" in err and "dataset=..." not in err


def test_tie_help_and_module_docstring():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    out_help = next(a.help for a in sub.choices["tie"]._actions if a.dest == "out")
    assert "checkpoint" in out_help and "CSV" not in out_help
    assert "stages.2.2.conv2 \\\n" in wsviz.cli.__doc__  # the example keeps its line continuation



# ------------------------------------------------------------------------------- --limit
def test_compare_limit_evaluates_that_many_images_spread_over_the_split(tmp_path, capsys):
    _need(SMALL, TWIN)
    assert main(["compare", "--checkpoint", str(SMALL), str(TWIN), "--limit", "60", "--dataset", "mnist5k-scale",
                 "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    rows = _rows(tmp_path / "o" / "fair_comparison.csv")
    assert [r["images"] for r in rows] == ["60", "60"]
    from wsviz.data.datasets import load_split
    from wsviz.training.loop import evaluate

    te = load_split("mnist5k-scale", "test", seed=0).spread(60)
    for row, folder in zip(rows, (SMALL, TWIN)):  # the accuracy is of those 60 images, not of the whole split
        assert float(row["accuracy"]) == pytest.approx(evaluate(load_checkpoint(folder)[0], te.images, te.labels)[1])
    assert "on 60 of 1,000 test images" in printed
    sig = _rows(tmp_path / "o" / "significance.csv")
    assert len(sig) == 1


def test_compare_without_limit_evaluates_the_whole_split(tmp_path, capsys):
    _need(SMALL)
    assert main(["compare", "--checkpoint", str(SMALL), "--out", str(tmp_path / "o")]) == 0
    row = _rows(tmp_path / "o" / "fair_comparison.csv")[0]
    assert row["images"] == "1000" and float(row["accuracy"]) == pytest.approx(float(row["card_accuracy"]))
    assert "test images" not in capsys.readouterr().out.split("McNemar")[0]


def test_tie_refuses_a_limit_it_cannot_apply_to_a_fine_tune(tmp_path, capsys):
    _need(TWIN)
    out = tmp_path / "t"
    assert main(["tie", "--checkpoint", str(TWIN), "--out", str(out), "--group", GROUP, "--finetune-epochs", "1",
                 "--max-batches", "1", "--limit", "60"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--limit" in err and "--finetune-epochs" in err
    assert not out.exists()  # refused before anything ran or was written


def test_kernels_csv_counts_both_rates_of_a_rate_shared_kernel_and_says_when_skeletons_differ(tmp_path, capsys):
    """The CLI's 'positions' is the page's: msws-shared applies each stored kernel at rates 1 and 2; and two
    models of different skeletons have no 'same place', which the CLI says instead of implying one."""
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    for n in ("scale-msws-shared", "scale-repeatnet-linear"):
        if not (root / n / "card.json").is_file():
            pytest.skip(f"needs the shipped {n}")
    out = tmp_path / "o"
    assert main(["kernels", "--checkpoint", str(root / "scale-msws-shared"), str(root / "scale-repeatnet-linear"),
                 "--k", "300", "--out", str(out)]) == 0
    rows = _rows(out / "top_kernels.csv")
    assert {r["positions"] for r in rows if r["model"] == "scale-msws-shared"} == {"2"}
    err = capsys.readouterr().err
    assert "different skeletons" in err and "not the same place" in err, err


def test_opportunities_csv_holds_every_score_its_predicted_cost_is_made_of(tmp_path):
    """The predicted cost is a weighted mean of ranks of the measured drop and the KL from the untied
    predictions: the file must let a reader recompute it (it had no KL column)."""
    import csv

    from wsviz.analysis.opportunities import predicted_costs

    ck = Path(__file__).resolve().parents[1] / "checkpoints" / "scale-sharesnet-unshared"
    if not (ck / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    assert main(["opportunities", "--checkpoint", str(ck), "--out", str(tmp_path), "--calibration", "32",
                 "--limit", "64"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "opportunities.csv")))
    rebuilt = [types.SimpleNamespace(measured_drop=float(r["measured_drop_pts"]), measured_kl=float(r["measured_kl"]))
               for r in rows]
    assert predicted_costs(rebuilt) == pytest.approx([float(r["predicted_cost"]) for r in rows])
