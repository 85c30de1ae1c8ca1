"""One model on the fast path: its kernels' weights, a capture per input shape, the cache, the replay.

The first call with a new input shape builds the graph (lower.py's on the CPU device in float32,
the reference ``model.forward`` elsewhere) and captures it with TinyJit at once (no separate
warm-up call), or loads the capture from the compiled-model cache (cache.py). From the second
numpy call of a shape on, the CPU device replays the capture as flat C calls (replay.py).
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, TinyJit, dtypes

from . import cache
from .lower import Lowered
from .pack import kernel_weights
from .replay import cpu_replay
from .target import compile_context, threads


def kernels_apply(model) -> bool:
    """The kernels of kernels.py run on tinygrad's CPU device in float32."""
    return model.device == "CPU" and model.dtype == dtypes.float32


class Runner:
    """``runner(x, jit)``: ``model(x)`` on the fast path, for one model and its current weights."""

    def __init__(self, model):
        self.model = model
        self.cores = model.threads or threads()  # kernels split into this many slices, run on as many threads
        self.lowered = Lowered(model, kernel_weights(model)) if kernels_apply(model) else None
        self.jits: dict[tuple, TinyJit] = {}
        self.replays: dict[tuple, object] = {}  # numpy input shape -> CpuReplay, or None: TinyJit's replay

    def forward(self, t: Tensor) -> Tensor:
        """The lazy graph: (B, 3, H, W) -> (B, classes) float32."""
        return self.lowered.forward(t) if self.lowered is not None else self.model.forward(t)

    def __call__(self, x, jit: bool = True):
        m = self.model
        if isinstance(x, Tensor):
            t = x.to(m.device).contiguous().realize()
            return self.jitted(t) if jit else self.forward(t)
        if jit and (replay := self.replays.get(x.shape)) is not None:
            return replay(x)  # the capture as flat C calls (CPU device, from the second call of a shape on)
        t = Tensor(np.ascontiguousarray(x), device=m.device).realize()
        if not jit:
            with compile_context(m.device, self.cores):  # compiled as the JIT compiles them
                return self.forward(t).numpy()
        y = self.jitted(t).numpy()
        if x.shape not in self.replays:
            self.replays[x.shape] = cpu_replay(self.jits[(t.shape, t.dtype, t.device)], m.device, x.shape, t.dtype,
                                               self.cores)
        return y

    def jitted(self, t: Tensor) -> Tensor:
        """The forward pass as a TinyJit capture, one per input shape: from the compiled-model
        cache when it has one, else captured on this first call and saved there."""
        key = (t.shape, t.dtype, t.device)
        jit, parts = self.jits.get(key), None
        if jit is None:
            parts = self.cache_parts(t)
            jit = cache.fetch(parts) if parts is not None else None
            if jit is None:
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

    def cache_parts(self, t: Tensor) -> dict | None:
        """This model's and input's cache key, or None where the cache does not apply (turned
        off, or weights that are not a file's as ``load`` read it)."""
        m = self.model
        if m.weights_id is None or not cache.enabled():
            return None
        return cache.key_parts(m.weights_id, t.shape, t.dtype.name, m.device, self.cores)
