"""Training data: scikit-learn's handwritten digits (shipped with the package), a canvas task
built from them (``canvas``: the largest of three digits on a 128x128 image), or an ImageFolder.

Every image goes through the spec's evaluation preprocessing (shvit_numpy.preprocess), so a
model trained here classifies the same PNG files correctly in all three runtimes' CLIs.
Augmentation is applied to the preprocessed tensors, per batch (random affine warps, flips).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shvit_numpy.digits import *  # noqa: F403 - the arrays, built without torch (its __all__ re-exported here)
from shvit_numpy.digits import CANVAS_CLASSES, CANVAS_RES, CANVAS_SIZES, DIGITS_RES, canvas_arrays, digits_arrays
from shvit_numpy.errors import ShvitError
from shvit_numpy.preprocess import load_image, resize_size  # noqa: F401 - resize_size: the demo's figure uses it

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Split:
    x: torch.Tensor  # (N, 3, res, res) float32, normalised
    y: torch.Tensor  # (N,) int64


@dataclass
class Dataset:
    train: Split
    test: Split
    classes: list[str]
    resolution: int


def to_split(a) -> Split:
    """shvit_numpy.digits' arrays as tensors (shared memory, no copy)."""
    return Split(torch.from_numpy(a.x), torch.from_numpy(a.y))


def digits(res: int = DIGITS_RES) -> Dataset:
    """scikit-learn's 1797 handwritten digits (8x8 scans, 16 grey levels), rendered as dark ink
    on white and preprocessed at ``res``; the split of ``digits_split`` (shvit_numpy.digits)."""
    train, test = digits_arrays(res)
    return Dataset(to_split(train), to_split(test), [str(i) for i in range(10)], res)


def canvas(res: int = CANVAS_RES, sizes: tuple[int, int] = CANVAS_SIZES, seed: int = 0) -> Dataset:
    """The largest of three handwritten digits placed on a canvas (8 classes, '2'..'9'), as
    ``shvit_numpy.digits.canvas_arrays`` builds it (deterministic from ``seed``)."""
    train, test = canvas_arrays(res, sizes, seed)
    return Dataset(to_split(train), to_split(test), list(CANVAS_CLASSES), res)


def _folder_split(root: Path, classes: list[str], res: int) -> Split:
    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ShvitError(f"class folder {root / name} holds no images (expected {', '.join(sorted(IMAGE_SUFFIXES))} files)")
        xs += [load_image(p, res) for p in files]
        ys += [label] * len(files)
    return Split(torch.from_numpy(np.stack(xs)), torch.tensor(ys))


def class_names(data: str) -> list[str]:
    """The classes of ``--data``: '0'..'9' for digits, '2'..'9' for canvas, else the train/ folder
    names (layout checked)."""
    if data == "digits":
        return [str(i) for i in range(10)]
    if data == "canvas":
        return list(CANVAS_CLASSES)
    root = Path(data)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise ShvitError(f"--data {root}: {what} (expected 'digits', 'canvas' or a folder with train/<class>/ and val/<class>/)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ShvitError(f"--data {root}: missing {split}/ folder (expected {root}/train/<class>/ and {root}/val/<class>/)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise ShvitError(f"--data {root}/train holds no class folders")
    missing = [c for c in classes if not (root / "val" / c).is_dir()]
    if missing:
        raise ShvitError(f"--data {root}/val lacks class folder {missing[0]!r} that train/ has")
    return classes


def image_folder(path, res: int) -> Dataset:
    """``path/train/<class>/*.png`` and ``path/val/<class>/*.png``, loaded once into memory."""
    root, classes = Path(path), class_names(str(path))
    return Dataset(_folder_split(root / "train", classes, res), _folder_split(root / "val", classes, res), classes, res)


def load(data: str, res: int, limit: int | None = None) -> Dataset:
    """``--data``: 'digits', 'canvas' or an ImageFolder path; ``limit`` keeps the first N of each split."""
    if data == "canvas":  # only the canvases that will be used are drawn
        ds = canvas(res, CANVAS_SIZES if limit is None else (min(limit, CANVAS_SIZES[0]), min(limit, CANVAS_SIZES[1])))
    else:
        ds = digits(res) if data == "digits" else image_folder(data, res)
    if limit is not None:
        ds.train = Split(ds.train.x[:limit], ds.train.y[:limit])
        ds.test = Split(ds.test.x[:limit], ds.test.y[:limit])
    return ds


def augment(x: torch.Tensor, generator: torch.Generator, degrees=10.0, translate=0.1, scale=(0.9, 1.1),
            flip: bool = False) -> torch.Tensor:
    """Random rotation, shift and zoom per image, and optionally horizontal flips (not for
    digits: a mirrored 2 is not a 2). (B, 3, H, W) -> (B, 3, H, W)."""
    B = x.shape[0]
    u = torch.rand(B, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * translate * 2, (u[:, 3] * 2 - 1) * translate * 2  # grid units span 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    mirror = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(B)
    theta = torch.stack([torch.stack([cos * mirror, -sin, tx], 1), torch.stack([sin * mirror, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float, generator: torch.Generator):
    """Mixup (blend two images) or CutMix (paste a box of one into another), with soft targets."""
    target = F.one_hot(y, num_classes).float()
    if not (mixup or cutmix):
        return x, target
    perm = torch.randperm(len(x), generator=generator)
    use_cutmix = cutmix > 0 and (mixup == 0 or torch.rand(1, generator=generator).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if use_cutmix:
        H, W = x.shape[2:]
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = torch.randint(H, (1,), generator=generator).item(), torch.randint(W, (1,), generator=generator).item()
        y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]
