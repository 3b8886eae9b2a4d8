"""Repeated analyses do not grow memory: 100 calls keep RSS within 1.1x of its start."""

from __future__ import annotations

import gc

import torch

from wsviz.analysis.attribution import attribute
from wsviz.analysis.features import feature_maps
from wsviz.data.datasets import load_split
from wsviz.models import create_model


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def _stable_rss(fn, repeats: int = 100) -> tuple[int, int]:
    for _ in range(10):  # warm-up: allocator pools, lazy imports, caches
        fn()
    gc.collect()
    start = rss_bytes()
    for _ in range(repeats):
        fn()
    gc.collect()
    return start, rss_bytes()


def test_feature_maps_and_attribution_do_not_leak():
    torch.manual_seed(0)
    x = load_split("mnist5k", "test").images[:4]
    model = create_model("msws_resnet_digits").eval()

    def maps():
        fm = feature_maps(model, x[0])
        assert fm

    def attr():
        res = attribute(model, x, "integrated_gradients", ig_steps=8)
        assert res.maps.shape[0] == 4

    def cam():
        attribute(model, x[:2], "grad_cam")

    for fn in (maps, attr, cam):
        start, end = _stable_rss(fn)
        assert end <= 1.1 * start, f"{fn.__name__}: RSS grew from {start / 2**20:.0f} MiB to {end / 2**20:.0f} MiB"
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
