"""wsviz: analysis and visualisation of weight-sharing convolutional networks.

The library never imports streamlit; the app (``app.py`` and ``pages/``) is a thin
layer over it.
"""

__version__ = "0.1.0"

from wsviz.errors import WsvizError

__all__ = ["WsvizError", "__version__"]
