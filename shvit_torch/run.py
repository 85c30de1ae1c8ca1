"""``python -m shvit_torch.run``: classify images or a saved batch with the PyTorch model.

The flags are the shared contract of shvit_numpy/cli.py (the same in all three runtimes),
plus ``--device`` (cpu, cuda, mps) and ``--fast``. The folded model runs in eval mode; with
``--fast`` it is ``shvit_torch.optimize``'s traced and frozen form (traced once for the batch's shape).
"""
from __future__ import annotations

import os
import sys

import torch

from shvit_numpy import cli
from shvit_numpy.errors import ShvitError

from .fast import optimize
from .model import load

PROG = "python -m shvit_torch.run"


def pick_device(name: str | None) -> torch.device:
    """The device ``name`` (cpu, cuda, cuda:1, mps; any case) if this machine has it, else a one-line
    ``ShvitError``. None: CUDA where present (under torchrun, this process's GPU: cuda:LOCAL_RANK), else the CPU.
    The run and train programs' ``--device``."""
    if name is None and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    name = (name or "cpu").lower()
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name.split(":")[0] not in available:
        raise ShvitError(f"unknown device {name!r}; expected one of: cpu, cuda, mps")
    if not available[name.split(":")[0]]:
        works = ", ".join(k for k, ok in available.items() if ok)
        raise ShvitError(f"device {name!r} is not available on this machine; available: {works}")
    return torch.device(name)


def load_runtime(path, args) -> cli.Loaded:
    device = pick_device(args.device)
    model = load(path).to(device)
    fused = optimize(model) if args.fast else model.fuse()

    @torch.inference_mode()
    def predict(x):
        return fused(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return cli.Loaded(predict, model.config, model.labels, model.resolution)


def main(argv=None) -> int:
    parser = cli.make_parser(PROG, __doc__.splitlines()[0], device_help="cpu, cuda or mps (default: cuda if available)")
    parser.add_argument("--fast", action="store_true",
                        help="fold, channels-last, torch.jit.trace and freeze first (shvit_torch.optimize): a one-time "
                             "trace (~0.3 s for S1), then faster batches")
    return cli.main(PROG, load_runtime, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
