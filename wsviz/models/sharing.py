"""The weight-sharing machinery every family is built from.

Three ideas serve all five papers:

* a shared weight is **one** ``nn.Parameter``, owned by exactly one module and *used*
  by several: :class:`SharedConv2d` is a use site that applies another module's
  convolution weights (ShaResNet, ShaRDNet, WSMS-Net) without registering them again,
  so ``model.parameters()`` and the saved state hold each shared tensor once;
* :class:`MultiRateConv2d` applies one kernel set at several dilation rates (Aich et al.);
* :class:`RepeatConv2d` realises a larger filter block from a parent block by tiling and
  a learnable per-tile transform (RepeatNet).

:class:`Tap` marks a named intermediate output (per rate, stage, iteration, level) so the
analysis code can read feature maps of any model the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

TAP_KINDS = ("rate", "stage", "iteration", "level", "embedding")


class Tap(nn.Identity):
    """Identity that marks a named intermediate output.

    ``kind`` is one of :data:`TAP_KINDS`: ``rate`` (one dilation rate of a multi-rate
    conv), ``stage`` (one parallel WSMS stage), ``iteration`` (one application of a
    ShaRDNet shared conv), ``level`` (one stage of blocks / scale level of a CNN) and
    ``embedding`` (the penultimate feature vector).
    """

    def __init__(self, kind: str, label: str) -> None:
        super().__init__()
        if kind not in TAP_KINDS:
            raise ValueError(f"unknown tap kind {kind!r}; expected one of {TAP_KINDS}")
        self.kind = kind
        self.label = label

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, label={self.label!r}"


def _hold(module: nn.Module, name: str, target: nn.Module) -> None:
    """Keep ``target`` on ``module`` without registering it as a submodule."""
    module.__dict__[name] = target


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def explicit_padding(kernel_size: Sequence[int], padding: str | Sequence[int], dilation: Sequence[int]
                     ) -> tuple[int, int, int, int]:
    """The padding a 2-d convolution applies, as :func:`torch.nn.functional.pad` takes it (left, right,
    top, bottom): ``padding`` a pair (height, width), ``"valid"`` (none) or ``"same"`` (total
    ``dilation * (kernel - 1)`` per side pair, the odd one on the right/bottom, as ``nn.Conv2d`` does)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        (th, tw) = (d * (k - 1) for d, k in zip(dilation, kernel_size))
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = padding
    return (pw, pw, ph, ph)


class SharedConv2d(nn.Module):
    """A use site of a convolution whose weight (and bias) live in ``source``.

    ``stride``, ``padding``, ``dilation`` and ``padding_mode`` default to the source's but may
    differ per use (e.g. a stride-1 shared conv reused at another resolution); each takes what
    ``nn.Conv2d`` takes (an int, a (height, width) pair, ``"same"``/``"valid"`` padding), so a use
    site computes exactly what an ``nn.Conv2d`` of that geometry with the source's weight would.
    """

    def __init__(
        self,
        source: nn.Conv2d,
        *,
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] | str | None = None,
        dilation: int | tuple[int, int] | None = None,
        padding_mode: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(source, nn.Conv2d):
            raise TypeError(f"SharedConv2d shares an nn.Conv2d, got {type(source).__name__}")
        _hold(self, "source", source)
        self.stride = source.stride if stride is None else _pair(stride)
        if padding is None:
            padding = source.padding
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = source.dilation if dilation is None else _pair(dilation)
        self.padding_mode = source.padding_mode if padding_mode is None else padding_mode
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {self.padding!r}")
            if self.padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        self.in_channels = source.in_channels
        self.out_channels = source.out_channels
        self.kernel_size = source.kernel_size

    @property
    def weight(self) -> torch.Tensor:
        return self.source.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        if self.padding_mode != "zeros":  # as nn.Conv2d does: pad explicitly, then convolve unpadded
            x = F.pad(x, explicit_padding(self.kernel_size, self.padding, self.dilation), mode=self.padding_mode)
            return F.conv2d(x, src.weight, src.bias, self.stride, 0, self.dilation, src.groups)
        return F.conv2d(x, src.weight, src.bias, self.stride, self.padding, self.dilation, src.groups)

    def extra_repr(self) -> str:
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (
            f"shares {self.in_channels}->{self.out_channels} {self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}{mode}"
        )


