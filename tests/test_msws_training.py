"""msws trained as Aich et al. define it (issue 12): a shared kernel's gradient is the mean of its
per-rate gradients, and every variant starts from the vanilla layer's initial distribution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsviz.models import create_model, summarize
from wsviz.models.sharing import MultiRateConv2d


def per_rate_gradients(m: MultiRateConv2d, x: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
    """The gradient each rate's use alone gives the shared kernel (computed without the module)."""
    grads = []
    per = m.out_channels // len(m.rates)
    for i, rate in enumerate(m.rates):
        w = m.weight.detach().clone().requires_grad_(True)
        pad = m.padding + (rate - 1) * (m.kernel_size - 1) // 2
        y = F.conv2d(x, w, None, m.stride, pad, rate)
        (y * r[:, i * per:(i + 1) * per]).sum().backward()
        grads.append(w.grad)
    return grads


@pytest.mark.parametrize("rates", [(1, 2), (1, 2, 3)])
def test_shared_gradient_is_the_mean_over_rates(rates):
    torch.manual_seed(0)
    m = MultiRateConv2d(4, 2 * len(rates), 3, padding=1, rates=rates, shared=True)
    x = torch.randn(2, 4, 9, 9)
    out = m(x)
    r = torch.randn_like(out)
    (out * r).sum().backward()
    expected = torch.stack(per_rate_gradients(m, x, r))
    assert torch.allclose(m.weight.grad, expected.mean(0), atol=1e-6)
    summed = MultiRateConv2d(4, m.out_channels, 3, padding=1, rates=rates, shared=True, rate_grad="sum")
    summed.load_state_dict(m.state_dict())
    out_sum = summed(x)
    assert torch.equal(out_sum, out)  # the forward pass is the same, bit for bit
    (out_sum * r).sum().backward()
    assert torch.allclose(summed.weight.grad, expected.sum(0), atol=1e-5)


def test_the_accounting_still_sees_the_shared_kernel_applied_as_is():
    s = summarize(create_model("msws_resnet_digits", sharing="shared"))
    reused = [r for r in s.reuse().values() if r.reused]
    assert reused and all(r.kinds == ["direct"] and len(r.uses) == 2 for r in reused)


def test_every_variant_starts_from_the_vanilla_layers_distribution():
    torch.manual_seed(0)
    stds = {}
    for sharing in ("vanilla", "unshared", "shared"):
        layers = [create_model("msws_resnet_digits", sharing=sharing).trunk.stages[2][1].conv2 for _ in range(4)]
        w = torch.cat([p.detach().flatten() for layer in layers for p in layer.parameters() if p.dim() == 4])
        stds[sharing] = float(w.std())
    # each pooled sample has at least 4 x 32x64x3x3 = 73,728 weights: the std's relative error is ~0.3%
    assert stds["shared"] == pytest.approx(stds["vanilla"], rel=0.03), stds
    assert stds["unshared"] == pytest.approx(stds["vanilla"], rel=0.03), stds
