"""Input checks shared by the three runtimes: one place, one wording, ``ShvitError``."""
from __future__ import annotations

import numpy as np

from .errors import ShvitError


def check_input(shape, dtype: str, in_chans: int = 3, expected_dtype: str = "float32") -> None:
    """Raise unless ``shape`` is (B, in_chans, H, W) with B, H, W >= 1 and ``dtype`` is expected."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ShvitError(f"input has shape {list(shape)} (rank {len(shape)}), expected rank 4: (batch, {in_chans}, height, width)")
    if shape[1] != in_chans:
        raise ShvitError(f"input has {shape[1]} channels (shape {list(shape)}), expected {in_chans}: (batch, {in_chans}, height, width)")
    if min(shape[0], shape[2], shape[3]) < 1:
        raise ShvitError(f"input has shape {list(shape)}, expected batch, height and width >= 1")
    if dtype != expected_dtype:
        raise ShvitError(f"input has dtype {dtype}, expected {expected_dtype}")


def check_finite(all_finite: bool) -> None:
    if not all_finite:
        raise ShvitError("input holds NaN or infinite values, expected finite numbers")


def check_array(x, in_chans: int = 3, finite: bool = True) -> np.ndarray:
    """Full check of a numpy batch: shape, dtype and (``finite``: unless the caller checks it on
    its way, as shvit_tiny's replay does) finiteness."""
    if not isinstance(x, np.ndarray):
        raise ShvitError(f"input is a {type(x).__name__}, expected a numpy array")
    check_input(x.shape, str(x.dtype), in_chans)
    if finite:
        check_finite(bool(np.isfinite(x).all()))
    return x
