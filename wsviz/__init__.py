"""wsviz: analysis and visualisation of weight-sharing convolutional networks.

The library never imports streamlit; the app (``app.py`` and ``pages/``) is a thin
layer over it. The names below are imported on first use, so ``import wsviz`` stays light
(the app's first page needs no torch)::

    import wsviz
    wsviz.list_models("msws_*")                        # names, timm-style wildcards
    model = wsviz.create_model("sharesnet50", shared=True)
    net = wsviz.adopt(torchvision.models.resnet18(), input_shape=(3, 224, 224))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from wsviz.errors import WsvizError

# name -> module it lives in (PEP 562 lazy attributes)
_LAZY = {name: "wsviz.models" for name in (
    "adopt", "create_model", "families", "get_spec", "input_shape", "list_models", "list_taps", "num_classes",
    "summarize",
)}

__all__ = ["WsvizError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wsviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
