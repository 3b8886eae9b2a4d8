"""The Share page's numbers are those of the images it chose, whatever else runs meanwhile.

The app keeps one model object per checkpoint for every session (``st.cache_resource``) and each
session's script runs in a thread of its own, so while one session scores its candidate groups,
another may be predicting through the very same object. The analysis's hooks must not record that
other pass (a reviewer saw the output CKA turn NaN, a KL move from 0.0121 to 0.0153 and a drop from
3 points to 1), and the analysis must leave the shared object as it found it: mode, weights,
BatchNorm statistics.

Here a second thread runs forward passes of one image through the same model in a loop, and a hook
makes sure that one of its passes lands inside every hooked pass of the analysis (after the
analysis's hooks have fired, before they are removed), so the disturbance is certain, not a race.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from wsviz.data.datasets import load_split
from wsviz.training.checkpoint import load_checkpoint

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
GROUPS = [("stages.2.1.conv2", "stages.2.2.conv2"), ("stages.1.1.conv2", "stages.1.2.conv2")]


@pytest.fixture(scope="module")
def twin():
    if not (CKPT / "scale-sharesnet-unshared" / "card.json").is_file():
        pytest.skip("needs the shipped ShaResNet twin")
    return load_checkpoint(CKPT / "scale-sharesnet-unshared")[0]  # in eval mode, as the app caches it


@pytest.fixture(scope="module")
def data():
    cal = load_split("mnist5k-scale", "train", seed=0).spread(64)
    held = load_split("mnist5k-scale", "test", seed=0).spread(100)
    return cal.images, cal.labels, held.images, held.labels


class OtherSession:
    """Forward passes of one image through ``model`` in a thread of its own, in a loop, with every pass's
    mode recorded; while running, every forward pass of ``model`` in the thread that started it waits,
    after the pass (its hooks fired), until one whole pass of the loop has run."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor) -> None:
        self.model, self.image = model, image
        self.passes, self.modes, self.error = 0, set(), None
        self.done = threading.Condition()
        self.stop = threading.Event()
        self.owner = threading.get_ident()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                self.modes.add(self.model.training)
                with torch.no_grad():
                    self.model(self.image)
                with self.done:
                    self.passes += 1
                    self.done.notify_all()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def __enter__(self) -> OtherSession:
        def interleave(module, args, output) -> None:  # a function, not a method: copies of the model carry it
            if module is not self.model or threading.get_ident() != self.owner:
                return  # a copy of the model, or the loop's own pass
            with self.done:
                target = self.passes + 2  # one pass that starts after this point, whole
                assert self.done.wait_for(lambda: self.passes >= target or self.error is not None, timeout=30)

        self.handle = self.model.register_forward_hook(interleave)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.handle.remove()
        assert self.error is None, self.error


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def _same_state(model, state) -> None:
    tensors, modes = state
    now = model.state_dict()
    assert set(now) == set(tensors)
    assert all(torch.equal(now[k], v) for k, v in tensors.items()), "the shared model's weights or statistics changed"
    assert {n: m.training for n, m in model.named_modules()} == modes, "the shared model's mode changed"
    assert all(p.grad is None for p in model.parameters())


def test_scoring_is_not_disturbed_by_another_threads_forward_passes(twin, data):
    from wsviz.analysis.opportunities import find_opportunities

    x, y, hx, hy = data
    before = _state(twin)
    quiet = find_opportunities(twin, x, y, groups=GROUPS, held_out=(hx, hy))
    with OtherSession(twin, hx[:1]) as other:
        busy = find_opportunities(twin, x, y, groups=GROUPS, held_out=(hx, hy))
    assert other.passes >= 2  # it did run, inside the analysis's passes
    assert other.modes == {False}  # and never saw the shared model switched to training mode
    _same_state(twin, before)
    assert all(np.isfinite(r.output_cka) for r in busy.rows)
    assert busy.rows == quiet.rows  # every score, to the bit: CKA, gradient conflict, drop, loss, KL
    for a, b in zip(quiet.stages, busy.stages):
        assert np.array_equal(a.output_cka, b.output_cka) and np.array_equal(a.weight_similarity, b.weight_similarity)
    assert busy.baseline == quiet.baseline


