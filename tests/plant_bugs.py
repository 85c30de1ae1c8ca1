"""Does the test suite catch real bugs? ``python -m tests.plant_bugs [AREA ...]``

Each bug is planted alone in a scratch copy of the repository (the working tree as it is), and
the tests that should catch it run there (``-x``: the first failure is enough); the script reports
which test failed first and how long that took. Every planted bug must be caught; it exits 1 if
one is not. Areas (all by default):

* ``torch``, ``numpy``, ``tiny`` (and ``fast``, shvit_tiny's CPU kernels): in each runtime, the wrong attention scale, one residual
  connection dropped, q and k swapped, against tests/test_equivalence.py;
* ``threads``: the thread pool skipping a slice or losing the core id, against the split test
  of tests/test_tiny.py; the replay's finiteness check skipping a float of each slice, and the
  kernels reading the batch from a stale address, against its replay test;
* ``csource``: the kernels written as C reading the residual at the wrong width, skipping a step
  of a sum, overlapping core slices, shifting taps, shifting the rows of a product's second part,
  against their twin test in tests/test_fast.py;
* ``names``, ``preprocess``, ``readers``, ``float16``, ``training``: the edges of issue 23
  (the authors' names, image preprocessing, the ``.pth`` reader, tinygrad's float16 choices, the
  training step), against the tests that check them on independent references (tests/test_edges.py)
  or their own unit tests.

Slow: up to minutes per bug (tinygrad compiles); not part of make test.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENCE = ("tests/test_equivalence.py",)
EDGES = "tests/test_edges.py"


class Bug(NamedTuple):
    """``old`` -> ``new`` in ``file`` (a regular expression when ``regex``); it must match exactly once."""

    area: str
    name: str
    file: str
    old: str
    new: str
    tests: tuple = EQUIVALENCE
    regex: bool = False


def edges(*names: str) -> tuple:
    return tuple(f"{EDGES}::{n}" for n in names)


SPLIT = ("tests/test_tiny.py::test_kernels_split_across_cores_answer_bit_for_bit_as_one_core",)
TWINS = ("tests/test_fast.py::test_c_kernels_answer_bit_for_bit_as_tinygrad_lowers_the_uop_kernels",)
REPLAY = ("tests/test_tiny.py::test_cpu_replay_is_the_jits_own_answer",)
AUTHORS = edges("test_authors_keys_map_name_by_name_and_shape_by_shape",
                "test_authors_file_gives_the_logits_of_a_forward_by_the_authors_names")
PIXELS = edges("test_preprocessing_is_torchvisions_pixel_for_pixel")
HALF = edges("test_float16_model_survives_overflowing_scores_and_groupnorm_on_cpu")

BUGS = [
    Bug("torch", "attention scale", "shvit_torch/layers.py", "self.scale = qk_dim ** -0.5", "self.scale = pdim ** -0.5"),
    Bug("torch", "drop FFN residual", "shvit_torch/layers.py", "return self.ffn(self.mixer(self.conv(x)))",
        "return self.ffn.m(self.mixer(self.conv(x)))"),
    Bug("torch", "swap q and k", "shvit_torch/layers.py", "q, k, v = torch.split(", "k, q, v = torch.split("),
    Bug("numpy", "attention scale", "shvit_numpy/layers.py", "np.float32(qk_dim ** -0.5)", "np.float32(pdim ** -0.5)"),
    Bug("numpy", "drop FFN residual", "shvit_numpy/layers.py", "        return self.ffn(x)\n", "        return self.ffn.m(x)\n"),
    Bug("numpy", "swap q and k", "shvit_numpy/layers.py", "q, k, v = np.split(", "k, q, v = np.split("),
    Bug("tiny", "attention scale", "shvit_tiny/layers.py", "self.scale = qk_dim ** -0.5", "self.scale = pdim ** -0.5"),
    Bug("tiny", "drop FFN residual", "shvit_tiny/layers.py", "        return self.ffn(x)\n", "        return self.ffn.m(x)\n"),
    Bug("tiny", "swap q and k", "shvit_tiny/layers.py", "q, k, v = qkv.split(", "k, q, v = qkv.split("),
    Bug("fast", "swap q and k", "shvit_tiny/fast/lower.py", "q, k = qkv[..., :a.qk_dim], qkv[..., a.qk_dim:2 * a.qk_dim]",
        "k, q = qkv[..., :a.qk_dim], qkv[..., a.qk_dim:2 * a.qk_dim]"),
    Bug("fast", "ReLU epilogue dropped", "shvit_tiny/fast/kernels.py", "    y = y.maximum(0.0) if relu else y\n",
        "    y = y\n"),
    # -- every core: the thread pool must run every slice of every split kernel ------------------
    Bug("threads", "last slice of each kernel never run", "shvit_tiny/fast/parallel.py",
        "c.fxn, c.slices, c.core_arg = addr, slices, core_arg",
        "c.fxn, c.slices, c.core_arg = addr, max(1, slices - 1), core_arg", SPLIT),
    Bug("threads", "core id not passed", "shvit_tiny/fast/pool.c", "if (c->core_arg >= 0) a[c->core_arg] = (uint64_t)core;",
        "(void)core;", SPLIT),
    Bug("threads", "finiteness check skips each slice's last float", "shvit_tiny/fast/pool.c",
        "i < hi; i++)\n    bad |=", "i + 1 < hi; i++)\n    bad |=", REPLAY),
    Bug("threads", "batch read in place from a stale address", "shvit_tiny/fast/replay.py",
        "self.array[1 + i].args[j] = addr", "self.array[1 + i].args[j] = self.in_addr", REPLAY),
    Bug("csource", "residual read at the padded row width", "shvit_tiny/fast/csource.py",
        "for width in (N, n))", "for width in (N, N))", TWINS),
    Bug("csource", "last step of each product's sum skipped", "shvit_tiny/fast/csource.py",
        'for (int {k} = 0; {k} < {K}; {k}++)', 'for (int {k} = 0; {k} < {K - 1}; {k}++)', TWINS),
    Bug("csource", "core slices overlap", "shvit_tiny/fast/csource.py",
        'const long {name}_lo = core * {per}', 'const long {name}_lo = core * {max(1, per - 1)}', TWINS),
    Bug("csource", "rows after the 14-row part shifted by one", "shvit_tiny/fast/csource.py",
        'row0 = f" + {first}" if first else ""', 'row0 = f" + {first - 1}" if first else ""', TWINS),
    Bug("csource", "depthwise taps shifted", "shvit_tiny/fast/csource.py",
        "ix = {stride} * x + {kx - padding}", "ix = {stride} * x + {kx - padding + 1}", TWINS),
    # -- the authors' names: mistakes consistent in both directions pass a round trip -----------
    Bug("names", "downsample halves swapped, both ways", "shvit_numpy/names.py",
        '_AUTHORS_DOWNSAMPLE = {"0.0": 0, "0.1": 1, "1": 2, "2.0": 3, "2.1": 4}',
        '_AUTHORS_DOWNSAMPLE = {"0.0": 3, "0.1": 4, "1": 2, "2.0": 0, "2.1": 1}', AUTHORS),
    Bug("names", "blocks offset by 2, one way", "shvit_numpy/names.py", 'return f"stages.{s}.blocks.{j - 3}.{rest}"',
        'return f"stages.{s}.blocks.{j - 2}.{rest}"', AUTHORS),
    Bug("names", "training file: model_ema read", "shvit_numpy/names.py", 'for key in ("model", "state_dict"):',
        'for key in ("model_ema", "model", "state_dict"):', AUTHORS),
    # -- preprocessing arithmetic and filter -------------------------------------------------------
    Bug("preprocess", "crop offset floored", "shvit_numpy/preprocess.py",
        "left, top = round((size[0] - res) / 2), round((size[1] - res) / 2)",
        "left, top = (size[0] - res) // 2, (size[1] - res) // 2", PIXELS),
    Bug("preprocess", "crop offset rounds halves up", "shvit_numpy/preprocess.py",
        "left, top = round((size[0] - res) / 2), round((size[1] - res) / 2)",
        "left, top = int((size[0] - res) / 2 + 0.5), int((size[1] - res) / 2 + 0.5)", PIXELS),
    Bug("preprocess", "longer side rounded", "shvit_numpy/preprocess.py",
        "size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)",
        "size = (short, round(short * h / w)) if w <= h else (round(short * w / h), short)", PIXELS),
    Bug("preprocess", "resize size rounded", "shvit_numpy/preprocess.py", "return int(256 / 224 * res)",
        "return round(256 / 224 * res)", PIXELS),
    Bug("preprocess", "bilinear, not bicubic", "shvit_numpy/preprocess.py", "im.resize(size, Image.BICUBIC)",
        "im.resize(size, Image.BILINEAR)", PIXELS),
    Bug("preprocess", "mean in BGR order", "shvit_numpy/preprocess.py", "MEAN = np.array([0.485, 0.456, 0.406]",
        "MEAN = np.array([0.406, 0.456, 0.485]", PIXELS),
    # -- the numpy .pth reader ---------------------------------------------------------------------
    Bug("readers", "storage offset ignored", "shvit_numpy/pth.py", "as_strided(flat[rec.offset:],",
        "as_strided(flat,", AUTHORS),
    Bug("readers", "strides taken as C order", "shvit_numpy/pth.py", "[s * dtype.itemsize for s in rec.stride]",
        "[int(np.prod(rec.size[i + 1:])) * dtype.itemsize for i in range(len(rec.size))]", AUTHORS),
    Bug("readers", "float16 storage read as bfloat16", "shvit_numpy/pth.py", '"HalfStorage": "float16"',
        '"HalfStorage": "bfloat16"', AUTHORS),
    # -- tinygrad's float16 choices (patterns tolerant of layout changes in shvit_tiny/layers.py) ---
    Bug("float16", "scores in float16", "shvit_tiny/layers.py", r"(scores = \([^\n]*@[^\n]*\))\.float\(\)", r"\1",
        HALF, regex=True),
    Bug("float16", "softmax in float16", "shvit_tiny/layers.py", r"scores\.softmax\(-1\)",
        "scores.cast(x.dtype).softmax(-1)", HALF, regex=True),
    Bug("float16", "GroupNorm in float16", "shvit_tiny/layers.py", r"\bh = x\.float\(\)", "h = x", HALF, regex=True),
    # -- the training step -------------------------------------------------------------------------
    Bug("training", "warm-up one step late", "shvit_torch/train.py", "return (step + 1) / warmup",
        "return step / warmup", ("tests/test_train.py::test_lr_schedule_warms_up_then_decays_to_the_floor",)),
    Bug("training", "cutmix target from the drawn ratio", "shvit_torch/data.py",
        "lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)", "lam = lam",
        ("tests/test_train.py::test_mixup_and_cutmix_targets_weigh_the_images_as_mixed",)),
    Bug("training", "distillation heads swapped", "shvit_torch/train.py", "logits, logits_dist = out",
        "logits_dist, logits = out", edges("test_loss_is_label_smoothed_cross_entropy_and_hard_distillation")),
    Bug("training", "label smoothing dropped", "shvit_torch/train.py",
        "return F.cross_entropy(out, target, label_smoothing=s.label_smoothing), out",
        "return F.cross_entropy(out, target), out", edges("test_loss_is_label_smoothed_cross_entropy_and_hard_distillation")),
    Bug("training", "weight decay on norms and biases", "shvit_torch/train.py",
        "decay = [p for p in model.parameters() if p.ndim > 1]", "decay = [p for p in model.parameters() if p.ndim >= 1]",
        edges("test_weight_decay_only_on_convolution_and_linear_kernels")),
]


def plant(root: Path, bug: Bug) -> None:
    path = root / bug.file
    text = path.read_text()
    if bug.regex:
        new, n = re.subn(bug.old, bug.new, text)
    else:
        new, n = text.replace(bug.old, bug.new), text.count(bug.old)
    assert n == 1, f"{bug.file}: the text to mutate for '{bug.name}' matches {n} times, not once"
    path.write_text(new)


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def main(argv=None) -> int:
    areas = set(sys.argv[1:] if argv is None else argv)
    unknown = areas - {b.area for b in BUGS}
    if unknown:
        print(f"unknown area {sorted(unknown)[0]!r}; expected some of {sorted({b.area for b in BUGS})}", file=sys.stderr)
        return 2
    missed = 0
    for bug in BUGS:
        if areas and bug.area not in areas:
            continue
        with tempfile.TemporaryDirectory() as d:
            copy_repo(Path(d))
            plant(Path(d), bug)
            start = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests],
                               cwd=d, capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HYPOTHESIS_PROFILE": "plant",
                                    "OMP_NUM_THREADS": "1"})
            seconds = time.monotonic() - start
            failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in r.stdout.splitlines() if line.startswith("FAILED")]
            caught = r.returncode == 1 and failed
            missed += not caught
            verdict = f"CAUGHT by {failed[0]}" if caught else f"NOT CAUGHT (exit {r.returncode})"
            print(f"{bug.area:10s} {bug.name:36s} {seconds:6.1f} s  {verdict}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
