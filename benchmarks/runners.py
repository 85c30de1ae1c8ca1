"""The runtimes ``make bench`` times, each behind one interface.

``RUNTIMES[key].load(ctx)`` builds the model from the weight file of ``ctx`` (a ``Setup``) and
returns a *runner*; ``runner.timed_call(x)`` takes an NCHW float32 numpy batch and returns a
zero-argument call that runs the whole forward pass once and waits for the result. Whatever a
user would pay per batch is inside the call (numpy in, logits out on CPU; the channels-last
copy of the input; tinygrad's host-to-device copy); loading, folding, tracing and compiling
are outside (the first calls are warm-up and are never timed).

A runtime whose package is missing raises ``Unavailable`` with a one-line reason: the bench
skips it with that note instead of failing.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shvit_numpy.errors import first_line


class Unavailable(Exception):
    """This runtime cannot run here; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class Setup:
    """What a runtime needs to build one model: files, thread count, device and precision."""

    variant: str
    weights: Path  # canonical .safetensors (random weights and BatchNorm statistics)
    onnx: Path | None  # the folded model exported by shvit_torch.export (ORT's input)
    threads: int
    device: str = "cpu"  # "cpu" or "cuda"
    half: bool = False  # float16 weights and activations (GPU runs)


@dataclass(frozen=True)
class Runtime:
    key: str
    label: str  # what the tables say
    what: str  # one line: exactly what is timed
    family: str  # "shvit" (ours) or "peer"
    compiled: bool  # pays a per-shape compile before its first result (tinygrad JIT, torch.compile)
    devices: tuple[str, ...]
    load: Callable[[Setup], object]
    imports: tuple[str, ...]  # imported before the memory baseline is taken


def need(module: str, hint: str, importer=importlib.import_module):
    """Import ``module`` (with ``importer``) or raise ``Unavailable`` with the import's own one-line reason."""
    try:
        return importer(module)
    except Exception as e:  # a broken dependency raises more than ImportError (timm: torchvision)
        raise Unavailable(f"{module} does not import here ({first_line(e, 120)}); {hint}") from None


# -- PyTorch: shvit_torch in five forms, and timm's SHViT ------------------------------------------------------

class TorchRunner:
    """A torch module on CPU or CUDA; optional channels-last input, float16 on the GPU."""

    def __init__(self, module, setup: Setup, channels_last: bool = False):
        torch = need("torch", "pip install torch")
        self.torch, self.setup, self.channels_last = torch, setup, channels_last
        self.device = torch.device(setup.device)
        module = module.to(self.device)
        if setup.half:
            module = module.half()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module

    def timed_call(self, x):
        torch, dev = self.torch, self.device
        xt = torch.from_numpy(x).to(dev)
        if self.setup.half:
            xt = xt.half()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        module = self.module_for(xt.contiguous(memory_format=fmt))

        def call():
            with torch.inference_mode():
                y = module(xt.contiguous(memory_format=fmt))  # the channels-last copy is part of the cost
            sync()
            return y

        return call

    def module_for(self, example):
        """The module that runs batches shaped like ``example`` (TracedRunner traces one)."""
        return self.module


def torch_model(setup: Setup, fold: bool = True):
    need("torch", "pip install torch")
    shvit_torch = need("shvit_torch", "pip install -e .[torch]")
    model = shvit_torch.load(setup.weights)
    return model.fuse() if fold else model


def load_torch_eager(setup):
    return TorchRunner(torch_model(setup, fold=False), setup)


def load_torch_folded(setup):
    return TorchRunner(torch_model(setup), setup)


def load_torch_channels_last(setup):
    return TorchRunner(torch_model(setup), setup, channels_last=True)


class FastRunner(TorchRunner):
    """``shvit_torch.optimize()``, the user-facing fast path, called as a user calls it: its input
    check and channels-last copy are in the timed call; its per-shape trace or compile is the first call."""

    def __init__(self, setup: Setup, mode: str):
        super().__init__(torch_model(setup), setup)  # folded in float32, then moved to the device and dtype
        self.module = need("shvit_torch", "pip install -e .[torch]").optimize(self.module, mode=mode)


def load_torch_traced(setup):
    return FastRunner(setup, "trace")


def load_torch_compile(setup):
    return FastRunner(setup, "compile")  # inductor; compiles at the first call (warm-up)


class TracedRunner(TorchRunner):
    """timm's model traced and frozen as ``shvit_torch.optimize()`` traces ours (``trace_frozen``), on a
    batch of the shape it will run (a trace is only promised for the shape it saw), after moving to the
    device and dtype (a traced module keeps the dtype it saw)."""

    def module_for(self, example):
        from shvit_torch.fast import trace_frozen

        return trace_frozen(self.module, example)


