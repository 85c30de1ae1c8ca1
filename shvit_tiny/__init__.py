"""SHViT in tinygrad: the same model and weight file on CPU, CL (OpenCL), METAL, CUDA, ...

layers.py and model.py are the model (the reference path); fast/ runs it faster on the CPU device.
Importing this package changes nothing in tinygrad.
"""
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError

from .model import SHViT, load

__all__ = ["SHViT", "SHViTConfig", "ShvitError", "VARIANTS", "load"]
