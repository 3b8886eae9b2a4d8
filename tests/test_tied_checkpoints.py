"""A tied model is a checkpoint like any other (issue 19): saved with a card that records the source,
the groups and the init, rebuilt by load_checkpoint with its groups shared, and fine-tuned as an
ordinary training run (CLI, run_training, background jobs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from wsviz.errors import WsvizError
from wsviz.models import summarize
from wsviz.models.sharing import SharedConv2d
from wsviz.models.tie import tie
from wsviz.training.checkpoint import load_checkpoint, save_checkpoint
from wsviz.training.loop import TrainConfig
from wsviz.training.tying import TieSpec, tie_checkpoint, tied_card

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
TWIN = CKPT / "scale-sharesnet-unshared"
GROUPS = [[f"stages.{s}.1.conv2", f"stages.{s}.2.conv2"] for s in range(3)]  # ShaResNet's rule on this WRN


@pytest.fixture(scope="module")
def twin():
    if not (TWIN / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    return load_checkpoint(TWIN)


def _shared_sites(model) -> dict[str, list[str]]:
    return {p: r.sites for p, r in summarize(model).reuse().items() if r.reused}


def test_a_tied_checkpoint_round_trips_with_its_groups_shared(twin, tmp_path):
    model, card = twin
    tied = tie(model, GROUPS, init="mean")
    save_checkpoint(tmp_path / "t", tied, tied_card(tied, card, None, "test"))
    saved = json.loads((tmp_path / "t" / "card.json").read_text())
    assert saved["tied"]["groups"] == GROUPS and saved["tied"]["init"] == "mean"
    back, back_card = load_checkpoint(tmp_path / "t")
    for group in GROUPS:  # the same structure: the first member owns the weight, the others use it
        assert not isinstance(back.get_submodule(group[0]), SharedConv2d)
        assert back.get_submodule(group[1]).source is back.get_submodule(group[0])
    s = summarize(back)
    assert s.unique_params == summarize(tied).unique_params == 223_610 == saved["unique_params"]
    assert s.effective_params == summarize(model).unique_params
    assert _shared_sites(back) == _shared_sites(tied) and len(_shared_sites(back)) == 3
    x = torch.rand(8, 1, 28, 28)
    tied.eval()
    assert torch.equal(back(x), tied(x))
    # a reloaded tied model saves as a tied checkpoint again (the ties travel with the model)
    save_checkpoint(tmp_path / "again", back, {k: v for k, v in back_card.items() if k != "tied"})
    assert json.loads((tmp_path / "again" / "card.json").read_text())["tied"]["groups"] == GROUPS
    assert summarize(load_checkpoint(tmp_path / "again")[0]).unique_params == 223_610


def test_a_tied_card_is_never_taken_for_the_untied_model(twin, tmp_path):
    from wsviz.models.hub import find_pretrained

    model, card = twin
    tied = tie(model, GROUPS, init="mean")
    save_checkpoint(tmp_path / "a-tied", tied, tied_card(tied, card, None, "test"))
    save_checkpoint(tmp_path / "b-plain", model, card)
    assert find_pretrained("sharesnet_wrn_digits", {"shared": False}, root=tmp_path) == tmp_path / "b-plain"


@pytest.mark.parametrize("tied, words", [
    ({"groups": [["stages.0.1.conv2", "stages.0.7.conv2"]]}, "no layer 'stages.0.7.conv2'"),
    ({"groups": "stages.0.1.conv2"}, "list of lists"),
    ([1, 2], "list of lists"),
])
def test_a_card_with_bad_ties_is_refused_in_one_line(twin, tmp_path, tied, words):
    model, card = twin
    save_checkpoint(tmp_path / "t", model, card)
    path = tmp_path / "t" / "card.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tied": tied}))
    with pytest.raises(WsvizError, match=words) as err:
        load_checkpoint(tmp_path / "t")
    assert "\n" not in str(err.value) and "card" in str(err.value)


def test_tie_checkpoint_records_where_it_came_from(twin):
    tied, card = tie_checkpoint(TWIN, TieSpec(GROUPS[2:], "lstsq", calibration=64))
    assert tied.wsviz_tie["source"] == str(TWIN) and tied.wsviz_tie["groups"] == GROUPS[2:]
    assert tied.wsviz_tie["calibration_images"] == 64 and tied.wsviz_tie["source_test_accuracy"] == 0.964
    with pytest.raises(WsvizError, match="No groups"):
        tie_checkpoint(TWIN, TieSpec((), "lstsq"))
    with pytest.raises(WsvizError, match="Unknown init"):
        TieSpec(GROUPS, "first")


def test_fine_tuning_a_tied_model_is_an_ordinary_run(twin, tmp_path):
    from wsviz.training.run import run_training

    out = tmp_path / "ft"
    card = run_training("sharesnet_wrn_digits", "mnist5k-scale", out, TrainConfig(epochs=1, lr=0.01, max_batches=1),
                        init_from=TWIN, tie=TieSpec(GROUPS, "lstsq", calibration=64), tensorboard=tmp_path / "tb")
    assert card["init_from"] == str(TWIN) and card["tied"]["groups"] == GROUPS
    assert 0.5 < card["tied"]["accuracy_after_tying"] < 1 and card["unique_params"] == 223_610
    assert "--init-from" in card["command"] and "--tie-init lstsq" in card["command"]
    back, saved = load_checkpoint(out)
    assert len(_shared_sites(back)) == 3 and saved["epochs_done"] == 1
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())  # TensorBoard, as any run
    # the trained weight is the one every member applies
    assert torch.equal(back.get_submodule("stages.2.2.conv2").weight, back.get_submodule("stages.2.1.conv2").weight)
    with pytest.raises(WsvizError, match="holds a 'sharesnet_wrn_digits'"):
        run_training("resnet_digits", "mnist5k-scale", tmp_path / "x", TrainConfig(epochs=1), init_from=TWIN)
    with pytest.raises(WsvizError, match="needs a trained model"):
        run_training("sharesnet_wrn_digits", "mnist5k-scale", tmp_path / "x", TrainConfig(epochs=1),
                     tie=TieSpec(GROUPS))


class _Captured(Exception):
    pass


@pytest.mark.parametrize("tied", [True, False])
def test_a_fine_tune_distills_from_the_checkpoint_as_trained_loaded_once(twin, tmp_path, monkeypatch, tied):
    """The teacher of a distilled fine-tune is the checkpoint as trained (for a tie, the untied model),
    never the model being trained, and the checkpoint is read from disk once for both."""
    import wsviz.training.checkpoint as checkpoint
    import wsviz.training.run as run
    from wsviz.training.tying import finetune_config

    loads, seen = [], {}
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))

    def fake_train(model, *args, teacher=None, **kw):
        seen.update(model=model, teacher=teacher)
        raise _Captured

    monkeypatch.setattr(run, "train", fake_train)
    with pytest.raises(_Captured):
        run.run_training("sharesnet_wrn_digits", "mnist5k-scale", tmp_path / "ft", finetune_config(1, 0.01, max_batches=1),
                         init_from=TWIN, tie=TieSpec(GROUPS, "mean") if tied else None, save_state=False)
    assert loads == [TWIN]
    model, teacher = seen["model"], seen["teacher"]
    assert teacher is not None and teacher is not model
    assert not any(isinstance(m, SharedConv2d) for m in teacher.modules())
    assert any(isinstance(m, SharedConv2d) for m in model.modules()) == tied
    untied = twin[0].state_dict()
    assert all(torch.equal(v, untied[k]) for k, v in teacher.state_dict().items())
    # sharing no storage with the student: training the student cannot move the teacher
    student = {t.data_ptr() for t in model.state_dict().values()}
    assert not student & {t.data_ptr() for t in teacher.state_dict().values()}


def test_tie_cli_writes_a_tied_checkpoint(twin, tmp_path, capsys):
    from wsviz.cli import main

    args = ["tie", "--checkpoint", str(TWIN), "--out", str(tmp_path / "t"), "--init", "lstsq-bn", "--calibration",
            "64", "--limit", "200"]
    for g in GROUPS:
        args += ["--group", ",".join(g)]
    assert main(args) == 0
    assert "223,610 parameters" in capsys.readouterr().out
    back, card = load_checkpoint(tmp_path / "t")
    assert card["tied"]["init"] == "lstsq-bn" and len(_shared_sites(back)) == 3 and card["epochs_done"] == 0
    # the scales folded into the members' BatchNorms travel with the checkpoint
    assert card["tied"]["rescaled_norms"] == [p.replace("conv2", "bn2") for g in GROUPS for p in g]
    assert not torch.equal(back.stages[0][1].bn2.weight, twin[0].stages[0][1].bn2.weight)
    assert main(["tie", "--checkpoint", str(TWIN), "--out", str(tmp_path / "u"),
                 "--group", "stages.0.1.conv2,stages.1.1.conv2"]) == 2
    err = capsys.readouterr().err
    assert "differ in shape" in err and len(err.strip().splitlines()) == 1


def test_train_cli_refuses_tie_without_a_checkpoint(capsys):
    from wsviz.train import main

    assert main(["--model", "resnet_digits", "--dataset", "mnist5k", "--epochs", "1", "--out", "/tmp/x",
                 "--tie", "a,b"]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_background_fine_tune_of_a_tied_model(twin, tmp_path):
    from tests.conftest import kill_active_runs
    from wsviz.training.jobs import launch, train_command
    from wsviz.training.runstore import RunStore

    store = RunStore(tmp_path / "runs")
    spec = TieSpec(GROUPS, "lstsq", calibration=32)
    try:
        run = launch(store, "sharesnet_wrn_digits", "mnist5k-scale", TrainConfig(epochs=1, lr=0.01, max_batches=1),
                     init_from=TWIN, tie=spec, name="tied")
        cmd = train_command(store, run, 1, resume=False, gpus=[])
        assert cmd[cmd.index("--init-from") + 1] == str(TWIN.resolve()) and cmd.count("--tie") == 3
        t0 = time.time()
        while store.get(run.id).active and time.time() - t0 < 180:
            time.sleep(0.2)
        r = store.get(run.id)
        assert r.status == "done", Path(r.out_dir, "log.txt").read_text()
        back, card = load_checkpoint(Path(r.out_dir) / "checkpoint")
        assert card["tied"]["groups"] == GROUPS and len(_shared_sites(back)) == 3
        assert store.metrics(run.id).get("test_acc") and (Path(r.out_dir) / "tensorboard").is_dir()
    finally:
        kill_active_runs(tmp_path / "runs")
    with pytest.raises(WsvizError, match="needs a trained model"):
        launch(store, "sharesnet_wrn_digits", "mnist5k-scale", TrainConfig(epochs=1), tie=spec)


def test_every_init_is_offered_by_both_command_lines_and_the_share_page():
    from wsviz.models.tie import INITS
    from wsviz.train import build_parser

    train = next(a for a in build_parser()._actions if a.dest == "tie_init")
    assert set(train.choices) == set(INITS)
    import argparse

    from wsviz.cli import build_parser as cli_parser

    sub = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    tie_init = next(a for a in sub.choices["tie"]._actions if a.dest == "init")
    assert set(tie_init.choices) == set(INITS)
    page = (Path(__file__).resolve().parents[1] / "pages" / "share.py").read_text()
    for init in INITS:  # the page's Init menu (its options are a literal list)
        assert f'"{init}"' in page.split('selectbox("Init"', 1)[1].split("help=", 1)[0], init
