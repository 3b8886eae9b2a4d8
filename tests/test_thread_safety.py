"""The app shares one model object per checkpoint among every browser session (st.cache_resource),
and Streamlit runs each session in a thread of its own. An analysis must therefore neither record
another thread's forward pass through that object (its hooks see only their own thread:
``wsviz.models.hooks.this_thread``) nor change the object while others run it (training mode,
BatchNorm statistics, captum's hooks: those happen on a private copy)."""

from __future__ import annotations

import threading

import torch

from wsviz.analysis.attribution import attribute, default_cam_layer
from wsviz.analysis.features import capture, select_taps
from wsviz.models import create_model, summarize
from wsviz.models.hooks import this_thread


def _model():
    torch.manual_seed(0)
    return create_model("resnet_digits", base_width=8, depth=8).eval()


def test_a_hook_acts_only_in_the_thread_that_set_it():
    calls = []
    hook = this_thread(lambda *a: calls.append(threading.get_ident()) or "seen")
    other = []
    t = threading.Thread(target=lambda: other.append(hook(1, 2)))
    t.start()
    t.join()
    assert other == [None] and calls == []
    assert hook(1, 2) == "seen" and calls == [threading.get_ident()]


def test_captured_maps_are_this_threads_pass_not_another_sessions():
    model = _model()
    mine, theirs = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    taps = select_taps(model)
    with torch.no_grad():
        with capture(model, taps) as got:
            model(mine)
            # another session's prediction through the same object, after this pass and inside the capture
            t = threading.Thread(target=lambda: model(theirs))
            t.start()
            t.join()
        alone = {}
        with capture(model, taps) as alone_got:
            model(mine)
            alone.update(alone_got)
    assert got.keys() == alone.keys() and got
    for name in got:
        assert torch.equal(got[name], alone[name]), name


def _watch(model):
    """A hook (the test's own) on the model the app would share: for each forward pass through that
    object, whether any module was in training mode and how many forward hooks it carried."""
    seen = []
    baseline = sum(len(m._forward_hooks) for m in model.modules())

    def hook(mod, args):
        seen.append((any(m.training for m in model.modules()),
                     sum(len(m._forward_hooks) for m in model.modules()) - baseline))
    return seen, model.register_forward_pre_hook(hook)


def test_counting_parameters_and_flops_never_puts_the_shared_model_in_training_mode():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen, handle = _watch(model)
    summarize(model)
    handle.remove()
    assert all(not training and extra == 0 for training, extra in seen), seen
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_grad_cam_hooks_a_copy_not_the_shared_model():
    model = _model()
    layer = default_cam_layer(model)  # its probe's hooks act in this thread only (the test above)
    seen, handle = _watch(model)
    attribute(model, torch.rand(2, 1, 32, 32), "grad_cam", layer=layer)
    attribute(model, torch.rand(2, 1, 32, 32), "saliency")
    handle.remove()
    assert all(not training and extra == 0 for training, extra in seen), seen
