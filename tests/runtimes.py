"""The three runtimes behind one small interface, for the equivalence suite and ``tests.repro``.

Each runtime loads a canonical weight file (folded or not) and runs either the whole model or
any block found by its canonical path (``stages.1.blocks.0.mixer.m``): the three packages
mirror each other attribute for attribute, so one path names the same block everywhere.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.tree import walk

HAVE_NUMPY_MODEL = importlib.util.find_spec("shvit_numpy.model") is not None
HAVE_TINY = importlib.util.find_spec("shvit_tiny.model") is not None


class Torch:
    name = "torch"

    def __init__(self, path, fold: bool):
        model = shvit_torch.load(path)
        self.model = model.fuse() if fold else model

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x)).numpy()

    @torch.no_grad()
    def block(self, path: str, x: np.ndarray) -> np.ndarray:
        return walk(self.model, path)(torch.from_numpy(x)).numpy()


class Numpy:
    name = "numpy"

    def __init__(self, path, fold: bool):
        import shvit_numpy

        self.model = shvit_numpy.load(path, fold=fold)

    def __call__(self, x):
        return self.model(x)

    def block(self, path, x):
        """NumPy's layers are channels-last inside: convert at the edge, as the model itself does."""
        if x.ndim == 2:
            return walk(self.model, path)(x)
        return walk(self.model, path)(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


class Tiny:
    name = "tiny"

    def __init__(self, path, fold: bool, device: str = "CPU"):
        import shvit_tiny

        self.model = shvit_tiny.load(path, device=device, fold=fold)
        self.device = device

    def __call__(self, x):
        return self.model(x)

    def block(self, path, x):
        """The reference layers (layers.py), channels-last inside like NumPy's: converted at the edge."""
        from tinygrad import Tensor

        if x.ndim == 2:
            return walk(self.model, path)(Tensor(x, device=self.device)).numpy()
        return walk(self.model, path)(Tensor(x.transpose(0, 2, 3, 1).copy(), device=self.device)).numpy().transpose(0, 3, 1, 2)


def runtimes(path, fold: bool = True) -> list:
    """The torch reference first, then every other runtime that is installed."""
    out = [Torch(path, fold)]
    if HAVE_NUMPY_MODEL:
        out.append(Numpy(path, fold))
    if HAVE_TINY:
        out.append(Tiny(path, fold))
    return out


def block_paths(cfg: SHViTConfig) -> dict[str, tuple[str, int, bool]]:
    """One block of every kind the config has: kind -> (canonical path, input channels, is 2-D input)."""
    paths = {"ConvBN (stem)": ("patch_embed.0", cfg.in_chans, False)}
    for s in (1, 2):
        prev = cfg.embed_dim[s - 1]
        p = f"stages.{s}.downsample"
        paths.setdefault("Residual(depthwise)", (f"{p}.0", prev, False))
        paths.setdefault("FFN", (f"{p}.1.m", prev, False))
        paths.setdefault("PatchMerging", (f"{p}.2", prev, False))
        paths.setdefault("SqueezeExcite", (f"{p}.2.se", 4 * prev, False))
    for s in range(3):
        if cfg.depth[s] and cfg.types[s] == "s":
            paths.setdefault("SingleHeadAttention", (f"stages.{s}.blocks.0.mixer.m", cfg.embed_dim[s], False))
        if cfg.depth[s]:
            paths.setdefault("BasicBlock", (f"stages.{s}.blocks.0", cfg.embed_dim[s], False))
    paths["NormLinear (head)"] = ("head", cfg.embed_dim[2], True)
    return paths