def load_timm(setup):
    """timm's own SHViT with the same weights (canonical names are timm's), folded with timm's
    ``fuse()`` and traced like ours: the reference the first speed floor compares with."""
    torch = need("torch", "pip install torch")
    from .standin import import_timm

    # with an inert torchvision where PyPI's does not load (see standin.py)
    timm = need("timm", "pip install --no-deps timm (make install does)", lambda _: import_timm()[0])
    from shvit_numpy.weights import load_weights

    w = load_weights(setup.weights)
    model = timm.create_model(f"shvit_{setup.variant}", pretrained=False, num_classes=w.config.num_classes)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in w.state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # timm renamed something: do not time a half-random model
        raise Unavailable(f"timm's shvit_{setup.variant} does not take the canonical names "
                          f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
    return TracedRunner(model.eval().fuse(), setup)


# -- NumPy, tinygrad, ONNX Runtime --------------------------------------------------------------------------------

class CallRunner:
    """Anything called as ``model(x_numpy) -> logits``."""

    def __init__(self, model):
        self.model = model

    def timed_call(self, x):
        return lambda: self.model(x)


def load_numpy(setup):
    shvit_numpy = need("shvit_numpy", "pip install -e .")
    if not hasattr(shvit_numpy, "load"):
        raise Unavailable("shvit_numpy has no load() yet (the runtime is not written)")
    return CallRunner(shvit_numpy.load(setup.weights))


class TinyRunner:
    """shvit_tiny: the first two calls of a shape compile its kernels and capture the TinyJit."""

    def __init__(self, setup: Setup, device: str):
        shvit_tiny = need("shvit_tiny", "pip install -e .[tiny]")
        try:
            self.model = shvit_tiny.load(setup.weights, device=device, half=setup.half)
        except Exception as e:  # ShvitError: the device is not usable here (no clang, no OpenCL)
            raise Unavailable(first_line(e)) from None
        self.gpu = device not in ("CPU", "CL")

    def timed_call(self, x):
        if not self.gpu:
            return lambda: self.model(x)  # numpy in (copied to the device), numpy logits out
        from tinygrad import Device, Tensor

        t = Tensor(x, device=self.model.device).realize()  # GPU runs keep the batch on the device, as torch's do

        def call():
            y = self.model(t)
            Device[self.model.device].synchronize()
            return y

        return call


def load_tiny_cpu(setup):
    return TinyRunner(setup, "CPU")


def load_tiny_cl(setup):
    return TinyRunner(setup, "CL")


def load_tiny_cuda(setup):
    return TinyRunner(setup, "CUDA")


class OrtRunner:
    """ONNX Runtime's CPU provider on the folded ONNX export, all graph optimisations on."""

    def __init__(self, setup: Setup):
        ort = need("onnxruntime", "pip install onnxruntime")
        if setup.onnx is None or not Path(setup.onnx).is_file():
            raise Unavailable("no ONNX export of this model (shvit_torch.export failed or was skipped)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = setup.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(setup.onnx), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def timed_call(self, x):
        return lambda: self.session.run(None, {self.input: x})


def load_ort(setup):
    return OrtRunner(setup)


_T = ("torch", "shvit_torch")
RUNTIMES = {r.key: r for r in [
    Runtime("torch-eager", "shvit_torch eager", "unfolded model (BatchNorm kept), eager", "shvit", False, ("cpu", "cuda"),
            load_torch_eager, _T),
    Runtime("torch-folded", "shvit_torch folded", "fuse(): BatchNorm folded into convs, eager, NCHW", "shvit", False, ("cpu", "cuda"),
            load_torch_folded, _T),
    Runtime("torch-cl", "shvit_torch folded, channels_last", "folded, weights and input channels_last (input copy timed)", "shvit", False,
            ("cpu", "cuda"), load_torch_channels_last, _T),
    Runtime("torch-traced", "shvit_torch folded, traced", "shvit_torch.optimize(): folded, channels_last, torch.jit.trace + freeze",
            "shvit", False, ("cpu", "cuda"), load_torch_traced, _T),
    Runtime("torch-compile", "shvit_torch folded, torch.compile", "shvit_torch.optimize(mode='compile'): folded, "
            "torch.compile (inductor, frozen weights)", "shvit", True, ("cpu", "cuda"), load_torch_compile, _T),
    Runtime("numpy", "shvit_numpy", "plain NumPy (folded at load, channels-last inside)", "shvit", False, ("cpu",), load_numpy,
            ("numpy", "shvit_numpy")),
    Runtime("tiny-cpu", "shvit_tiny CPU (JIT)", "tinygrad CPU device (clang), TinyJit replay", "shvit", True, ("cpu",), load_tiny_cpu,
            ("tinygrad", "shvit_tiny")),
    Runtime("tiny-cl", "shvit_tiny CL (JIT)", "tinygrad CL device (OpenCL; PoCL on a CPU), TinyJit replay", "shvit", True, ("cpu",),
            load_tiny_cl, ("tinygrad", "shvit_tiny")),
    Runtime("tiny-cuda", "shvit_tiny CUDA (JIT)", "tinygrad CUDA device, TinyJit replay", "shvit", True, ("cuda",), load_tiny_cuda,
            ("tinygrad", "shvit_tiny")),
    Runtime("ort", "ONNX Runtime", "onnxruntime CPU provider on the folded ONNX export (opset 17)", "peer", False, ("cpu",), load_ort,
            ("onnxruntime",)),
    Runtime("timm", "timm folded, traced",
            "timm's SHViT, same weights, fuse() + torch.jit.trace + freeze (torchvision: benchmarks/standin.py)", "peer", False,
            ("cpu", "cuda"), load_timm, ("torch",)),
]}
