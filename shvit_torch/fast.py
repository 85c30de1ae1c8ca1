"""``shvit_torch.optimize(model)``: the fastest inference form of a model, in one call.

What it does, in order: an eval-mode copy with every BatchNorm folded (``model.fuse()``), then either

* ``mode="trace"`` (default): weights and input in channels-last memory format,
  ``torch.jit.trace`` on a batch of the input's shape, then ``torch.jit.freeze`` (weights inlined
  as constants, the graph simplified around them). A trace records one run and torch promises it
  only for the shape it saw, so each new (shape, dtype, device) is traced on its first call
  (~0.3 s for S1 at 224 on one core) and kept, up to ``MAX_SHAPES`` of them. Re-tracing is chosen over a
  one-shape restriction because any height and width is valid SHViT input and a wrong answer for
  an untraced shape would be silent (today's traces happen to carry sizes symbolically, but that
  is not a promise); one trace per shape is cheap. For a stream of ever-changing shapes use the
  eager ``model.fuse()``.
* ``mode="compile"``: ``torch.compile`` (inductor) with inductor's ``freezing``: weights become
  constants of the graph, so each convolution is a oneDNN primitive with its weight pre-packed
  into oneDNN's blocked layout once and ReLU and residual add fused into it. Its first call
  compiles (~10 s for S1 on one CPU core, cold cache; a C++ compiler is needed), and a new shape
  recompiles. Inputs stay in PyTorch's default layout here: with freezing, channels-last cost
  ~8% at batch 16.

Measured on one core, S1 224 (AMD EPYC, AVX-512, 2026-12-02): batch 16 traced 275 img/s,
compiled without freezing 291, with freezing 325 (ONNX Runtime 334); batch 1 traced 8.4 ms,
compiled 8.6, frozen 7.1 (ONNX Runtime 3.4: what limits torch at batch 1 is ~20 us of oneDNN
overhead in each of 77 convolutions and a 3-channel stem convolution twice as slow as ORT's).
Channels-last gains a few per cent traced; ``torch.jit.optimize_for_inference`` is not applied,
as it gained nothing beyond noise at batch 16 and cost ~50% at batch 1.

The result is for inference only: no parameters to train, every call under ``torch.no_grad``,
and ``train()`` refuses. The input is still checked as the eager model checks it (shape, dtype,
finite values), so bad input is a ``ShvitError``, not a torch error from inside a graph.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import torch
from torch import nn

from shvit_numpy.errors import ShvitError, first_line

from .model import SHViT

MODES = ("trace", "compile")
MAX_SHAPES = 8  # traced graphs kept; the oldest goes first


def trace_frozen(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.freeze(torch.jit.trace(module, example))`` in eval mode, without torch's warnings
    (jit's deprecation notice; group_norm's batch-size check seen as a Python bool)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))


class FastSHViT:
    """A folded SHViT for inference: call it on a (B, C, H, W) tensor like the model itself.

    ``config``, ``labels`` and ``resolution`` are the model's; ``mode`` is "trace" or "compile".
    """

    def __init__(self, folded: SHViT, mode: str, channels_last: bool):
        self.model, self.mode = folded, mode
        self.config, self.labels, self.resolution = folded.config, folded.labels, folded.resolution
        self.device = next(folded.parameters()).device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.graphs: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
        self.compiled = torch.compile(folded, options={"freezing": True}) if mode == "compile" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check(x)  # ShvitError for a wrong shape, dtype or non-finite values
        if x.device != self.device:
            raise ShvitError(f"input is on {x.device}, the optimized model on {self.device}; move the input with .to()")
        x = x.contiguous(memory_format=self.memory_format)
        with torch.no_grad():
            return self.compiled_call(x) if self.compiled is not None else self.graph(x)(x)

    def graph(self, x: torch.Tensor) -> torch.jit.ScriptModule:
        """The frozen trace for ``x``'s shape, dtype and device, traced on first use."""
        key = (tuple(x.shape), x.dtype, x.device)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        try:
            g = trace_frozen(self.model, x)
        except RuntimeError as e:
            raise ShvitError(f"torch.jit.trace failed on {self.device} ({first_line(e)}); "
                             "use model.fuse() instead (on the command line: drop --fast)") from None
        self.graphs[key] = g
        if len(self.graphs) > MAX_SHAPES:
            self.graphs.popitem(last=False)
        return g

    def compiled_call(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.compiled(x)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler, unsupported device...
            raise ShvitError(f"torch.compile failed on {self.device} ({first_line(e)}); use mode='trace'") from None

    def train(self, mode: bool = True) -> FastSHViT:
        if mode:
            raise ShvitError("an optimized model is for inference only; train the model you passed to optimize()")
        return self

    def eval(self) -> FastSHViT:
        return self

    def __repr__(self) -> str:
        return f"FastSHViT(mode={self.mode!r}, device={self.device}, shapes traced={len(self.graphs)})"


def optimize(model: SHViT, example: torch.Tensor | None = None, mode: str = "trace",
             channels_last: bool | None = None) -> FastSHViT:
    """The fastest inference form of ``model`` (unchanged itself): folded, then channels-last,
    traced and frozen per input shape (``mode="trace"``) or ``torch.compile``d with frozen weights
    (``mode="compile"``). ``channels_last``: None picks each mode's faster layout (trace: yes,
    compile: no).

    Put the model on its device and dtype first. ``example``, if given, is traced (or compiled) now
    instead of at the first call. Outputs equal the eval-mode model's within float32 rounding.
    """
    if mode not in MODES:
        raise ShvitError(f"unknown optimize mode {mode!r}; expected one of: {', '.join(MODES)}")
    if not isinstance(model, SHViT):
        raise ShvitError(f"optimize() takes a shvit_torch SHViT, got {type(model).__name__}")
    if mode == "compile" and not hasattr(torch, "compile"):
        raise ShvitError(f"torch {torch.__version__} has no torch.compile; use mode='trace'")
    folded = copy.deepcopy(model).eval() if model.fused else model.fuse()
    folded.requires_grad_(False)
    if channels_last is None:
        channels_last = mode == "trace"
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    fast = FastSHViT(folded, mode, channels_last)
    if example is not None:
        fast(example)
    return fast
