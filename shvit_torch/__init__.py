"""SHViT in PyTorch: the trainable model, weight loading and saving, BatchNorm folding, and
``optimize``: the folded, channels-last, traced and frozen inference form."""
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError

from .fast import optimize
from .model import SHViT, create, from_weights, load, save

__all__ = ["SHViT", "SHViTConfig", "ShvitError", "VARIANTS", "create", "from_weights", "load", "optimize", "save"]
