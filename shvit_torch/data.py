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

from shvit_numpy.errors import ShvitError
from shvit_numpy.preprocess import load_image, preprocess_pil, resize_size

DIGITS_RES = 64  # 8x8 scans shown at 64x64: 4x4 tokens in stage 1, 2x2 and 1x1 in the attention stages
DIGITS_RENDER = 32  # the PNG size a digit is rendered to before preprocessing
CANVAS_RES = 128  # 8x8 tokens in stage 1, 4x4 = 16 in stage 2 (attention), 2x2 in stage 3 (attention)
CANVAS_DIGITS = 3  # distinct digits per canvas; the label is the largest, so '2'..'9'
CANVAS_CLASSES = [str(d) for d in range(CANVAS_DIGITS - 1, 10)]
CANVAS_NOISE = 12.0  # std of the Gaussian pixel noise, in grey levels (0-255)
CANVAS_SIZES = (6000, 1000)  # train, test canvases
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


def render_digit(pixels: np.ndarray):
    """An 8x8 digit (0 = paper, 16 = ink) -> a 32x32 RGB image, dark ink on white, as a scan looks."""
    from PIL import Image

    grey = (255 - pixels.astype(np.float32) * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB").resize((DIGITS_RENDER, DIGITS_RENDER), Image.BICUBIC)


def digits_split(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split: stratified 75/25 with random_state=0 (1347 train, 450 test indices)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(target)), test_size=0.25, random_state=0, stratify=target)


def digits(res: int = DIGITS_RES) -> Dataset:
    """scikit-learn's 1797 handwritten digits (8x8 scans, 16 grey levels), rendered as dark ink
    on white and preprocessed at ``res``; the split of ``digits_split``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx_train, idx_test = digits_split(d.target)
    x = torch.from_numpy(np.stack([preprocess_pil(render_digit(im), res) for im in d.images]))
    y = torch.from_numpy(d.target.astype(np.int64))
    return Dataset(Split(x[idx_train], y[idx_train]), Split(x[idx_test], y[idx_test]), [str(i) for i in range(10)], res)


@dataclass(frozen=True)
class CanvasSpec:
    """One canvas, before drawing: which scans go where, and the label they imply."""

    scans: tuple[int, ...]  # indices into load_digits().images
    digits: tuple[int, ...]  # their classes, distinct
    corners: tuple[tuple[int, int], ...]  # (top, left) of each 32x32 digit on the canvas
    noise_seed: int

    @property
    def label(self) -> int:
        """The class index of the largest digit in CANVAS_CLASSES (digit d is class d - 2)."""
        return max(self.digits) - (CANVAS_DIGITS - 1)


def canvas_corners(rng: np.random.Generator, n: int, gap: int = 2) -> tuple[tuple[int, int], ...]:
    """n non-overlapping 32x32 boxes (at least ``gap`` pixels apart) inside the centre 128x128
    crop of a resize_size(128) = 146-pixel canvas, so preprocessing crops no ink; by rejection."""
    res, d = CANVAS_RES, DIGITS_RENDER
    size = resize_size(res)
    lo = (size - res) // 2 + 2
    hi = lo + res - 4 - d  # last top-left coordinate that keeps the box inside the crop
    boxes: list[tuple[int, int]] = []
    while len(boxes) < n:
        t, le = (int(v) for v in rng.integers(lo, hi + 1, 2))
        if all(abs(t - t2) >= d + gap or abs(le - l2) >= d + gap for t2, l2 in boxes):
            boxes.append((t, le))
    return tuple(boxes)


def canvas_specs(target: np.ndarray, pool: np.ndarray, n: int, seed: int) -> list[CanvasSpec]:
    """n canvases drawn from the scans in ``pool`` only: the largest digit uniform over 2..9,
    the other two distinct and smaller, each a random scan of its class at a random place."""
    rng = np.random.default_rng(seed)
    by_class = {d: pool[target[pool] == d] for d in range(10)}
    specs = []
    for _ in range(n):
        top = int(rng.integers(CANVAS_DIGITS - 1, 10))
        digits = [top, *(int(d) for d in rng.choice(top, CANVAS_DIGITS - 1, replace=False))]
        rng.shuffle(digits)
        scans = tuple(int(rng.choice(by_class[d])) for d in digits)
        specs.append(CanvasSpec(scans, tuple(digits), canvas_corners(rng, CANVAS_DIGITS), int(rng.integers(2**31))))
    return specs


def digit_inks(images: np.ndarray) -> np.ndarray:
    """Every 8x8 scan as ``render_digit`` draws it, grey: (N, 32, 32) float32, 255 = paper."""
    return np.stack([np.asarray(render_digit(im).convert("L"), np.float32) for im in images])


def render_canvas(inks: np.ndarray, spec: CanvasSpec):
    """A spec -> a 146x146 RGB image: white paper, each digit from ``digit_inks`` pasted at its
    corner, plus a little Gaussian noise (the same for the same spec)."""
    from PIL import Image

    size, d = resize_size(CANVAS_RES), DIGITS_RENDER
    grey = np.full((size, size), 255.0, np.float32)
    for scan, (t, le) in zip(spec.scans, spec.corners):
        grey[t:t + d, le:le + d] = np.minimum(grey[t:t + d, le:le + d], inks[scan])
    grey += np.random.default_rng(spec.noise_seed).normal(0, CANVAS_NOISE, grey.shape)
    return Image.fromarray(grey.clip(0, 255).round().astype(np.uint8)).convert("RGB")


def canvas_split_specs(sizes: tuple[int, int] = CANVAS_SIZES, seed: int = 0) -> tuple[list[CanvasSpec], list[CanvasSpec]]:
    """(train, test) specs: train canvases use only ``digits_split``'s train scans and test
    canvases only its test scans, so no test scan was ever seen in training."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    idx_train, idx_test = digits_split(target)
    return (canvas_specs(target, np.sort(idx_train), sizes[0], seed * 2 + 1),
            canvas_specs(target, np.sort(idx_test), sizes[1], seed * 2 + 2))


def canvas(res: int = CANVAS_RES, sizes: tuple[int, int] = CANVAS_SIZES, seed: int = 0) -> Dataset:
    """The largest of three handwritten digits placed on a canvas (8 classes, '2'..'9'): a
    label that needs every digit on the image, so attention has distant tokens to relate.
    Deterministic from ``seed``; drawn at 146x146 and preprocessed at ``res`` as the runtimes'
    CLIs do (at 128, the centre crop, no rescaling)."""
    from sklearn.datasets import load_digits

    inks = digit_inks(load_digits().images)
    splits = []
    for specs in canvas_split_specs(sizes, seed):
        x = np.stack([preprocess_pil(render_canvas(inks, s), res) for s in specs]) if specs else np.zeros((0, 3, res, res), np.float32)
        splits.append(Split(torch.from_numpy(x), torch.tensor([s.label for s in specs], dtype=torch.int64)))
    return Dataset(splits[0], splits[1], list(CANVAS_CLASSES), res)


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
