"""The weight file: safetensors read and written with numpy alone, plus atomic writes.

safetensors is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``),
then the raw little-endian tensor bytes. The canonical SHViT file stores every tensor of the
unfolded model in float32 under timm's names, with the configuration in its metadata
(``shvit_config``, JSON) and, when known, the class names (``shvit_labels``, a JSON list).
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import SHViTConfig
from .errors import ShvitError
from .names import check_state, infer_config, state_shapes, to_canonical
from .pth import looks_like_torch, read_pth

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    A crash or kill leaves the old file untouched (and no half-written one under its name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return u16.view(np.float32).reshape(shape)


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor (as numpy, native byte order) and the metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ShvitError(f"weight file not found: {path}")
    data = path.read_bytes()
    if len(data) < 8:
        raise ShvitError(f"{path} is not a safetensors file: {len(data)} bytes, too short for a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise ShvitError(f"{path} is not a valid safetensors file (header length {n} does not fit in {len(data)} bytes; truncated?)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ShvitError(f"{path} is not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ShvitError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ShvitError(f"{path}: entry {name!r} of the header is malformed") from None
        if end > len(body) or begin > end:
            raise ShvitError(f"{path} is truncated: tensor {name!r} needs bytes {begin}..{end}, the file holds {len(body)}")
        raw = body[begin:end]
        if dtype == "BF16":
            arr = _bf16_to_f32(raw, shape)
        elif dtype in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype])
            if arr.size != int(np.prod(shape)):
                raise ShvitError(f"{path}: tensor {name!r} holds {arr.size} values, its shape {list(shape)} needs {int(np.prod(shape))}")
            arr = arr.reshape(shape).astype(arr.dtype.newbyteorder("="))
        else:
            raise ShvitError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        tensors[name] = arr
    return tensors, meta


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (C order, little-endian) and string metadata, atomically."""
    header, offset, chunks = {}, 0, []
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray makes them 1-d)
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # big-endian input: look up the native dtype
        if arr.dtype not in _NAMES:
            raise ShvitError(f"cannot store tensor {name!r} of dtype {arr.dtype} in safetensors")
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in chunks:
            f.write(raw)


@dataclass
class Weights:
    """A loaded weight file: configuration, canonical float32 state, and what the file says."""

    config: SHViTConfig
    state: dict[str, np.ndarray]
    labels: list[str] | None = None
    resolution: int | None = None  # the image size the weights were trained for, if recorded


def prepare_state(state: dict, metadata: dict | None = None) -> Weights:
    """Foreign or canonical state (numpy arrays) + file metadata -> checked canonical ``Weights``."""
    metadata = metadata or {}
    state = to_canonical(state)
    if "shvit_config" in metadata:
        cfg = SHViTConfig.from_json(metadata["shvit_config"])
    else:
        cfg = infer_config({k: v.shape for k, v in state.items()})
    check_state(state, cfg)
    labels = None
    if "shvit_labels" in metadata:
        try:
            labels = json.loads(metadata["shvit_labels"])
        except json.JSONDecodeError:
            raise ShvitError("the class names stored in the file are not valid JSON") from None
        if not (isinstance(labels, list) and len(labels) == cfg.num_classes):
            raise ShvitError(f"the file's class names do not match its {cfg.num_classes} classes")
    resolution = metadata.get("shvit_resolution")
    if resolution is not None and not str(resolution).isdigit():
        raise ShvitError(f"the file's resolution {resolution!r} is not a positive integer")
    return Weights(cfg, state, labels, int(resolution) if resolution else None)


def load_weights(path) -> Weights:
    """A ``.safetensors`` file (canonical or timm) or a torch ``.pth`` (the authors' or timm's) -> ``Weights``.

    ``.pth`` files are read by ``shvit_numpy.pth`` without torch, and nothing in them runs.
    """
    path = Path(path)
    if looks_like_torch(path):
        return prepare_state(read_pth(path))
    tensors, meta = read_safetensors(path)
    return prepare_state(tensors, meta)


def save_weights(path, cfg: SHViTConfig, state: dict, labels=None, resolution: int | None = None) -> None:
    """Write the canonical file: float32 tensors in canonical order, config (labels, resolution) as metadata."""
    state = to_canonical(state)
    check_state(state, cfg)
    meta = {"format": "shvit", "shvit_config": cfg.to_json()}
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) != cfg.num_classes:
            raise ShvitError(f"{len(labels)} class names given for a {cfg.num_classes}-class model")
        meta["shvit_labels"] = json.dumps(labels)
    if resolution is not None:
        meta["shvit_resolution"] = str(int(resolution))
    write_safetensors(path, {k: state[k] for k in state_shapes(cfg)}, meta)


RESIDUAL_END = (".m.bn.weight", ".pw2.bn.weight", ".proj.1.bn.weight")


def random_state(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """Random canonical weights for ``shapes`` (name -> shape, e.g. ``names.state_shapes(cfg)``), scaled
    so activations stay O(1): the tests' and the benchmarks' models (every BatchNorm statistic random too).

    Kernels ~ N(0, 1/fan_in); BatchNorm weight ~ +-U(0.5, 1.5) (random signs; +-U(0.2, 0.5) for
    the last BatchNorm of a residual branch, so activations do not grow with depth), bias and
    running_mean ~ N(0, 0.2), running_var ~ U(0.5, 2); GroupNorm affine likewise.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("running_var"):
            a = rng.uniform(0.5, 2.0, shape)
        elif k.endswith(("running_mean", "bias")):
            a = rng.normal(0, 0.2, shape)
        elif k.endswith(RESIDUAL_END):  # last BN of a residual branch: smaller, so depth does not blow up
            a = rng.uniform(0.2, 0.5, shape) * rng.choice([-1.0, 1.0], shape)
        elif k.endswith(("bn.weight", "pre_norm.weight")):
            a = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        else:  # conv / linear kernels
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            a = rng.normal(0, 1 / np.sqrt(fan_in), shape)
        out[k] = a.astype(np.float32)
    return out
