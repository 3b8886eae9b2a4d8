"""The Compare page's named feature maps are what their titles say: a "rate r" map is its layer's kernels applied
at dilation r to that layer's input (rate 1 is not the rate-2 conv), and a WSMS "stage s (input /2^(s-1))" map is
branch s applied to the input average-pooled by 2^(s-1). Recomputed here from the layer's own weights."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from conftest import needs
from wsviz.analysis.features import feature_maps
from wsviz.models.sharing import MultiRateConv2d, _dilated_padding
from wsviz.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _shipped(name: str):
    return load_checkpoint(ROOT / "checkpoints" / needs(name)[0])[0].eval()


def _digit() -> torch.Tensor:
    from wsviz.data.datasets import load_split

    return load_split("mnist5k", "test").images[7]


def test_each_rate_map_is_its_layers_kernels_at_that_dilation():
    for name in ("scale-msws-shared", "scale-msws-unshared"):
        model = _shipped(name)
        inputs: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, args, out, path=path: inputs.__setitem__(path, args[0]))
                 for path, m in model.named_modules() if isinstance(m, MultiRateConv2d)]
        maps = feature_maps(model, _digit(), kinds=["rate"])
        for h in hooks:
            h.remove()
        assert len(maps) >= 4, name
        checked = 0
        for f in maps:
            layer_path, _, rest = f.name.rpartition(".taps.")
            layer = model.get_submodule(layer_path)
            i = int(rest)
            rate = int(re.match(r"rate (\d+)", f.label).group(1))
            assert rate == layer.rates[i]
            w = layer.weight if layer.shared else layer.weights[i]
            b = layer.bias if layer.shared else (layer.biases[i] if layer.biases is not None else None)
            want = F.conv2d(inputs[layer_path], w, b, layer.stride, _dilated_padding(layer.kernel_size, layer.padding,
                                                                                     rate), rate)[0]
            torch.testing.assert_close(f.maps, want, msg=f"{name} {f.name} ({f.label})")
            other = [r for r in layer.rates if r != rate][0]  # and not the other rate's conv
            wrong = F.conv2d(inputs[layer_path], w, b, layer.stride,
                             _dilated_padding(layer.kernel_size, layer.padding, other), other)[0]
            assert wrong.shape != f.maps.shape or not torch.allclose(f.maps, wrong, atol=1e-4)
            checked += 1
        assert checked == len(maps)


def test_each_wsms_stage_map_is_its_branch_on_the_input_pooled_as_labelled():
    for name in ("scale-wsms-1x1",):
        model = _shipped(name)
        x = _digit().unsqueeze(0)
        maps = feature_maps(model, x[0], kinds=["stage"])
        assert len(maps) == len(model.branches) >= 2
        for s, f in enumerate(maps, start=1):
            factor = int(re.search(r"input /(\d+)", f.label).group(1))
            assert factor == 2 ** (s - 1)
            xs = x if factor == 1 else F.avg_pool2d(x, factor)
            with torch.no_grad():
                want = model.branches[s - 1](xs)[0]
            torch.testing.assert_close(f.maps, want, msg=f"{name} {f.name} ({f.label})")
