"""torch ``.pth`` files read with numpy alone, and nothing in them ever runs.

``torch.save`` (torch >= 1.6) writes a zip archive: ``<name>/data.pkl`` is a pickle of the
saved object in which every tensor is a call ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` and every storage a persistent record ``('storage', torch.
FloatStorage, key, location, numel)`` whose bytes are the entry ``<name>/data/<key>``
(``<name>/byteorder`` says little or big endian).

A pickle is a program: each global it names is looked up and may be called. This reader's
unpickler resolves only an allow-list to its OWN functions (never torch's, never anything
imported by name from the file):

* the tensor rebuild functions ``torch._utils._rebuild_tensor``, ``_rebuild_tensor_v2``,
  ``_rebuild_tensor_v3``, ``_rebuild_parameter``, ``_rebuild_parameter_with_state`` and
  ``torch._tensor._rebuild_from_type_v2`` (with ``torch.Tensor`` and
  ``torch.nn.parameter.Parameter`` as its type markers): each returns a record of where the
  tensor's values lie, read later and only for the state dict that is used;
* the storage classes (``torch.FloatStorage`` ... ``torch.storage.UntypedStorage``) and the
  dtypes ``_rebuild_tensor_v3`` names (``torch.uint16``, ...): markers carrying a numpy dtype;
* ``collections.OrderedDict``, the state dicts' own type (it only builds a dict).

Every other global becomes an inert stand-in (``Inert``): a class made here that only stores
what the pickle hands it, so ``argparse.Namespace`` (the authors' ``args``), a ``pathlib``
path or any class of a training program loads as data, and its module is not even imported.
Globals that only a pickle trick would name (``os.system`` and the rest of ``os``/``posix``,
``subprocess``, ``builtins.eval``/``exec``/``getattr``/``__import__``, ``importlib``,
``pickle``, ``operator``, ``functools``, ...) are refused outright with ``ShvitError``: a
weight file never needs them, and saying so beats loading a booby-trapped file quietly.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ShvitError, first_line
from .names import unwrap_checkpoint

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
MAX_PICKLE = 1 << 30  # data.pkl holds names and numbers only; a gigabyte of it is no checkpoint

# torch dtype name -> numpy dtype (little-endian); bfloat16 is read as its 16 bits and widened.
DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
          "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?", "uint16": "<u2",
          "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16"}
DTYPES.update(float="<f4", double="<f8", half="<f2", long="<i8", int="<i4", short="<i2")
STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
            "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
            "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
            "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128"}

# Modules (first part of the name) only a code-running pickle would name: refused.
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code",
    "codeop", "ctypes", "pickle", "_pickle", "marshal", "shelve", "multiprocessing", "webbrowser",
    "operator", "functools", "types", "inspect", "io", "_io", "commands", "popen2", "posixpath", "ntpath",
    "signal", "threading", "_thread", "asyncio", "pdb", "timeit", "cProfile", "profile", "trace",
    "builtins", "__builtin__", "_posixsubprocess", "sysconfig", "site", "torch.hub",
})
# builtins that only build data: inert stand-ins like any other class, not refused.
DATA_BUILTINS = frozenset({"set", "frozenset", "bytearray", "bytes", "complex", "slice", "range",
                           "list", "dict", "tuple", "str", "int", "float", "bool", "object"})


# -- what the pickle builds ----------------------------------------------------------------------
@dataclass(frozen=True)
class StorageType:
    """A storage class or dtype the file names: only the dtype it stands for."""

    dtype: str  # a key of DTYPES; "bytes" for UntypedStorage


@dataclass(frozen=True)
class Storage:
    """A persistent ``('storage', ...)`` record: which zip entry holds the values, in what type."""

    key: str
    dtype: str
    numel: int  # elements for typed storages, bytes for UntypedStorage


@dataclass(frozen=True)
class TensorRecord:
    """Where a tensor's values lie: its storage, offset, shape and strides (in elements)."""

    storage: Storage
    offset: int
    size: tuple
    stride: tuple
    dtype: str


@dataclass(frozen=True)
class Unreadable:
    """A tensor this reader does not rebuild (sparse, quantised, float8, ...): an error if used."""

    reason: str


