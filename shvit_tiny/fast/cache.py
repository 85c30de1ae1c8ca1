"""A persistent cache of captured models: a new process answers without tinygrad's code generation.

tinygrad keeps compiled binaries on disk (its CACHEDB) but redoes, in every new process, the
Python-side work before them: scheduling the graph, lowering each kernel, memory planning. For
S1 that is most of a first call's ~10-30 s. A captured ``TinyJit`` holds the finished result
(its kernels' binaries, the planned buffers, the weights), and tinygrad 0.14 can pickle it; so
the first run of a key saves the capture here and later runs load it and answer at once.

Key: the weight file's content and how it was loaded (fold, half), the input shape and dtype,
the device with its renderer/arch targets (and, for the CPU, the processor: the binaries are
built with ``-march=native``), the tinygrad and Python versions, tinygrad's code-generation
settings (BEAM, NOOPT, ...), and the sources of shvit_tiny and shvit_numpy (which folds the weights
a capture holds) with the package's version.

Where: ``$XDG_CACHE_HOME/shvit`` (default ``~/.cache/shvit``), the folder 0700 and each file
0600, written atomically (temporary file + rename: two processes filling one key both succeed
and leave one good file), at most ``SHVIT_CACHE_MB`` megabytes (default 2048; the entries used
longest ago go first). ``SHVIT_CACHE=0`` or ``--no-cache`` turns it off; clearing it is
``rm -r ~/.cache/shvit``.

Safety: unpickling runs code, so an entry is read only from a folder owned by this user that
no one else may write to, and only if the file is this user's and not group/world writable;
otherwise the cache is not used (one line says why). A truncated, corrupt, foreign-version or
mismatched entry gives one line on stderr, is deleted and rebuilt: never a crash or a wrong answer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import platform
import stat
import tempfile
from pathlib import Path

from . import notice, switched_off, tinygrad_version

FORMAT = 2  # bump when what an entry holds changes (2: programs saved without their lowered graphs)
MAGIC = b"shvit-tinyjit\n"


def enabled() -> bool:
    return not switched_off("SHVIT_CACHE")


def directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shvit"


def max_bytes() -> int:
    try:
        return int(float(os.environ.get("SHVIT_CACHE_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20


# ---- the key ------------------------------------------------------------------------------------

SOURCES = (Path(__file__).resolve().parents[2] / "shvit_numpy", Path(__file__).resolve().parents[1])  # shvit_numpy, shvit_tiny


@functools.cache
def source_digest(roots: tuple[Path, ...] = SOURCES) -> str:
    """Every source that shapes a capture, and the package version: shvit_tiny's (the layers, the
    kernels, how they are lowered) and shvit_numpy's (it reads, checks and folds the weights the
    capture holds: a change to its folding must not be answered from an old capture)."""
    h = hashlib.sha256(package_version().encode())
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(root.parent).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shvit")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "not installed"


@functools.cache
def processor() -> str:
    """What the CPU device's ``-march=native`` binaries depend on: the model name and flags."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        info += "".join(dict.fromkeys(lines))  # the first core's lines (the others repeat them)
    except OSError:
        info += platform.processor()
    return hashlib.sha256(info.encode()).hexdigest()[:16]


def key_parts(weights_id: str, shape: tuple, dtype: str, device: str, cores: int) -> dict:
    from tinygrad.helpers import DEV

    parts = {
        "format": FORMAT, "weights": weights_id, "shape": list(shape), "dtype": dtype, "device": device,
        "target": repr(DEV.target(device.split(":")[0])),  # this device's renderer/arch (DEV=CPU:LLVM, ...)
        "tinygrad": tinygrad_version(),
        "python": platform.python_version(), "sources": source_digest(SOURCES),
        "settings": codegen_settings() | {"NUM_CPU_THREADS": repr(cores)},  # the kernels' split across cores
    }
    if device.split(":")[0] == "CPU":
        parts["processor"] = processor()
    return parts