def test_tying_is_not_disturbed_by_another_threads_forward_passes(twin, data):
    """The least-squares kernel's input covariances (tie, choose_groups) and the search for the BatchNorms
    that can absorb a scale (lstsq-bn) record the analysis's images only."""
    from wsviz.models.tie import absorbing_norms, tie

    x = data[0]
    before = _state(twin)
    quiet = tie(twin, GROUPS, "lstsq", x)
    with OtherSession(twin, data[2][:1]) as other:
        busy = tie(twin, GROUPS, "lstsq", x)
    assert other.passes >= 2
    _same_state(twin, before)
    for g in GROUPS:
        assert torch.equal(busy.get_submodule(g[0]).weight, quiet.get_submodule(g[0]).weight)

    own = copy.deepcopy(twin)  # absorbing_norms rescales weights on trial: never on a shared model
    convs = [own.get_submodule(n) for g in GROUPS for n in g]
    quiet_norms = absorbing_norms(own, convs, x)
    assert any(quiet_norms)  # there is something to find
    with OtherSession(own, data[2][:1]) as other:
        busy_norms = absorbing_norms(own, convs, x)
    assert other.passes >= 2
    assert busy_norms == quiet_norms


def test_a_model_in_training_mode_is_analysed_on_a_copy_not_switched(twin, data):
    """The app caches models in eval mode; one in training mode (another thread may be training it) is not
    switched to eval mode under that thread's feet: the analysis runs an eval-mode copy instead, and
    scores it as it scores the model in eval mode."""
    from wsviz.analysis.opportunities import find_opportunities
    from wsviz.models.tie import tie

    x, y, hx, hy = data
    quiet = find_opportunities(twin, x, y, groups=GROUPS, held_out=(hx, hy))
    same = find_opportunities(copy.deepcopy(twin).train(), x, y, groups=GROUPS, held_out=(hx, hy))
    assert same.rows == quiet.rows and same.baseline == quiet.baseline
    training = copy.deepcopy(twin).train()
    with OtherSession(training, hx[:1]) as other:
        find_opportunities(training, x, y, groups=GROUPS, held_out=(hx, hy))
        tie(training, GROUPS, "lstsq", x)
    assert other.passes >= 2 and other.modes == {True}  # every pass of the other thread ran in training mode
    assert all(m.training for m in training.modules())


# ------------------------------------------------------------------------- the page quotes REPORT.md's ranking
def test_the_share_page_quotes_the_ranking_evidence_report_md_shows():
    """The explanation's ρ values are REPORT.md's "Ranking" table (both rendered from checkpoints/tying.json),
    for the weights the library uses: a number restated by hand would drift from the report."""
    import json
    import re

    from conftest import open_app

    from wsviz.zoo import ranking_evidence

    root = Path(__file__).resolve().parents[1]
    ev = ranking_evidence(json.loads((root / "checkpoints" / "tying.json").read_text()))
    report = (root / "checkpoints" / "REPORT.md").read_text()
    combined = re.search(r"\| combined \(chosen on val\) \|(?: [-\d.]+ \|){3} ([-\d.]+) \| ([-\d.]+) \|", report)
    kl = re.search(r"\| measured_kl \|(?: [-\d.]+ \|){3} ([-\d.]+) \|", report)
    assert combined and kl
    assert f"{ev['rho_test']:.2f}" == combined.group(1) and f"{ev['kl_test']:.2f}" == kl.group(1)
    assert f"{ev['rho_val']:.2f}" == combined.group(2) and ev["current"]
    at = open_app("pages/share.py", ["scale-sharesnet-unshared"])
    assert not at.exception
    said = "\n".join(str(m.value) for m in at.markdown)
    assert (f"over the {ev['groups']} candidate groups of {ev['model']} ({ev['seeds']} seeds), against the accuracy "
            f"each group lost after a {ev['steps']}-step fine-tune: Spearman ρ {combined.group(2)} on val, ") in said
    # with the interval REPORT.md judges the target by: ρ over one model's groups is not exact
    ci = re.search(r"95% interval \[([-\d.]+), ([-\d.]+)\] \(Fisher z", report)
    assert ci and (f"{combined.group(1)} on the other half (95% interval [{ci.group(1)}, {ci.group(2)}]), where the "
                   f"KL alone reached {kl.group(1)}") in said
    assert "3x3-or-larger" in said and "before BatchNorm" in said
