"""Sharing is real: one parameter, several places, gradients from all of them, stored once."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch import nn

from wsviz.models import create_model, sharing_report, summarize
from wsviz.models.sharing import MultiRateConv2d, SharedConv2d

# One shared model per family (small configs), with its unshared twin.
PAIRS = {
    "msws": (("msws_resnet_digits", {"sharing": "shared"}), ("msws_resnet_digits", {"sharing": "unshared"})),
    "wsms": (("wsms_resnet_digits", {"shared": True}), ("wsms_resnet_digits", {"shared": False})),
    "sharesnet": (("sharesnet_wrn_digits", {"shared": True}), ("sharesnet_wrn_digits", {"shared": False})),
    "shardnet": (("shardnet_vgg", {"kind": "S", "width": 32}), ("shardnet_vgg", {"kind": "E", "width": 32})),
    "sl_resnet": (("sl_resnet34", {"width": 16}), None),
    "repeatnet_depth": (("repeatnet_vgg", {"mode": "linear", "base": "VGG4"}), None),
}


def _site_inputs(model: nn.Module, x: torch.Tensor, sites: set[str]) -> dict[str, tuple]:
    """The input each named module received in one forward pass."""
    got: dict[str, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, _n=n: got.setdefault(_n, tuple(t.detach().clone() for t in a)))
               for n, m in model.named_modules() if n in sites]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_changing_a_shared_parameter_changes_every_use(family):
    (name, cfg), _ = PAIRS[family]
    torch.manual_seed(0)
    model = create_model(name, **cfg).eval()
    uses, _, _ = sharing_report(model)
    by_param: dict[str, list[str]] = {}
    for u in uses:
        by_param.setdefault(u.param, []).append(u.site)
    shared = {p: set(s) for p, s in by_param.items() if len(s) > 1 and p.endswith("weight")}
    assert shared, f"{name} reports no weight used at more than one place"
    x = torch.randn(2, *_shape(model))
    params = dict(model.named_parameters())
    for pname, sites in shared.items():
        inputs = _site_inputs(model, x, sites)
        modules = dict(model.named_modules())
        with torch.no_grad():
            before = {s: modules[s](*inputs[s]).clone() for s in sites}
            params[pname].add_(torch.randn_like(params[pname]))
            after = {s: modules[s](*inputs[s]) for s in sites}
        for s in sites:
            # every place: each rate of a multi-rate conv is its own channel group
            for b, a in zip(_chunks(modules[s], before[s]), _chunks(modules[s], after[s])):
                assert not torch.allclose(b, a), f"{s} did not change when {pname} did"


def _chunks(module: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A site's output, one piece per use: a multi-rate conv's rates are channel groups of one output."""
    return out.chunk(len(getattr(module, "rates", (1,))), dim=1)


