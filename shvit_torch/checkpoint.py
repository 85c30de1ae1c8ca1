"""Reading every weight file users bring, without ever executing pickled code.

* ``.safetensors`` (canonical or timm): read by the numpy base.
* ``.pth`` / ``.pt`` (the authors' release and training files, timm's state dicts): read with
  ``torch.load(weights_only=True)``, whose unpickler only builds tensors and plain containers.
  Training files also pickle objects such as ``argparse.Namespace`` (``args``); each such class
  is replaced by an inert stand-in that only stores what it is given, so nothing runs.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from shvit_numpy.errors import ShvitError, first_line
from shvit_numpy.names import unwrap_checkpoint
from shvit_numpy.pth import looks_like_torch
from shvit_numpy.weights import Weights, prepare_state, read_safetensors


class _Inert:
    """Stands in for any class a checkpoint names outside tensors and containers."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _stand_ins(path: Path) -> list:
    """(inert class, "module.Name") for every non-tensor global the pickle refers to."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) files: let torch.load report what it finds
        names = []
    return [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in names]


def torch_load_safely(path: Path):
    """``torch.load`` with ``weights_only=True``; foreign classes become inert stand-ins."""
    if not path.is_file():
        raise ShvitError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise ShvitError(f"{path} is empty, expected a torch checkpoint")
    try:
        with torch.serialization.safe_globals(_stand_ins(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, AttributeError) as e:
        raise ShvitError(f"{path} is not a readable torch checkpoint (truncated or not a checkpoint?): {first_line(e)}") from None


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float32 if t.is_floating_point() else t.dtype).cpu().numpy()
    return np.asarray(t)


def read_checkpoint(path: Path) -> Weights:
    """Any accepted file -> checked canonical ``Weights`` (float32, timm names, 4-D kernels).

    The content decides, then the extension (``shvit_numpy.pth.looks_like_torch``, the numpy reader's
    test too); torch files are read by torch, legacy pickles included.
    """
    path = Path(path)
    if not path.is_file():
        raise ShvitError(f"weight file not found: {path}")
    if not looks_like_torch(path):
        tensors, meta = read_safetensors(path)
        return prepare_state(tensors, meta)
    state = unwrap_checkpoint(torch_load_safely(path))
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ShvitError(f"{path} holds no tensors, expected an SHViT state dict")
    return prepare_state({k: _to_numpy(v) for k, v in tensors.items()})
