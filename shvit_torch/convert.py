"""``python -m shvit_torch.convert SRC DST.safetensors``: any accepted weight file -> canonical.

SRC may be the authors' ``.pth`` (release or training-program files, float16 or 2-D 1x1
kernels included), timm's ``.safetensors``/``.pth``, or a canonical file. DST gets float32
tensors under canonical names with the configuration (and class names) in its metadata, and
loads in all three runtimes. Pickles are read with ``weights_only`` (no code runs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shvit_numpy.cli import Parser, fail
from shvit_numpy.errors import ShvitError
from shvit_numpy.labels import class_names
from shvit_numpy.weights import save_weights

from .checkpoint import read_checkpoint

PROG = "python -m shvit_torch.convert"


def convert(src, dst, resolution: int | None = None) -> None:
    w = read_checkpoint(Path(src))
    labels = w.labels if w.labels is not None else (class_names(1000) if w.config.num_classes == 1000 else None)
    save_weights(dst, w.config, w.state, labels, resolution or w.resolution)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="the authors' .pth, timm's .safetensors/.pth, or a canonical file")
    p.add_argument("dst", type=Path, help="output .safetensors (canonical)")
    p.add_argument("--resolution", type=int, help="record this training resolution in the file")
    args = p.parse_args(argv)
    try:
        if args.dst.suffix != ".safetensors":
            raise ShvitError(f"output must end in .safetensors, got {args.dst.name}")
        if args.src.resolve() == args.dst.resolve():
            raise ShvitError("output would overwrite the input; choose another path")
        convert(args.src, args.dst, args.resolution)
    except (ShvitError, OSError) as e:
        return fail(PROG, e)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
