"""SHViT in tinygrad: the same model and weight file on CPU, CL (OpenCL), METAL, CUDA, ..."""
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError

from .model import SHViT, load

__all__ = ["SHViT", "SHViTConfig", "ShvitError", "VARIANTS", "load"]