def _dilated_padding(kernel_size: int, padding: int, rate: int) -> int:
    """Padding that keeps the output size of a rate-``rate`` conv equal to rate 1."""
    return padding + (rate - 1) * (kernel_size - 1) // 2


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` itself in the forward pass (bit for bit), its gradient scaled by ``scale``. The result
    remembers ``x`` (``_wsviz_source``), so the accounting still sees the parameter applied as is."""
    out = _ScaleGrad.apply(x, scale)
    out._wsviz_source = x
    return out


RATE_GRADS = ("mean", "sum")


class MultiRateConv2d(nn.Module):
    """One conv layer split over dilation rates (Aich et al., Eq. 1).

    ``out_channels`` kernels are split into ``len(rates)`` groups of ``out/n``. With
    ``shared=True`` a single set of ``out/n`` kernels (and biases) is applied at every rate;
    with ``shared=False`` each rate has its own set. Outputs are concatenated along
    channels, rate 1 first.

    A shared kernel's gradient is the *mean* of its per-rate gradients, as Aich et al. define
    it (Eq. 1); ``rate_grad="sum"`` keeps autograd's sum (n times larger steps for the shared
    kernels than for any unshared layer). The forward pass is the same either way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        rates: Sequence[int] = (1, 2),
        shared: bool = True,
        bias: bool = False,
        rate_grad: str = "mean",
    ) -> None:
        super().__init__()
        if rate_grad not in RATE_GRADS:
            raise ValueError(f"rate_grad must be one of {RATE_GRADS}, got {rate_grad!r}")
        self.rate_grad = rate_grad
        rates = tuple(int(r) for r in rates)
        n = len(rates)
        if n < 1 or any(r < 1 for r in rates):
            raise ValueError(f"rates must be positive integers, got {rates}")
        if out_channels % n:
            raise ValueError(f"{out_channels} output channels cannot be split over {n} rates")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.rates, self.shared = rates, shared
        per = out_channels // n
        shape = (per, in_channels, kernel_size, kernel_size)

        def new_bias() -> nn.Parameter | None:
            return nn.Parameter(torch.zeros(per)) if bias else None

        if shared:
            self.weight = nn.Parameter(torch.empty(shape))
            self.bias = new_bias()
        else:
            self.weights = nn.ParameterList([nn.Parameter(torch.empty(shape)) for _ in rates])
            self.biases = nn.ParameterList([new_bias() for _ in rates]) if bias else None
        self.taps = nn.ModuleList(Tap("rate", f"rate {r} (conv, pre-BN)") for r in rates)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as nn.Conv2d (fan-in of one kernel set is unchanged by the split).
        # (ResNets re-initialise with the fan-out of the whole layer: see init_resnet.)
        fan_in = self.in_channels * self.kernel_size**2
        bound = 1 / math.sqrt(fan_in)
        for w in self._weight_list():
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for b in self._bias_list():
            nn.init.uniform_(b, -bound, bound)

    def _weight_list(self) -> list[nn.Parameter]:
        return [self.weight] if self.shared else list(self.weights)

    def _bias_list(self) -> list[nn.Parameter]:
        if self.shared:
            return [self.bias] if self.bias is not None else []
        return list(self.biases) if self.biases is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        n = len(self.rates)
        average = self.shared and n > 1 and self.rate_grad == "mean" and torch.is_grad_enabled()
        for i, rate in enumerate(self.rates):
            w = self.weight if self.shared else self.weights[i]
            b = (self.bias if self.shared else (self.biases[i] if self.biases is not None else None))
            if average:  # each rate's use contributes 1/n of its gradient: the mean over the rates
                w = scale_grad(w, 1.0 / n)
                b = None if b is None else scale_grad(b, 1.0 / n)
            pad = _dilated_padding(self.kernel_size, self.padding, rate)
            y = F.conv2d(x, w, b, self.stride, pad, rate)
            outs.append(self.taps[i](y))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rates={self.rates}, shared={self.shared}"
        )


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def reset_all_parameters(module: nn.Module) -> None:
    """Re-initialise every submodule that knows how to (fresh, independent weights)."""
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if callable(fn):
            fn()


def tied_copy(
    module: nn.Module,
    share: Callable[[str, nn.Module], bool] = lambda name, m: isinstance(m, nn.Conv2d),
    *,
    tied: bool = True,
) -> nn.Module:
    """A copy of ``module`` whose selected convolutions use the original's weights.

    Every other parameter (BatchNorm in particular) is a fresh, independent copy. With
    ``tied=False`` the copy is fully independent and re-initialised (the "unshared twin").
    """
    new = copy.deepcopy(module)
    if not tied:
        reset_all_parameters(new)
        return new
    for name, sub in list(module.named_modules()):
        if name and share(name, sub):
            set_submodule(new, name, SharedConv2d(sub))
    for m in new.modules():  # independent copies start from a fresh init, not a clone
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
            m.reset_running_stats()
    return new


# --------------------------------------------------------------------------- RepeatNet
class HardSignSTE(torch.autograd.Function):
    """sign() forward with the Bi-Real clipped straight-through gradient."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(latent)
        return torch.where(latent >= 0, torch.ones_like(latent), -torch.ones_like(latent))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (latent,) = ctx.saved_tensors
        return grad * (latent.abs() <= 1).to(grad.dtype)


REPEAT_MODES = ("none", "linear", "swish", "bireal")


class RepeatConv2d(nn.Module):
    """A conv whose ``out x in`` filter block is realised from a smaller parent block.

    The parent ``F_p`` (``parent_out x parent_in x k x k``) is tiled ``gamma1 x gamma2``
    times, like ``torch.repeat``; rows/columns left over when the widths are not exact
    multiples are taken from the first rows/columns of the tiled block (authors' code).
    Each tile ``i`` is ``psi_i(F_p)``:

    * ``linear``: ``F_p`` itself;
    * ``swish`` (s-RepeatNet): ``beta1 * x / (1 + exp(beta2 * x))``, one pair per tile (and one
      pair for each leftover strip), Xavier-initialised;
    * ``bireal`` (f-RepeatNet): ``sign(L) * tile`` with a real latent tensor ``L`` the size of the
      realised block, sign() forward and a clipped straight-through gradient;
    * ``none``: no repetition, the conv's own block (``parent == target`` shape).

    The parent is this module's own ``weight`` (width scaling), or, when ``source`` is given,
    another conv's parent weight (depth scaling); then this module owns only its bias and
    transform parameters. Bias is never shared.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        parent_in: int | None = None,
        parent_out: int | None = None,
        source: nn.Module | None = None,
        mode: str = "linear",
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if mode not in REPEAT_MODES:
            raise ValueError(f"unknown repeat mode {mode!r}; expected one of {REPEAT_MODES}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.mode = stride, padding, mode
        if source is not None:
            _hold(self, "source", source)
            po, pi = source.weight.shape[:2]
        else:
            self.source = None
            po = out_channels if parent_out is None else parent_out
            pi = in_channels if parent_in is None else parent_in
            self.weight = nn.Parameter(torch.empty(po, pi, kernel_size, kernel_size))
            nn.init.xavier_uniform_(self.weight)
        if po > out_channels or pi > in_channels:
            raise ValueError(f"parent block {po}x{pi} is larger than the target {out_channels}x{in_channels}")
        self.parent_shape = (po, pi)
        self.r0, self.e0 = divmod(out_channels, po)
        self.r1, self.e1 = divmod(in_channels, pi)
        self.repeats = (po, pi) != (out_channels, in_channels)
        if mode == "none" and self.repeats:
            raise ValueError("mode='none' needs the parent and target shapes to be equal")
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if mode == "swish" and self.repeats:
            self.alphas = nn.Parameter(torch.empty(1, self.r0 * self.r1))
            self.betas = nn.Parameter(torch.empty(1, self.r0 * self.r1))
            nn.init.xavier_uniform_(self.alphas)
            nn.init.xavier_uniform_(self.betas)
            edges = int(self.e0 > 0) + int(self.e1 > 0)  # one pair per leftover strip
            self.edge_alphas = nn.Parameter(torch.rand(edges)) if edges else None
            self.edge_betas = nn.Parameter(torch.rand(edges)) if edges else None
        if mode == "bireal" and self.repeats:
            self.sign_latent = nn.Parameter(torch.rand(out_channels, in_channels, kernel_size, kernel_size) * 1e-3)

    def parent(self) -> torch.Tensor:
        return self.source.weight if self.source is not None else self.weight

    def realised_weight(self) -> torch.Tensor:
        """The full ``out x in x k x k`` filter block this conv applies."""
        w = self.parent()
        if not self.repeats:
            return w
        po, pi = self.parent_shape
        k = self.kernel_size
        tiles = w.repeat(self.r0, self.r1, 1, 1)  # (r0*po, r1*pi, k, k)
        if self.mode == "swish":
            t = tiles.view(self.r0, po, self.r1, pi, k, k)
            a = self.alphas.view(self.r0, 1, self.r1, 1, 1, 1)
            b = self.betas.view(self.r0, 1, self.r1, 1, 1, 1)
            tiles = (a * t / (1 + torch.exp(b * t))).reshape(self.r0 * po, self.r1 * pi, k, k)
        edge = 0
        if self.e0:
            extra = tiles[: self.e0]
            if self.mode == "swish":
                extra = self.edge_alphas[edge] * extra / (1 + torch.exp(self.edge_betas[edge] * extra))
                edge += 1
            tiles = torch.cat([tiles, extra], dim=0)
        if self.e1:
            extra = tiles[:, : self.e1]
            if self.mode == "swish":
                extra = self.edge_alphas[edge] * extra / (1 + torch.exp(self.edge_betas[edge] * extra))
            tiles = torch.cat([tiles, extra], dim=1)
        if self.mode == "bireal":
            tiles = HardSignSTE.apply(self.sign_latent) * tiles
        return tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.realised_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        po, pi = self.parent_shape
        src = ", parent shared" if self.source is not None else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"parent={po}x{pi}{src}, mode={self.mode!r}, stride={self.stride}, padding={self.padding}"
        )
