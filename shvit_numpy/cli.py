"""The command-line contract shared, flag for flag, by shvit_numpy.run, shvit_torch.run and
shvit_tiny.run. Each runtime supplies only how to load a weight file and run a batch.

Every user error ends as one line on stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import check_array
from .config import SHViTConfig, default_resolution
from .errors import ShvitError, TrainingError, first_line
from .labels import class_names
from .weights import atomic_path

ASSETS = Path(__file__).parent / "assets"
DEMO_WEIGHTS = ASSETS / "demo.safetensors"  # bundled by `make demo-weights`
DEMO_IMAGES = ASSETS / "digits"  # sample images that go with them (canvases of handwritten digits)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default also prints the usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass
class Loaded:
    """What a runtime hands the CLI: a batch function and what the file says about the model."""

    predict: Callable[[np.ndarray], np.ndarray]  # (B, C, H, W) float32 -> (B, classes) logits
    config: SHViTConfig
    labels: list[str] | None = None
    resolution: int | None = None


def make_parser(prog: str, description: str, device_help: str | None = None) -> Parser:
    p = Parser(prog=prog, description=description)
    p.add_argument("--weights", type=Path, metavar="PATH",
                   help="weight file: canonical or timm .safetensors, or the authors' or timm's .pth (read without torch); "
                        "default: the bundled demo weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", type=Path, metavar="X.npy", help="float32 NCHW batch, already normalised")
    src.add_argument("--image", type=Path, nargs="+", metavar="FILE",
                     help="JPEG/PNG files, preprocessed as in the paper's evaluation")
    p.add_argument("--resolution", type=int, metavar="R",
                   help="image size for --image (default: the file's, else the variant's: 224, s4 256)")
    p.add_argument("--save-logits", type=Path, metavar="Y.npy", help="write the (B, classes) float32 logits here")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="print the K most likely labels (default 5; 0: none)")
    if device_help:
        p.add_argument("--device", help=device_help)
    return p


def resolve_weights(weights: Path | None) -> Path:
    if weights is not None:
        return weights
    if DEMO_WEIGHTS.is_file():
        print(f"note: no --weights given; using the bundled demo weights ({DEMO_WEIGHTS.name}: the largest of 3 digits)", file=sys.stderr)
        return DEMO_WEIGHTS
    raise ShvitError("--weights PATH is needed (no bundled demo weights in this installation)")


def read_npy(path: Path, in_chans: int) -> np.ndarray:
    if not path.is_file():
        raise ShvitError(f"input file not found: {path}")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ShvitError(f"{path} is not a .npy file (expected a float32 array saved with numpy.save)")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShvitError(f"{path} is not a readable .npy array ({first_line(e)})") from None
    return check_array(x, in_chans)


def read_batch(args, loaded: Loaded) -> tuple[np.ndarray, list[str]]:
    """The input batch and a name for each item, from --input, --image or the bundled samples."""
    cfg = loaded.config
    if args.input is not None:
        x = read_npy(args.input, cfg.in_chans)
        return x, [f"{args.input.name}[{i}]" for i in range(len(x))]
    from .preprocess import load_images

    images = args.image
    if images is None:
        images = sorted(DEMO_IMAGES.glob("*.png")) if args.weights is None else []
        if not images:
            raise ShvitError("no input: give --input X.npy or --image FILE...")
    res = args.resolution if args.resolution is not None else loaded.resolution or default_resolution(cfg)
    if res < 1:
        raise ShvitError(f"--resolution must be >= 1, got {res}")
    if cfg.in_chans != 3:
        raise ShvitError(f"--image gives 3-channel RGB input; this model takes {cfg.in_chans} channels (use --input)")
    return check_array(load_images(images, res), cfg.in_chans), [p.name for p in images]


def run_training(prog: str, train, interrupted: str = "interrupted") -> int:
    """A trainer's exit status: 0 done, 2 a user error (one line), 1 training stopped
    (``TrainingError``, one line), 130 interrupted (``interrupted`` says what is kept)."""
    try:
        train()
    except (ShvitError, OSError) as e:
        return fail(prog, e)
    except TrainingError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return 0


def fail(prog: str, e: Exception) -> int:
    """The one-line report of a user error (ShvitError, or an OSError such as an unwritable path); exit status 2."""
    if isinstance(e, OSError):
        print(f"{prog}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    else:
        print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def report(logits: np.ndarray, names: list[str], labels: list[str], k: int) -> None:
    probs = softmax(logits.astype(np.float64))
    for name, p in zip(names, probs):
        top = np.argsort(-p, kind="stable")[:k]
        print(f"{name}: " + ", ".join(f"{labels[i]} ({100 * p[i]:.1f}%)" for i in top))


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def main(prog: str, load: Callable[[Path, argparse.Namespace], Loaded], parser: Parser, argv=None) -> int:
    """Parse, load, run, report. ``load(weights_path, args)`` is the runtime's part."""
    args = parser.parse_args(argv)
    try:
        if args.topk < 0:
            raise ShvitError(f"--topk must be >= 0, got {args.topk}")
        loaded = load(resolve_weights(args.weights), args)
        x, names = read_batch(args, loaded)
        logits = np.asarray(loaded.predict(x), dtype=np.float32)
        if args.save_logits is not None:
            save_npy(args.save_logits, logits)
            print(f"saved logits {list(logits.shape)} to {args.save_logits}", file=sys.stderr)
        if args.topk:
            report(logits, names, class_names(loaded.config.num_classes, loaded.labels), min(args.topk, logits.shape[1]))
    except (ShvitError, OSError) as e:  # OSError: an unwritable output path and the like
        return fail(prog, e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