def codegen_settings() -> dict:
    """tinygrad's settings that change the kernels it makes: those it keys its own program cache
    by (NOOPT, NUM_CPU_THREADS, USE_TC, IMAGE, ...), BEAM and JITBEAM, the C compiler, and whether
    the fast path's kernels are csource.py's C or kernels.py's UOps lowered by tinygrad."""
    from tinygrad.codegen import to_program_config
    from tinygrad.helpers import BEAM, getenv

    out = {v.key: repr(v.value) for v in to_program_config}
    out.update(BEAM=BEAM.value, JITBEAM=getenv("JITBEAM", 0), CC=os.environ.get("CC", ""),
               SHVIT_C_KERNELS=not switched_off("SHVIT_C_KERNELS"))  # csource.py's C, or kernels.py lowered
    return out


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


# ---- the folder and its safety ------------------------------------------------------------------

def unsafe_reason(path: Path, st: os.stat_result, what: str) -> str | None:
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{what} {path} belongs to another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} {path} is group/world writable (chmod go-w it)"
    return None


def safe_directory(create: bool) -> Path | None:
    """The cache folder, made 0700 if missing; None (with one line) if it may not be trusted."""
    d = directory()
    try:
        if create and not d.is_dir():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)  # whatever the umask
        st = os.stat(d, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        notice(f"compiled-model cache not used: {d}: {e.strerror}")
        return None
    if not stat.S_ISDIR(st.st_mode):
        notice(f"compiled-model cache not used: {d} is not a folder")
        return None
    if (why := unsafe_reason(d, st, "folder")) is not None:
        notice(f"compiled-model cache not used: {why}")
        return None
    return d


# ---- reading and writing ------------------------------------------------------------------------

def entry_path(d: Path, key: str) -> Path:
    return d / f"{key}.jit"


def encode(parts: dict, payload: bytes) -> bytes:
    """MAGIC, one JSON line (format, key parts, payload size and SHA-256), then the pickle."""
    header = {"format": FORMAT, "parts": parts, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode(data: bytes, parts: dict) -> memoryview:
    """The payload of an entry written by ``encode`` for ``parts`` (a view into ``data``: a 26 MB
    entry is not copied twice more); ValueError saying what is wrong."""
    if not data.startswith(MAGIC):
        raise ValueError("corrupt (not a shvit cache entry)")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end]) if end >= 0 else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError("truncated or corrupt header")
    if header.get("format") != FORMAT:
        raise ValueError(f"written by another version (format {header.get('format')!r}, this is {FORMAT})")
    if header.get("parts") != parts:
        raise ValueError("made for another model, input or setup")
    payload = memoryview(data)[end + 1:]
    if len(payload) != header.get("size"):
        raise ValueError(f"truncated ({len(payload)} of {header.get('size')} bytes)")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError("corrupt (checksum differs)")
    return payload


def fetch(parts: dict):
    """The captured TinyJit saved for ``parts``, or None (missing, refused or bad: then rebuilt)."""
    d = safe_directory(create=False)
    if d is None:
        return None
    path = entry_path(d, key_of(parts))
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if (why := unsafe_reason(path, st, "file")) is not None:
                notice(f"compiled-model cache entry not used: {why}")
                return None
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        notice(f"compiled-model cache entry {path.name} unreadable ({e.strerror}); compiling instead")
        return None
    try:
        jit = Unpickler(io.BytesIO(decode(data, parts))).load()
        if getattr(jit, "captured", None) is None:
            raise ValueError("corrupt (no captured model inside)")
    except Exception as e:  # anything a damaged pickle raises: report, drop, rebuild
        reason = str(e) if isinstance(e, ValueError) else f"corrupt ({type(e).__name__})"
        discard(path, reason)
        return None
    with _quiet():
        os.utime(path)  # most recently used: the last to be evicted
    return jit


