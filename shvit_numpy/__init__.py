"""SHViT in plain NumPy, and the dependency-free base the other two runtimes import.

The base (config, weight names and format mapping, safetensors I/O, labels, preprocessing,
input checks, the shared CLI) imports only numpy.
"""
from .config import RESOLUTION, VARIANTS, SHViTConfig, get_config
from .errors import ShvitError
from .model import SHViT, load
from .weights import Weights, load_weights, save_weights

__all__ = ["SHViT", "load", "RESOLUTION", "VARIANTS", "SHViTConfig", "ShvitError", "Weights", "get_config", "load_weights", "save_weights"]
