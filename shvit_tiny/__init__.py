"""SHViT in tinygrad: the same model and weight file on CPU, CL (OpenCL), METAL, CUDA, ..."""
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError

from .model import SHViT, load
from .wide_vectors import install as _install_wide_vectors

_install_wide_vectors()  # 8-float vectors in this package's CPU kernels (see wide_vectors.py)

__all__ = ["SHViT", "SHViTConfig", "ShvitError", "VARIANTS", "load"]