class Unpickler(pickle.Unpickler):
    """Classes only from tinygrad and plain data types from builtins (the folder's ownership is
    what makes an entry trusted; this narrows what even a damaged entry can name), and every
    buffer of the capture renumbered as this process's own.

    tinygrad names a buffer by a per-process counter (``UOp.new_buffer``'s slot) and interns
    UOps by value: the saved capture's buffer 17 would BE this process's buffer 17, some other
    model's weights, and answer wrongly. Each saved slot gets a fresh number from the counter."""

    BUILTINS = {"bytearray", "bytes", "set", "frozenset", "slice", "range", "complex", "tuple", "list", "dict", "int", "float",
                "bool", "str"}

    def __init__(self, file):
        super().__init__(file)
        self.slots: dict[int, int] = {}

    def find_class(self, module: str, name: str):
        if not (module.startswith("tinygrad.") or (module == "builtins" and name in self.BUILTINS)):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if (module, name) == ("tinygrad.uop.ops", "UOp"):
            return self.uop
        return super().find_class(module, name)

    def uop(self, op, dtype=None, src=(), arg=None, *rest):
        from tinygrad.uop.ops import Ops, ParamArg, UOp

        if op is Ops.BUFFER and isinstance(arg, ParamArg):
            if arg.slot not in self.slots:
                self.slots[arg.slot] = next(UOp.unique_num)
            arg = dataclasses.replace(arg, slot=self.slots[arg.slot])
        return UOp(op, dtype, src, arg, *rest)


def discard(path: Path, reason: str) -> None:
    notice(f"compiled-model cache entry {path.name} is {reason}; rebuilding it")
    with _quiet():
        path.unlink()


def store(parts: dict, jit) -> Path | None:
    """Save a captured TinyJit for ``parts`` atomically, then keep the folder under its size bound."""
    d = safe_directory(create=True)
    if d is None:
        return None
    jit.captured.free_intermediates()  # the planned scratch buffers are not saved, only their sizes
    with lean(jit.captured):
        data = encode(parts, pickle.dumps(jit, protocol=pickle.HIGHEST_PROTOCOL))
    path = entry_path(d, key_of(parts))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=d)  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old entry, or none, or this one
    except OSError as e:
        notice(f"compiled-model cache not written: {e.strerror}")
        return None
    finally:
        with _quiet():
            os.unlink(tmp)
    evict(d, max_bytes())
    return path


@contextlib.contextmanager
def lean(captured):
    """While pickling: ``captured`` with each compiled program reduced to what running it reads.

    A compiled PROGRAM holds its binary, its C source, its launch info and the whole graph it
    was lowered through (thousands of UOps per kernel: 38,000 of S1's 39,000). Running it reads
    the binary, the launch info, the parameters' signature (``UOp.to_elf``) and the cost
    estimates, never the graph; unpickling and hashing that graph was ~0.7 s of every warm first
    answer. The process that captured keeps its full capture: only the saved copy is lean."""
    full = captured._linear
    captured._linear = full.replace(src=tuple(c.replace(src=(lean_program(c.src[0]), *c.src[1:])) for c in full.src))
    try:
        yield
    finally:
        captured._linear = full


def lean_program(prg):
    """A compiled PROGRAM (SINK, LINEAR, SOURCE, BINARY) with its SINK emptied (its KernelInfo,
    with the estimates, kept) and its LINEAR cut to the PARAMs; anything else as it is."""
    from tinygrad.uop.ops import Ops, UOp

    if prg.op is not Ops.PROGRAM or [s.op for s in prg.src] != [Ops.SINK, Ops.LINEAR, Ops.SOURCE, Ops.BINARY]:
        return prg
    sink, linear, *rest = prg.src
    params = tuple(u for u in linear.src if u.op is Ops.PARAM)  # in order: to_elf's signature
    return prg.replace(src=(UOp(Ops.SINK, sink.dtype, (), sink.arg), linear.replace(src=params), *rest))


def evict(d: Path, limit: int) -> list[Path]:
    """Delete the least recently used entries until the folder holds at most ``limit`` bytes."""
    entries = []
    for p in d.glob("*.jit"):
        with _quiet():
            st = p.stat()
            entries.append((st.st_mtime, st.st_size, p))
    entries.sort()
    total, gone = sum(size for _, size, _ in entries), []
    for _, size, p in entries[:-1]:  # the newest entry always stays
        if total <= limit:
            break
        with _quiet():
            p.unlink()
            gone.append(p)
        total -= size
    return gone


def _quiet():
    """Ignore a file that vanished or could not be touched (another process got there first)."""
    return contextlib.suppress(OSError)
