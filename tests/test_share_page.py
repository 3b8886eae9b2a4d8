"""The Share weights page (issue 19): scores a trained variant in the background, draws the similarity
matrices, the ranked table and the parameters-vs-cost chart, and launches the tie + fine-tune as an
ordinary background run (trainers only), whose result is then a variant like any other."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import kill_active_runs, open_app, wait_for
from wsviz import auth

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
TWIN = "scale-sharesnet-unshared"
GROUP = "stages.2.1.conv2 + stages.2.2.conv2"
SUBMIT = "Tie the chosen groups and fine-tune"


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """The pages' run store in a temporary folder."""
    import pages._shared as shared

    monkeypatch.setattr(shared, "RUNS", tmp_path / "runs")
    shared.scan_checkpoints.clear()
    yield tmp_path / "runs"
    kill_active_runs(tmp_path / "runs")
    shared.scan_checkpoints.clear()


@pytest.mark.slow  # scores 14 groups and runs a background fine-tune (about a minute on 2 cores)
def test_share_page_scores_then_a_trainer_ties_and_fine_tunes(runs, monkeypatch):
    if not (CKPT / TWIN / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    from pages._shared import available_variants
    from wsviz.training.checkpoint import load_checkpoint
    from wsviz.training.runstore import RunStore

    at = open_app("pages/share.py", [TWIN])
    at.slider[0].set_value(64).run()
    at.slider[1].set_value(100).run()
    next(b for b in at.button if b.label == "Score candidate groups").click().run()
    wait_for(at, lambda a: len(a.get("plotly_chart")) >= 2, "scoring")
    table = at.dataframe[0].value
    assert len(table) == 14 and GROUP in set(table["group"])  # every candidate group of this WRN
    assert list(table["predicted cost"]) == sorted(table["predicted cost"])  # cheapest first
    assert {"drop now (pts)", "loss rise now", "KL now", "output CKA", "weight similarity",
            "gradient conflict"} <= set(table.columns)

    # a budget of two stage-2 kernels: the page suggests disjoint groups saving that much, measured, and
    # "Use these groups" ticks them
    next(n for n in at.number_input if n.label == "Parameters to save").set_value(2 * 36_864).run()
    next(b for b in at.button if b.label == "Suggest groups").click().run()
    wait_for(at, lambda a: any(s.value.startswith("Tie ") for s in a.success), "the suggestion")
    suggested = at.dataframe[1].value
    assert (suggested["params saved"] >= 2 * 36_864).all() and len(suggested) >= 1
    assert list(suggested["KL, tied together"]) == sorted(suggested["KL, tied together"])
    next(b for b in at.button if b.label == "Use these groups").click().run()
    picked = next(m for m in at.multiselect if m.label == "Groups to tie").value
    assert " | ".join(picked) == suggested["groups"][0]
    next(m for m in at.multiselect if m.label == "Groups to tie").set_value([]).run()

    # a viewer sees why there is nothing to press
    at.session_state["_wsviz_actor"] = auth.Actor("viewer", "viewer")
    at.run()
    assert any("only trainers can tie" in i.value for i in at.info)
    assert not [b for b in at.button if b.label == SUBMIT]

    at.session_state["_wsviz_actor"] = auth.Actor("alice", "trainer")
    at.run()
    submit = next(b for b in at.button if b.label == SUBMIT)
    submit.click().run()  # nothing ticked: say what to do, start nothing
    assert any("Tick the groups" in e.value for e in at.error) and not RunStore(runs).list()
    next(m for m in at.multiselect if m.label == "Groups to tie").set_value([GROUP]).run()
    assert any("1 group(s) chosen: 36,864 parameters saved" in c.value for c in at.caption)
    # the recipe averages its last 15 steps; made 40 here, more than the twin's whole epoch of 31 batches
    # (4,000 images), as 15 is for a set of fewer than 1,920 images: the page averages the whole epoch
    # instead of launching a run that the loop refuses
    import wsviz.training.tying as tying

    monkeypatch.setattr(tying, "AVERAGE_LAST", 40)
    next(n for n in at.number_input if n.label.startswith("Max batches")).set_value(0)
    next(b for b in at.button if b.label == SUBMIT).click().run()
    assert not at.exception, at.exception
    assert any("Launched run" in s.value for s in at.success), [e.value for e in at.error]
    store = RunStore(runs)
    (run,) = store.list()
    assert run.user == "alice" and run.spec["tie"]["groups"] == [GROUP.split(" + ")]
    tc = run.spec["train_config"]  # the measured recipe by default: distillation, per-step cosine, averaging
    assert (tc["distill"], tc["step_schedule"], tc["average_last"], tc["max_batches"]) == (4.0, True, 31, None)
    t0 = time.time()
    while store.get(run.id).active and time.time() - t0 < 240:
        time.sleep(0.5)
    run = store.get(run.id)
    assert run.status == "done", Path(run.out_dir, "log.txt").read_text()
    # the result is a variant like any other, tied
    label = next(v for v in available_variants() if v.startswith("run:") and run.id[-6:] in v)
    model, card = load_checkpoint(available_variants()[label])
    assert card["tied"]["groups"] == [GROUP.split(" + ")] and card["tied"]["source"].endswith(TWIN)
    assert model.get_submodule("stages.2.2.conv2").source is model.get_submodule("stages.2.1.conv2")
    models_page = open_app("pages/models.py", [TWIN, label])
    assert not models_page.exception


def _score(at, n_cal: int = 64, n_held: int = 100):
    at.slider[0].set_value(n_cal).run()
    at.slider[1].set_value(n_held).run()
    next(b for b in at.button if b.label == "Score candidate groups").click().run()
    wait_for(at, lambda a: len(a.get("plotly_chart")) >= 2, "scoring")


def test_share_page_says_what_the_drops_are_measured_against_and_forgets_a_rewritten_checkpoint(
        runs, monkeypatch, tmp_path):
    """The drops now are measured against the untied model with its BatchNorm re-estimated on the
    calibration images, which alone may cost accuracy: the page says that baseline's accuracy and the
    as-trained one on the same held-out images. A checkpoint rewritten in place (a retrain into the same
    folder) is another model: the table scored on the old weights is not shown for it (nor its groups
    offered to tie and fine-tune from the new weights)."""
    if not (CKPT / TWIN / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    import copy
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    import pages._shared as shared
    from wsviz.data.datasets import fit_to, load_split
    from wsviz.models.tie import reestimate_batchnorm
    from wsviz.training.checkpoint import load_checkpoint

    folder = tmp_path / "checkpoints" / TWIN
    folder.mkdir(parents=True)
    for name in ("card.json", "weights.safetensors"):
        shutil.copy(CKPT / TWIN / name, folder / name)
    monkeypatch.setattr(shared, "CHECKPOINTS", tmp_path / "checkpoints")
    shared.scan_checkpoints.clear()

    at = open_app("pages/share.py", [TWIN])
    _score(at)
    assert len(at.dataframe[0].value) == 14

    # the baseline, measured here by hand on the images the page chose (its card's data seed)
    model, card = load_checkpoint(folder)
    seed = int(card.get("data_seed", 0))
    cal = load_split(card["dataset"], "train", seed=seed).spread(64)
    held = load_split(card["dataset"], "test", seed=seed).spread(100)
    x, hx = fit_to(cal.images, 1, 28), fit_to(held.images, 1, 28)

    def accuracy(m):
        with torch.no_grad():
            return 100 * float((m.eval()(hx).argmax(1) == held.labels).double().mean())

    untied, trained = accuracy(reestimate_batchnorm(copy.deepcopy(model), x)), accuracy(model)
    said = (f"untied, BN re-estimated on 64 images: {untied:.1f}% on the 100 held-out images (as trained: "
            f"{trained:.1f}%); one image = 1 point")
    assert any(said in c.value for c in at.caption), [c.value for c in at.caption]
    assert untied < trained  # 64 images re-estimate the statistics worse than training did, on this twin

    # the weights rewritten in place: the old table is not shown, nor anything to tie from it
    weights = load_file(folder / "weights.safetensors")
    save_file({k: v * 0.5 if k.endswith("conv2.weight") else v for k, v in weights.items()},
              folder / "weights.safetensors")
    shared.scan_checkpoints.clear()
    at.run()
    assert not at.exception, at.exception
    assert not at.dataframe and not at.get("plotly_chart")
    assert any("The settings changed since the last scoring" in c.value for c in at.caption)
    assert not [b for b in at.button if b.label == SUBMIT]
    _score(at)  # scored again: the new weights' table
    assert len(at.dataframe[0].value) == 14
