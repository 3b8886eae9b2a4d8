"""Registry behaviour, forward/backward of every registered model, taps, equivariance."""

from __future__ import annotations

import pytest
import torch

from wsviz import WsvizError
from wsviz.models import create_model, get_spec, input_shape, list_models, list_taps, summarize

ALL = list_models()
FAMILIES = {"msws", "wsms", "repeatnet", "shardnet", "sharesnet", "equivariant"}


def test_every_family_is_registered():
    assert {get_spec(n).family for n in list_models()} == FAMILIES
    for name in ["msws_resnet18", "msws_resnet34", "msws_resnet50", "msws_resnet101", "msws_resnet152",
                 "msws_alexnet", "resnet110", "wsms_resnet110", "wsms_resnet50", "wsms_resnet101",
                 "wsms_resnet152", "repeatnet_rotmnist_cnn", "steerable_rotmnist", "e2cnn_c8_tutorial",
                 "shardnet_vgg", "sl_resnet34", "sl_resnet50", "sharesnet34", "sharesnet50", "sharesnet101",
                 "sharesnet152", "sharesnet_wrn40_4", "sharesnet_wrn28_10", "sharesnet_resnet164"]:
        assert name in ALL


def test_unknown_name_names_close_matches():
    with pytest.raises(WsvizError) as exc:
        create_model("msws_resnet05")
    assert "msws_resnet50" in str(exc.value)


def test_unknown_override_names_close_matches():
    with pytest.raises(WsvizError) as exc:
        create_model("msws_resnet18", shraing="shared")
    assert "'sharing'" in str(exc.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"sharing": "half"}, "'vanilla'"), ({"num_classes": 0}, "positive integer"),
    ({"num_classes": "ten"}, "positive integer"),
])
def test_bad_override_values(kwargs, needle):
    with pytest.raises(WsvizError, match=needle):
        create_model("msws_resnet_digits", **kwargs)


def test_impossible_combination_is_a_wsviz_error():
    with pytest.raises(WsvizError, match="cannot be split"):
        create_model("msws_resnet_digits", n_rates=3)


def test_spec_metadata_and_config_roundtrip():
    spec = get_spec("wsms_resnet110")
    assert spec.family == "wsms" and "WSMS" in spec.paper
    assert (spec.in_channels, spec.input_size, spec.num_classes) == (3, 32, 10)
    m = create_model("wsms_resnet110", num_classes=100, integration="3x3")
    assert m.wsviz_config["num_classes"] == 100 and m.wsviz_config["integration"] == "3x3"
    assert input_shape(m) == (3, 32, 32)
    again = create_model(m.wsviz_name, **{k: v for k, v in m.wsviz_config.items()})
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in m.parameters())


def _run_forward_backward(model):
    c, h, w = input_shape(model)
    model.train()
    x = torch.randn(2, c, h, w)
    out = model(x)
    assert out.shape == (2, model.wsviz_config["num_classes"])
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", [n for n in ALL if n != "e2cnn_c8_tutorial"])
def test_every_registered_model_runs_forward_and_backward(name):
    model = create_model(name)
    _run_forward_backward(model)
    # Each parameter is stored once (e2cnn itself aliases some of its fixed basis buffers
    # between layers, so for its models only parameters are checked).
    state = model.state_dict()
    keys = dict(model.named_parameters()) if get_spec(name).family == "equivariant" else state
    ptrs = [state[k].untyped_storage().data_ptr() for k in keys if state[k].numel()]
    assert len(ptrs) == len(set(ptrs)), "a tensor is stored twice in the state dict"


def test_e2cnn_tutorial_runs_forward_and_backward(c8_tutorial):
    _run_forward_backward(c8_tutorial)


@pytest.mark.parametrize("name,options", [
    ("msws_resnet_digits", {"sharing": ("vanilla", "unshared", "shared")}),
    ("wsms_resnet_digits", {"integration": ("none", "1x1", "3x3"), "shared": (True, False)}),
    ("repeatnet_rotmnist_cnn", {"mode": ("none", "linear", "swish", "bireal"), "match": ("c4", "c8", "c16")}),
    ("shardnet_vgg", {"kind": ("E", "S", "SL")}),
    ("sharesnet_wrn_digits", {"shared": (True, False)}),
    ("repeatnet_vgg", {"mode": ("none", "linear", "swish", "bireal"), "base": ("VGG4", "VGG6", "VGG8")}),
])
def test_small_model_options_run(name, options):
    for key, values in options.items():
        for v in values:
            _run_forward_backward(create_model(name, **{key: v}))