def _shared_groups(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Every weight applied more than once -> its uses as (site, piece of that site's output)."""
    uses, _, _ = sharing_report(model)
    by_param: dict[str, list[tuple[str, int]]] = {}
    for u in uses:
        group = by_param.setdefault(u.param, [])
        group.append((u.site, sum(1 for site, _ in group if site == u.site)))
    return {p: g for p, g in by_param.items() if len(g) > 1 and p.endswith("weight")}


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_a_gradient_through_each_use_site_reaches_the_one_stored_tensor(family):
    """Training sees every use: a loss on one use site's output alone gives the stored weight a gradient."""
    (name, cfg), _ = PAIRS[family]
    torch.manual_seed(0)
    model = create_model(name, **cfg).eval()
    groups = _shared_groups(model)
    assert groups
    x = torch.randn(2, *_shape(model))
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    for pname, uses in groups.items():
        inputs = _site_inputs(model, x, {s for s, _ in uses})
        for site, piece in uses:
            model.zero_grad(set_to_none=True)
            out = _chunks(modules[site], modules[site](*inputs[site]))[piece]
            (out * torch.randn_like(out)).sum().backward()
            grad = params[pname].grad
            assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {pname} from {site} (use {piece})"


@pytest.mark.parametrize("family", [f for f, (_, twin) in PAIRS.items() if twin is not None])
def test_unshared_twin_copies_are_distinct_in_the_forward_pass(family):
    """Where the shared model applies one weight, its twin applies a separate copy at each place:
    changing the copy used at one place changes that place's output and no other."""
    (name, cfg), (tname, tcfg) = PAIRS[family]
    torch.manual_seed(0)
    shared, twin = create_model(name, **cfg).eval(), create_model(tname, **tcfg).eval()
    tuses, _, _ = sharing_report(twin)
    used_at: dict[str, list[str]] = {}  # site -> the twin's weights applied there, in order
    for u in tuses:
        if re.search(r"(^|\.)weights?(\.\d+)?$", u.param):  # weight, or weights.<rate> of a multi-rate conv
            used_at.setdefault(u.site, []).append(u.param)
    params, modules = dict(twin.named_parameters()), dict(twin.named_modules())
    x = torch.randn(2, *_shape(twin))
    groups = _shared_groups(shared)
    assert groups
    for pname, uses in groups.items():
        copies = [used_at[site][piece] for site, piece in uses]
        assert len(set(copies)) == len(uses), f"{tname} applies one weight at {uses}"
        inputs = _site_inputs(twin, x, {s for s, _ in uses})

        def outputs():
            with torch.no_grad():
                return [_chunks(modules[s], modules[s](*inputs[s]))[k].clone() for s, k in uses]

        base = outputs()
        for k, copy_name in enumerate(copies):
            saved = params[copy_name].detach().clone()
            with torch.no_grad():
                params[copy_name].add_(torch.randn_like(saved))
            changed = [not torch.equal(a, b) for a, b in zip(base, outputs())]
            with torch.no_grad():
                params[copy_name].copy_(saved)
            assert changed == [j == k for j in range(len(uses))], (pname, copy_name, changed)


def _shape(model):
    c = model.wsviz_config
    return (c["in_channels"], c["input_size"], c["input_size"])


def test_gradients_from_all_uses_accumulate_shardnet():
    """The shared conv's gradient is the sum of the gradients of independent copies."""
    torch.manual_seed(0)
    model = create_model("shardnet_vgg", kind="S", width=16, in_channels=1, input_size=28).eval()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    shared_grad = model.shared.weight.grad.clone()

    untied = copy.deepcopy(model)
    untied.zero_grad()
    copies = []
    for m in untied.modules():
        if isinstance(m, SharedConv2d):
            own = copy.deepcopy(untied.shared)
            m.__dict__["source"] = own
            copies.append(own)
    assert len(copies) == 13
    nn.functional.cross_entropy(untied(x), y).backward()
    summed = sum(c.weight.grad for c in copies)
    torch.testing.assert_close(shared_grad, summed, rtol=1e-4, atol=1e-6)
    assert all(c.weight.grad.abs().sum() > 0 for c in copies)


def test_gradients_from_all_rates_accumulate_msws():
    """A shared multi-rate conv's gradient is the mean over its rates (Aich et al., Eq. 1); with
    ``rate_grad="sum"``, autograd's sum. Each rate's gradient is that of an unshared copy."""
    torch.manual_seed(0)
    for rate_grad, reduce in (("mean", lambda gs: sum(gs) / len(gs)), ("sum", sum)):
        shared = MultiRateConv2d(3, 9, 3, padding=1, rates=(1, 2, 3), shared=True, rate_grad=rate_grad)
        unshared = MultiRateConv2d(3, 9, 3, padding=1, rates=(1, 2, 3), shared=False)
        with torch.no_grad():
            for w in unshared.weights:
                w.copy_(shared.weight)
        x = torch.randn(2, 3, 9, 9)
        target = torch.randn(2, 9, 9, 9)
        torch.testing.assert_close(shared(x), unshared(x))
        ((shared(x) - target) ** 2).sum().backward()
        ((unshared(x) - target) ** 2).sum().backward()
        torch.testing.assert_close(shared.weight.grad, reduce([w.grad for w in unshared.weights]), rtol=1e-4,
                                   atol=1e-5)


def _state_bytes(model: nn.Module) -> int:
    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


@pytest.mark.parametrize("family", [f for f, (_, twin) in PAIRS.items() if twin is not None])
def test_saved_state_holds_shared_tensors_once(family):
    (name, cfg), (tname, tcfg) = PAIRS[family]
    model, twin = create_model(name, **cfg), create_model(tname, **tcfg)
    # No two state entries alias the same storage: each shared tensor is saved once.
    ptrs = [v.untyped_storage().data_ptr() for v in model.state_dict().values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))
    b_shared, b_twin = _state_bytes(model), _state_bytes(twin)
    n_shared = sum(v.numel() for v in model.state_dict().values())
    n_twin = sum(v.numel() for v in twin.state_dict().values())
    assert b_shared < b_twin
    # The stored tensors differ exactly by the parameters sharing removed (plus buffers, e.g.
    # the twin's own BatchNorm statistics where it has more norm layers).
    removed = summarize(twin).unique_params - summarize(model).unique_params
    assert n_twin - n_shared == removed + _buffer_delta(model, twin)


def _buffer_delta(model, twin) -> int:
    return sum(b.numel() for b in twin.buffers()) - sum(b.numel() for b in model.buffers())


def test_shared_model_effective_params_equal_its_twin():
    """Effective ("as if unshared") parameters of a shared model equal its twin's unique ones."""
    for (name, cfg), twin in [PAIRS["msws"], PAIRS["sharesnet"], PAIRS["wsms"]]:
        s = summarize(create_model(name, **cfg))
        t = summarize(create_model(twin[0], **twin[1]))
        assert s.effective_params == t.unique_params
        assert s.compression > 1.0
        assert t.compression == pytest.approx(1.0)


def test_sharing_report_counts_uses():
    s = summarize(create_model("shardnet_vgg", kind="SL", width=16))
    uses = s.uses_by_param()
    assert len([u for u in uses["shared.weight"] if u.op == "conv2d"]) == 13
    assert all(len(v) == 1 for k, v in uses.items() if "features" in k)
    m = summarize(create_model("msws_resnet_digits", sharing="shared", n_rates=3, base_width=24))
    some = next(iter(m.shared_params().values()))
    assert sorted(u.detail for u in some) == ["stride=1 padding=1 dilation=1", "stride=1 padding=2 dilation=2",
                                              "stride=1 padding=3 dilation=3"]


def test_repeatnet_uses_are_derived():
    """A RepeatNet parent block is applied as a larger realised block, traced to its parameters."""
    s = summarize(create_model("repeatnet_rotmnist_cnn", mode="swish", match="c4"))
    parent = s.uses_by_param()["features.0.weight"]
    assert parent and all(u.derived for u in parent)
    assert parent[0].applied_shape == (64, 1, 7, 7)
    assert "features.0.alphas" in s.uses_by_param()
    assert not s.unused_params
    # the realised network applies as many weights as its dense counterpart of the same width
    dense = sum(p.numel() for n, p in create_model("repeatnet_rotmnist_cnn", mode="linear", match="c4").named_parameters())
    assert s.effective_params > dense


def test_bytes_roundtrip_of_shared_model():
    """Saving and loading restores sharing: the loaded model still uses one tensor everywhere."""
    from safetensors.torch import load

    model = create_model("sharesnet_wrn_digits")
    state = load(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    fresh = create_model("sharesnet_wrn_digits")
    fresh.load_state_dict(state)
    sites = [m for m in fresh.modules() if isinstance(m, SharedConv2d)]
    assert sites and all(any(s.weight is p for p in fresh.parameters()) for s in sites)
    x = torch.randn(2, 1, 28, 28)
    model.eval(), fresh.eval()
    torch.testing.assert_close(model(x), fresh(x))



# ----------------------------------------------------------------------- accounting laws
_SMALL = create_model("resnet_digits", base_width=8, depth=8)
_CONVS = [n for n, m in _SMALL.named_modules() if isinstance(m, nn.Conv2d)]
_TIEABLE = [(a, b) for i, a in enumerate(_CONVS) for b in _CONVS[i + 1:]
            if _SMALL.get_submodule(a).weight.shape == _SMALL.get_submodule(b).weight.shape
            and (_SMALL.get_submodule(a).bias is None) == (_SMALL.get_submodule(b).bias is None)]


@settings(max_examples=12, deadline=None)
@given(st.sets(st.sampled_from(_TIEABLE), min_size=1, max_size=3))
def test_tying_layers_removes_exactly_their_parameters_and_keeps_effective_ones(pairs):
    """Tie layer b to layer a (b's use site applies a's weight): unique parameters drop by exactly b's,
    the applied (effective) parameters stay the same, and unique <= effective throughout."""
    from wsviz.models.sharing import set_submodule

    model = create_model("resnet_digits", base_width=8, depth=8)
    before = summarize(model)
    assert before.unique_params <= before.effective_params
    tied, removed = set(), 0
    for a, b in sorted(pairs):
        if a in tied or b in tied:  # a layer is tied once, to a layer that keeps its own weight
            continue
        src, old = model.get_submodule(a), model.get_submodule(b)
        removed += sum(p.numel() for p in old.parameters())
        set_submodule(model, b, SharedConv2d(src, stride=old.stride[0], padding=old.padding[0], dilation=old.dilation[0]))
        tied.add(b)
        if isinstance(src, nn.Conv2d):
            tied.add(a)
    after = summarize(model)
    assert after.unique_params == before.unique_params - removed == sum(p.numel() for p in model.parameters())
    assert after.effective_params == before.effective_params
    assert after.unique_params <= after.effective_params
