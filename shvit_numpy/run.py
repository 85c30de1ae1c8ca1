"""``python -m shvit_numpy.run``: classify images or a saved batch with the NumPy model.

The flags are the shared contract of shvit_numpy/cli.py (the same in all three runtimes);
there is no --device: NumPy runs on the CPU. BatchNorm is folded at load.
"""
from __future__ import annotations

import sys

from . import cli
from .model import load

PROG = "python -m shvit_numpy.run"


def load_runtime(path, args) -> cli.Loaded:
    model = load(path)  # folded; model(x) checks its input and returns float32 logits
    return cli.Loaded(model, model.config, model.labels, model.resolution)


def main(argv=None) -> int:
    return cli.main(PROG, load_runtime, cli.make_parser(PROG, __doc__.splitlines()[0]), argv)


if __name__ == "__main__":
    sys.exit(main())
