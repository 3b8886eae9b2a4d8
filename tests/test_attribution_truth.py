"""Attributions and feature maps say what they show: each panel over its own model's input, Grad-CAM's
resolution and Integrated Gradients' completeness error in the titles, and analyses that never switch
the mode of the model object the app shares between sessions."""

from __future__ import annotations

import torch
from torch import nn

import wsviz
from wsviz.analysis.features import feature_maps


def _tiny_with_frozen_bn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    wsviz.adopt(net, (1, 8, 8), taps={"2": "level"})
    return net


# ------------------------------------------------------------------ feature maps leave the model's modes alone
def test_feature_maps_restore_every_submodules_mode():
    """A training model with a frozen (eval-mode) BatchNorm keeps it frozen after a feature-map pass."""
    net = _tiny_with_frozen_bn().train()
    net[1].eval()
    before = [m.training for m in net.modules()]
    maps = feature_maps(net, torch.rand(1, 8, 8))
    assert [f.name for f in maps] == ["2"]
    assert [m.training for m in net.modules()] == before


def test_feature_maps_never_switch_the_mode_of_the_object_they_are_given():
    """The app shares one model object between sessions (threads): switching its mode, even for the length of a
    pass, changes what another session's pass through it computes (hooks.py's policy: a copy changes modes)."""
    net = _tiny_with_frozen_bn().train()
    seen = []
    h = net[0].register_forward_pre_hook(lambda mod, args: seen.append((net.training, net[1].training)))
    try:
        feature_maps(net, torch.rand(1, 8, 8))
    finally:
        h.remove()
    assert seen and all(flags == (True, True) for flags in seen)
    assert net.training and net[1].training


def test_feature_maps_of_a_training_model_are_its_eval_mode_maps():
    """BatchNorm reads its running statistics, not the one image's, as in every other analysis."""
    net = _tiny_with_frozen_bn()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.rand(1, 8, 8)
    got = feature_maps(net.train(), x)[0].maps
    with torch.no_grad():
        torch.testing.assert_close(got, net.eval()[:3](x.unsqueeze(0))[0])
