"""The embedded digits: fixed stratified split, seeded protocols in range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsviz import WsvizError
from wsviz.data.digits import (
    load_mnist5k_arrays,
    mnist5k,
    rescale,
    rot_protocol,
    rotate,
    scale_protocol,
    split_indices,
)


def test_split_is_stratified_disjoint_and_stable():
    _, labels = load_mnist5k_arrays()
    s = split_indices(labels)
    assert len(s["train"]) == 4000 and len(s["test"]) == 1000
    assert not set(s["train"]) & set(s["test"])
    assert (np.bincount(labels[s["train"]]) == 400).all()
    assert (np.bincount(labels[s["test"]]) == 100).all()
    again = split_indices(labels)
    assert (again["train"] == s["train"]).all() and (again["test"] == s["test"]).all()
    assert not (split_indices(labels, seed=1)["test"] == s["test"]).all()


def test_mnist5k_tensors():
    test = mnist5k("test")
    assert test.images.shape == (1000, 1, 28, 28) and test.images.dtype == torch.float32
    assert 0.0 <= float(test.images.min()) and float(test.images.max()) <= 1.0
    with pytest.raises(WsvizError):
        mnist5k("validation")


def test_rot_protocol_is_seeded_and_in_range():
    base = mnist5k("test")
    a, b, c = rot_protocol(base, 0), rot_protocol(base, 0), rot_protocol(base, 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.angles, b.angles)
    assert not torch.equal(a.angles, c.angles)
    assert float(a.angles.min()) >= 0.0 and float(a.angles.max()) < 360.0
    assert float(a.angles.std()) > 80  # roughly uniform over the circle (std of U(0,360) ~ 104)


def test_scale_protocol_is_seeded_and_in_range():
    base = mnist5k("test")
    a, b = scale_protocol(base, 3), scale_protocol(base, 3)
    assert torch.equal(a.images, b.images)
    assert float(a.scales.min()) >= 0.3 and float(a.scales.max()) <= 1.0
    # shrinking moves ink toward the centre and reduces it roughly by factor^2
    ink = base.images.sum((1, 2, 3))
    ratio = (a.images.sum((1, 2, 3)) / ink)
    assert torch.corrcoef(torch.stack([ratio, a.scales**2]))[0, 1] > 0.95


def test_transforms_at_identity_and_exact_quarter_turn():
    x = mnist5k("test").images[:8]
    torch.testing.assert_close(rotate(x, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rescale(x, 1.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 90.0), torch.rot90(x, 1, (2, 3)), atol=1e-4, rtol=0)


def test_spread_subset_keeps_every_class_and_the_protocol():
    rot = rot_protocol(mnist5k("test"), 0)
    sub = rot.spread(50)
    assert len(sub.labels) == 50 and sorted(sub.labels.unique().tolist()) == list(range(10))
    idx = torch.linspace(0, 999, 50).round().long()
    assert torch.equal(sub.angles, rot.angles[idx]) and torch.equal(sub.images, rot.images[idx])
    assert rot.spread(None) is rot and rot.spread(5000) is rot
