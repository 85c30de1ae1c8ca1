"""SHViT in plain NumPy, and the dependency-free base the other two runtimes import.

The base (config, weight names and format mapping, safetensors I/O, labels, preprocessing,
input checks, the shared CLI) imports only numpy. ``shvit_numpy.backward`` (training: every
layer's gradient by hand) is imported on first use, so ``import shvit_numpy`` costs no more for it.
"""
from .config import RESOLUTION, VARIANTS, SHViTConfig, get_config
from .errors import ShvitError
from .model import SHViT, load
from .weights import Weights, load_weights, save_weights

__all__ = ["SHViT", "load", "RESOLUTION", "VARIANTS", "SHViTConfig", "ShvitError", "Weights", "get_config", "load_weights", "save_weights"]


def __getattr__(name: str):
    """``shvit_numpy.backward`` without importing it first: loaded the first time it is read."""
    if name == "backward":
        import importlib

        return importlib.import_module(".backward", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