class Inert:
    """Stands in for every global outside the allow-list: it keeps its arguments, its state and any
    items the pickle sets, and runs nothing (a subclass per name, made by ``inert_class``)."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<inert {self.global_name}>"


_INERT: dict[str, type] = {}


def inert_class(full_name: str) -> type:
    """The stand-in class for ``module.name`` (one per name): made here, nothing imported."""
    if full_name not in _INERT:
        _INERT[full_name] = type(full_name.rsplit(".", 1)[-1] or "Inert", (Inert,), {"global_name": full_name})
    return _INERT[full_name]


# -- the allow-listed rebuild functions (this module's own) --------------------------------------
def _record(storage, offset, size, stride, dtype: str | None = None):
    if not isinstance(storage, Storage):
        raise ShvitError(f"a tensor's storage is a {type(storage).__name__}, not a storage record")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride)) or len(size) != len(stride):
        raise ShvitError(f"a tensor has a malformed shape {list(size)}, strides {list(stride)} or offset {offset}")
    return TensorRecord(storage, offset, size, stride, dtype or storage.dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _record(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _record(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, StorageType):
        name = getattr(dtype, "global_name", type(dtype).__name__)
        return Unreadable(f"its dtype {name} has no numpy equivalent")
    return _record(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


REBUILDERS = {f"torch._utils.{f.__name__}": f for f in
              (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter, _rebuild_parameter_with_state)}
TENSOR_TYPES = {"torch.Tensor": StorageType("tensor"), "torch.nn.parameter.Parameter": StorageType("parameter")}


def _rebuild_from_type_v2(func, new_type, args, state):
    """A tensor with Python attributes or a subclass: ``func(*args)`` when ``func`` is one of ours."""
    if func not in REBUILDERS.values() or new_type not in TENSOR_TYPES.values():
        name = getattr(new_type, "global_name", type(new_type).__name__)
        return Unreadable(f"it is a {name}, not a plain tensor")
    return func(*args)


ALLOWED = {**REBUILDERS, **TENSOR_TYPES, "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
           "collections.OrderedDict": collections.OrderedDict, "torch.storage.UntypedStorage": StorageType("bytes"),
           "torch.UntypedStorage": StorageType("bytes")}
ALLOWED.update({f"torch.{k}": StorageType(v) for k, v in STORAGES.items()})
ALLOWED.update({f"torch.{k}": StorageType(k) for k in DTYPES})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only to ``ALLOWED``, refuses ``REFUSED_MODULES``, stands in for the rest."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, Storage] = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in ALLOWED:
            return ALLOWED[full]
        parts = module.split(".")
        if any(".".join(parts[:i]) in REFUSED_MODULES for i in range(1, len(parts) + 1)) and not (
                parts[0] in ("builtins", "__builtin__") and name in DATA_BUILTINS):
            raise ShvitError(f"it names {full}, which no weight file needs (a pickle trick to run code?): refused, nothing was run")
        return inert_class(full)

    def persistent_load(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
              and pid[1].dtype in (*DTYPES, "bytes") and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0)
        if not ok:
            raise ShvitError(f"it holds a persistent record {str(pid)[:80]!r} that is not a tensor storage")
        storage = Storage(pid[2], pid[1].dtype, pid[4])
        if self.storages.setdefault(storage.key, storage) != storage:
            raise ShvitError(f"storage {storage.key!r} is declared twice with different types or sizes")
        return storage


# -- the archive ---------------------------------------------------------------------------------
def looks_like_torch(path) -> bool:
    """Whether ``path`` is a torch file (torch.save's zip, or a legacy pickle) rather than safetensors;
    the one test, for shvit_numpy and shvit_torch alike. The content decides first: a zip's signature
    is torch; a safetensors header (an 8-byte length that fits the file, then its JSON's ``{``) is
    safetensors, even when that length begins with a pickle's bytes (80 02 is a length of 640); then a
    pickle's first bytes are torch. Anything else (missing, empty, damaged) goes by the name
    (.pth, .pt, .bin, .tar, .ckpt), so its error speaks of the format the user meant."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(9)
        if head[:4] == b"PK\x03\x04":
            return True
        if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size:
            return False
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            return True
    return path.suffix.lower() in TORCH_SUFFIXES


def _open_archive(path: Path) -> tuple[zipfile.ZipFile, str]:
    """The zip and its one ``<name>/`` prefix; a one-line ``ShvitError`` for anything else."""
    if not path.is_file():
        raise ShvitError(f"weight file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ShvitError(f"{path} is empty, expected a torch checkpoint")
    if head[:1] == b"\x80":
        raise ShvitError(f"{path} is a legacy (non-zip) torch pickle, which this reader does not take: re-save it with "
                         f"torch.save (torch >= 1.6), or convert it: python -m shvit_torch.convert {path} model.safetensors")
    if head != b"PK\x03\x04":
        raise ShvitError(f"{path} is not a torch checkpoint (torch.save writes a zip archive; this file starts with {head!r})")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ShvitError(f"{path} is not a readable torch checkpoint (truncated or damaged zip: {e})") from None
    pickles = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        z.close()
        raise ShvitError(f"{path} is a zip but not a torch checkpoint ({len(pickles)} '<name>/data.pkl' entries, expected 1)")
    return z, pickles[0][: -len("data.pkl")]


def _entry(z: zipfile.ZipFile, name: str, size: int | None = None, limit: int | None = None) -> bytes:
    try:
        info = z.getinfo(name)
    except KeyError:
        raise ShvitError(f"the archive has no entry {name!r} (truncated?)") from None
    if size is not None and info.file_size != size:
        raise ShvitError(f"entry {name!r} holds {info.file_size} bytes, its tensors need {size}")
    if limit is not None and info.file_size > limit:
        raise ShvitError(f"entry {name!r} is {info.file_size} bytes, too large for a checkpoint's pickle")
    return z.read(info)


def _array(rec: TensorRecord, raw: bytes, byteorder: str) -> np.ndarray:
    """The tensor's values, a C-contiguous numpy copy honouring offset and strides."""
    dtype = np.dtype(DTYPES[rec.dtype]).newbyteorder(byteorder)
    if len(raw) % dtype.itemsize:
        raise ShvitError(f"a storage of {len(raw)} bytes does not hold whole {rec.dtype} values")
    flat = np.frombuffer(raw, dtype=dtype)
    if 0 in rec.size:
        out = np.empty(rec.size, dtype)
    else:
        last = rec.offset + sum((n - 1) * s for n, s in zip(rec.size, rec.stride))
        if last >= flat.size:
            raise ShvitError(f"a tensor of shape {list(rec.size)} reaches element {last} of a storage of {flat.size}")
        view = np.lib.stride_tricks.as_strided(flat[rec.offset:], rec.size, [s * dtype.itemsize for s in rec.stride],
                                               writeable=False)
        out = np.array(view, order="C")
    out = out.astype(dtype.newbyteorder("="), copy=False)
    if rec.dtype == "bfloat16":  # the top 16 bits of a float32: widening is exact
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


class Archive:
    """An open ``.pth``: ``obj`` is the unpickled object (tensors as ``TensorRecord``)."""

    def __init__(self, path: Path):
        self.path = path
        self.zip, self.prefix = _open_archive(path)
        self.raw: dict[str, bytes] = {}
        try:
            self.byteorder = ">" if self._optional("byteorder").strip() == b"big" else "<"
            self.obj = RestrictedUnpickler(_entry(self.zip, self.prefix + "data.pkl", limit=MAX_PICKLE)).load()
        except BaseException:
            self.zip.close()
            raise

    def _optional(self, name: str) -> bytes:
        return self.zip.read(self.prefix + name) if self.prefix + name in self.zip.namelist() else b""

    def array(self, rec: TensorRecord) -> np.ndarray:
        s = rec.storage
        if s.key not in self.raw:
            nbytes = s.numel if s.dtype == "bytes" else s.numel * np.dtype(DTYPES[s.dtype]).itemsize
            self.raw[s.key] = _entry(self.zip, f"{self.prefix}data/{s.key}", size=nbytes)
        return _array(rec, self.raw[s.key], self.byteorder)


# Errors a damaged or hostile pickle or zip raises; each becomes one line naming the file.
READ_ERRORS = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, OSError, ValueError, TypeError,
               KeyError, IndexError, AttributeError, RecursionError, OverflowError, MemoryError, UnicodeDecodeError)


def read_pth(path) -> dict[str, np.ndarray]:
    """The state dict of a torch ``.pth`` (zip) file, name -> numpy array, without torch.

    The wrapper is unwrapped as ``shvit_numpy.names.unwrap_checkpoint`` does (``model``, then
    ``state_dict``, else the whole dict; ``model_ema`` and the rest of a training file are left
    unread). Arrays keep the stored dtype, except bfloat16, widened to float32 (exact);
    non-tensor entries are dropped. Any problem: ``ShvitError``, one line naming the file.
    """
    path = Path(path)
    try:
        archive = Archive(path)
        try:
            state = unwrap_checkpoint(archive.obj)
            out = {}
            for name, value in state.items():
                if isinstance(value, Unreadable):
                    raise ShvitError(f"tensor {name!r} cannot be read: {value.reason}")
                if isinstance(value, TensorRecord):
                    out[str(name)] = archive.array(value)
        finally:
            archive.zip.close()
    except ShvitError as e:
        msg = str(e)
        raise ShvitError(msg if str(path) in msg else f"{path}: {msg}") from None
    except READ_ERRORS as e:
        raise ShvitError(f"{path} is not a readable torch checkpoint (truncated or damaged?): {first_line(e)}") from None
    if not out:
        raise ShvitError(f"{path} holds no tensors, expected an SHViT state dict")
    return out
