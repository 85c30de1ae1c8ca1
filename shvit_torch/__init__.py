"""SHViT in PyTorch: the trainable model, weight loading and saving, BatchNorm folding."""
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError

from .model import SHViT, create, from_weights, load, save

__all__ = ["SHViT", "SHViTConfig", "ShvitError", "VARIANTS", "create", "from_weights", "load", "save"]
