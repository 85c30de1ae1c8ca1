"""One model on the fast path: its kernels' weights, a capture per input shape, the cache, the replay.

The first call with a new input shape builds the graph (lower.py's on the CPU device in float32,
the reference ``model.forward`` elsewhere) and captures it with TinyJit at once (no separate
warm-up call), or loads the capture from the compiled-model cache (cache.py). On the CPU device
numpy calls then run the capture as flat C calls (replay.py): from the second call of a shape
on, or from the first where the capture came from the cache.
"""
from __future__ import annotations

import functools

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.dtype import _from_np_dtype

from . import cache
from .lower import Lowered
from .pack import kernel_weights
from .replay import cpu_replay
from .target import compile_context, num_cpu_threads


def kernels_apply(model) -> bool:
    """The kernels of kernels.py run on tinygrad's CPU device in float32."""
    return model.device == "CPU" and model.dtype == dtypes.float32


class Runner:
    """``runner(x, jit)``: ``model(x)`` on the fast path, for one model and its current weights."""

    def __init__(self, model):
        self.model = model
        self.cores = model.threads or num_cpu_threads()  # the threads that run it, and target.slices(cores) per kernel
        self.jits: dict[tuple, TinyJit] = {}
        self.replays: dict[tuple, object] = {}  # numpy input shape -> CpuReplay, or None: TinyJit's replay

    @functools.cached_property
    def lowered(self) -> Lowered | None:
        """The model on the kernels, their weights packed (pack.py): made on the first graph this
        runner builds, not before; a capture loaded from the cache holds its own weights, so a
        process that answers from the cache never packs them (0.2 s of a warm first answer)."""
        return Lowered(self.model, kernel_weights(self.model)) if kernels_apply(self.model) else None

    def forward(self, t: Tensor) -> Tensor:
        """The lazy graph: (B, 3, H, W) -> (B, classes) float32."""
        return self.lowered.forward(t) if self.lowered is not None else self.model.forward(t)

    def __call__(self, x, jit: bool = True):
        m = self.model
        if isinstance(x, Tensor):
            t = x.to(m.device).contiguous().realize()
            return self.jitted(t) if jit else self.forward(t)
        if jit and x.shape not in self.replays:
            self.load_replay(x)
        if jit and (replay := self.replays.get(x.shape)) is not None:
            return replay(x)  # the capture as flat C calls (CPU device: a saved one, or from the second call on)
        t = Tensor(np.ascontiguousarray(x), device=m.device).realize()
        if not jit:
            with compile_context(m.device, self.cores):  # compiled as the JIT compiles them
                return self.forward(t).numpy()
        y = self.jitted(t).numpy()
        if x.shape not in self.replays:
            self.replays[x.shape] = cpu_replay(self.jits[(t.shape, t.dtype, t.device)], m.device, x.shape, t.dtype,
                                               self.cores)
        return y

    def load_replay(self, x: np.ndarray) -> None:
        """A capture the cache holds for this numpy batch's shape, made straight into its flat
        replay (replay.py): without a first TinyJit call, which walks every kernel in Python
        (~0.1 s of a warm first answer). Nothing is done where the cache has none; off the CPU
        device the capture is kept for TinyJit to replay."""
        m = self.model
        dtype = _from_np_dtype(x.dtype)  # as Tensor(x) makes it
        key = (tuple(x.shape), dtype, Device.canonicalize(m.device))
        if key in self.jits or (parts := self.cache_parts(key[0], dtype)) is None or (jit := cache.fetch(parts)) is None:
            return
        self.jits[key] = jit
        self.replays[x.shape] = cpu_replay(jit, m.device, x.shape, dtype, self.cores)

    def jitted(self, t: Tensor) -> Tensor:
        """The forward pass as a TinyJit capture, one per input shape: from the compiled-model
        cache when it has one, else captured on this first call and saved there."""
        key = (t.shape, t.dtype, t.device)
        jit, parts = self.jits.get(key), None
        if jit is None:
            parts = self.cache_parts(t.shape, t.dtype)
            jit = cache.fetch(parts) if parts is not None else None
            if jit is None:
                _ = self.lowered  # its weights packed and copied now, not inside the capture
                jit = TinyJit(lambda inp: self.forward(inp).realize())
                jit.cnt = 1  # capture on the first call: the weights are realised, nothing one-off to leave out
            else:
                parts = None  # loaded: nothing to save
            self.jits[key] = jit
        with compile_context(self.model.device, self.cores):
            y = jit(t)
        if parts is not None:
            y = Tensor(y.numpy(), device=self.model.device)  # saving frees the capture's own buffers, its output's too
            cache.store(parts, jit)
        return y

    def cache_parts(self, shape: tuple, dtype) -> dict | None:
        """This model's and an input's (its shape and tinygrad dtype) cache key, or None where the
        cache does not apply (turned off, or weights that are not a file's as ``load`` read it)."""
        m = self.model
        if m.weights_id is None or not cache.enabled():
            return None
        return cache.key_parts(m.weights_id, shape, dtype.name, m.device, self.cores)