def test_digit_variants_of_every_family_take_28x28():
    for name, kw in [("shardnet_vgg", {"in_channels": 1, "input_size": 28, "width": 32}),
                     ("repeatnet_resnet18", {"in_channels": 1, "input_size": 28, "base_width": 8}),
                     ("sl_resnet34", {"in_channels": 1, "input_size": 28, "width": 16, "num_classes": 10})]:
        _run_forward_backward(create_model(name, **kw))


# --------------------------------------------------------------------------- taps
@pytest.mark.parametrize("name,kw,kind,count", [
    ("msws_resnet_digits", {}, "rate", 12),  # 6 blocks x 2 rates
    ("wsms_resnet_digits", {}, "stage", 3),
    ("shardnet_vgg", {"kind": "S"}, "iteration", 13),
    ("sl_resnet34", {"width": 8}, "iteration", 32),
    ("msws_resnet18", {}, "level", 4),
    ("sharesnet_wrn_digits", {}, "level", 3),
])
def test_named_outputs(name, kw, kind, count):
    model = create_model(name, **kw)
    taps = list_taps(model, kind)
    assert len(taps) == count
    assert len(list_taps(model, "embedding")) == 1
    got = {}
    mods = dict(model.named_modules())
    hs = [mods[t.name].register_forward_hook(lambda m, a, o, _n=t.name: got.__setitem__(_n, o)) for t in taps]
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, *input_shape(model)))
    for h in hs:
        h.remove()
    assert set(got) == {t.name for t in taps}


def test_every_model_has_an_embedding_tap():
    for name in ALL:
        if name == "e2cnn_c8_tutorial":
            continue
        assert len(list_taps(create_model(name), "embedding")) == 1, name


# --------------------------------------------------------------------- equivariance
def _rot_gap(model, size: int) -> float:
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(8, 1, size, size)
    with torch.no_grad():
        y = model(x)
        gaps = [(y - model(torch.rot90(x, k, (2, 3)))).abs().max() / y.abs().max() for k in (1, 2, 3)]
    return float(max(gaps))


@pytest.mark.parametrize("N", [4, 8, 16])
def test_steerable_models_are_invariant_to_90_degree_rotations(N):
    assert _rot_gap(create_model("steerable_rotmnist", N=N), 28) < 1e-5


def test_e2cnn_tutorial_is_invariant_to_90_degree_rotations(c8_tutorial):
    assert _rot_gap(c8_tutorial, 29) < 1e-5


def test_plain_rotmnist_cnn_is_not_invariant():
    assert _rot_gap(create_model("repeatnet_rotmnist_cnn", mode="none"), 28) > 1e-3


# ----------------------------------------------------------------------- accounting
def test_msws_keeps_flops_and_unshared_matches_vanilla():
    """Aich et al.: sharing cuts parameters, not computation."""
    v = summarize(create_model("msws_resnet_digits", sharing="vanilla"))
    s = summarize(create_model("msws_resnet_digits", sharing="shared"))
    u = summarize(create_model("msws_resnet_digits", sharing="unshared"))
    assert v.flops == s.flops == u.flops
    assert v.unique_params == u.unique_params > s.unique_params
    assert s.effective_params == v.unique_params


def test_repeatnet_matches_steerable_flops():
    """RepeatNet Table 4: RepCNN variants are matched in inference FLOPs to C4/C8/C16 (within 15%)."""
    for match, N in (("c4", 4), ("c8", 8), ("c16", 16)):
        r = summarize(create_model("repeatnet_rotmnist_cnn", mode="swish", match=match))
        e = summarize(create_model("steerable_rotmnist", N=N))
        assert abs(r.flops / e.flops - 1) < 0.15, (match, r.flops, e.flops)
