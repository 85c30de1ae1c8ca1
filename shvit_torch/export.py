"""``python -m shvit_torch.export --format onnx --weights W --out model.onnx``: the folded model as ONNX.

The exported graph is the inference model of ``SHViT.fuse()`` (every BatchNorm folded into the
convolution before it), float32, with one input ``images`` (batch, 3, height, width) and one
output ``logits`` (batch, classes). Batch, height and width are dynamic axes: one file serves
every batch size and image size (the attention reshapes read H and W from the input's shape).
ONNX Runtime is the authors' own CPU speed test and the CPU peer of ``make bench``.

When onnx and onnxruntime are installed, the file is checked (``onnx.checker``) and run once
on a random batch against the torch model; the largest logit difference is printed.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from shvit_numpy.cli import Parser, fail
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import atomic_path

from .model import SHViT, load

PROG = "python -m shvit_torch.export"
OPSETS = range(13, 21)  # 13: Split/ReduceMean with tensor inputs; 20: the TorchScript exporter's newest
DEFAULT_OPSET = 17
INPUT, OUTPUT = "images", "logits"


def export_onnx(model: SHViT, path, opset: int = DEFAULT_OPSET, resolution: int | None = None, dynamic: bool = True) -> None:
    """Write ``model`` folded (a fresh copy; ``model`` is untouched) as an ONNX file, atomically.

    The graph is traced on a (2, C, R, R) batch, R = ``resolution`` or the model's own;
    ``dynamic`` makes batch, height and width free axes, else the file only takes that shape.
    """
    if opset not in OPSETS:
        raise ShvitError(f"opset {opset} is not supported, expected {OPSETS.start}..{OPSETS.stop - 1}")
    folded = model if model.fused else model.fuse()
    folded = folded.eval().float().cpu()
    r = resolution or model.resolution or 224
    example = torch.zeros(2, model.config.in_chans, r, r)
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch"}} if dynamic else None
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(folded, (example,), tmp, input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                          dynamic_axes=axes, do_constant_folding=True, dynamo=False)


def verify_onnx(model: SHViT, path, resolution: int, seed: int = 0) -> float | None:
    """Run the file with ONNX Runtime on a random batch: the largest |ORT - torch| logit difference.
    None when onnx or onnxruntime is not installed."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    onnx.checker.check_model(str(path))
    x = np.random.default_rng(seed).standard_normal((2, model.config.in_chans, resolution, resolution)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT], {INPUT: x})
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max())


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=["onnx"], help="output format (onnx)")
    p.add_argument("--weights", required=True, type=Path, metavar="PATH",
                   help="weight file: canonical or timm .safetensors, or the authors' / timm's .pth")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.onnx", help="where to write the ONNX file")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    p.add_argument("--resolution", type=int, metavar="R",
                   help="image size to trace at and verify with (default: the file's, else the variant's)")
    p.add_argument("--static", action="store_true", help="fix batch 2 and R x R instead of dynamic batch, height and width")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against the torch logits")
    args = p.parse_args(argv)
    try:
        if args.out.suffix != ".onnx":
            raise ShvitError(f"--out must end in .onnx, got {args.out.name}")
        if args.resolution is not None and args.resolution < 1:
            raise ShvitError(f"--resolution must be >= 1, got {args.resolution}")
        if args.opset not in OPSETS:
            raise ShvitError(f"--opset {args.opset} is not supported, expected {OPSETS.start}..{OPSETS.stop - 1}")
        model = load(args.weights)
        resolution = args.resolution or model.resolution or 224
        export_onnx(model, args.out, args.opset, resolution, dynamic=not args.static)
        diff = None if args.no_verify else verify_onnx(model, args.out, resolution)
    except (ShvitError, OSError) as e:
        return fail(PROG, e)
    axes = "static shape" if args.static else "dynamic batch, height, width"
    print(f"wrote {args.out} (opset {args.opset}, {axes}, folded {model.config.num_classes}-class model)")
    if diff is not None:
        print(f"ONNX Runtime reproduces the torch logits: max abs difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
