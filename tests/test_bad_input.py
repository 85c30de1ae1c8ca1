"""Bad input, in one table: every runtime's library raises ``ShvitError`` with the same one line,
and every command-line program prints that line as ``PROG: error: ...`` and exits 2, with no
traceback. Bad arrays, bad flags and bad weight files, for shvit_numpy, shvit_torch (eager and
``optimize``) and shvit_tiny, and the CLIs run, convert and profile.

Everything runs in this process (the CLIs through their ``main(argv)``): a small model, errors
that come before any compile. One real process per CLI module checks ``python -m`` itself.
"""
import re
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch

import shvit_numpy
import shvit_torch
from shvit_numpy import profile as numpy_profile
from shvit_numpy import run as numpy_run
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import load_weights
from shvit_torch import convert as torch_convert
from shvit_torch import run as torch_run
from tests.helpers import random_model_file, randomize

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 1, 1), num_classes=7)
SHAPE = "(batch, 3, height, width)"

# name: (a bad batch, the one line every runtime raises for it)
ARRAYS = {
    "rank 3": (np.zeros((3, 32, 32), np.float32), f"input has shape [3, 32, 32] (rank 3), expected rank 4: {SHAPE}"),
    "1 channel": (np.zeros((1, 1, 32, 32), np.float32), f"input has 1 channels (shape [1, 1, 32, 32]), expected 3: {SHAPE}"),
    "4 channels": (np.zeros((1, 4, 32, 32), np.float32), f"input has 4 channels (shape [1, 4, 32, 32]), expected 3: {SHAPE}"),
    "float64": (np.zeros((1, 3, 32, 32), np.float64), "input has dtype float64, expected float32"),
    "float16": (np.zeros((1, 3, 32, 32), np.float16), "input has dtype float16, expected float32"),
    "NaN": (np.full((1, 3, 8, 8), np.nan, np.float32), "input holds NaN or infinite values, expected finite numbers"),
    "inf": (np.full((2, 3, 8, 8), np.inf, np.float32), "input holds NaN or infinite values, expected finite numbers"),
    "empty batch": (np.zeros((0, 3, 8, 8), np.float32), "input has shape [0, 3, 8, 8], expected batch, height and width >= 1"),
    "zero width": (np.zeros((1, 3, 8, 0), np.float32), "input has shape [1, 3, 8, 0], expected batch, height and width >= 1"),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random model and its canonical weight file."""
    path = tmp_path_factory.mktemp("bad-input") / "small.safetensors"
    return random_model_file(SMALL, 5, path), path


@pytest.fixture(scope="module")
def library(weights):
    """Every entry point that takes a batch: name -> numpy batch -> output (or ShvitError)."""
    model, path = weights
    np_model = shvit_numpy.load(path)
    fast = shvit_torch.optimize(model)
    tiny = tiny_load(path)
    return {
        "numpy": np_model, "numpy forward_features": np_model.forward_features,
        "numpy forward_intermediates": np_model.forward_intermediates,
        "torch": lambda x: model(torch.from_numpy(x)),
        "torch optimize()": lambda x: fast(torch.from_numpy(x)),
        "tiny": tiny, "tiny Tensor": lambda x: tiny(shvit_tiny_tensor(x)),
    }


def tiny_load(path):
    import shvit_tiny

    return shvit_tiny.load(path, device="CPU")


def shvit_tiny_tensor(x):
    from tinygrad import Tensor

    return Tensor(x, device="CPU")


class TinyRun:
    """shvit_tiny.run, imported when first used (tinygrad is imported only by the tests that need it)."""

    PROG = "python -m shvit_tiny.run"

    @staticmethod
    def main(argv):
        from shvit_tiny import run

        return run.main(argv)


tiny_run = TinyRun


@pytest.mark.parametrize("case", list(ARRAYS))
def test_every_runtime_raises_the_same_line(library, case):
    x, message = ARRAYS[case]
    for name, call in library.items():
        if name == "tiny Tensor" and case in ("NaN", "inf"):
            continue  # a tinygrad Tensor is checked for shape and dtype only (finiteness would need a realize)
        with pytest.raises(ShvitError) as e:
            call(x)
        assert str(e.value) == message, f"{name}: {e.value}"


def test_the_wrong_array_type_is_named(weights):
    model, path = weights
    good = np.zeros((1, 3, 32, 32), np.float32)
    np_model, tiny = shvit_numpy.load(path), tiny_load(path)
    for name, call, x, message in [
        ("numpy", np_model, good.tolist(), "input is a list, expected a numpy array"),
        ("tiny", tiny, good.tolist(), "input is a list, expected a numpy array"),
        ("torch", model, good, "input is a ndarray, expected a torch.Tensor"),
        ("torch optimize()", shvit_torch.optimize(model), good, "input is a ndarray, expected a torch.Tensor"),
    ]:
        with pytest.raises(ShvitError) as e:
            call(x)
        assert str(e.value) == message, f"{name}: {e.value}"


# ---- the CLIs ---------------------------------------------------------------------------------------

RUN_CLIS = {"numpy": (numpy_run, []), "torch": (torch_run, ["--device", "cpu"]), "tiny": (tiny_run, ["--device", "CPU"])}


def cli(module, argv, capsys) -> tuple[int, list[str]]:
    """Run ``module.main(argv)`` here; (exit status, stderr lines). argparse's errors exit by SystemExit."""
    capsys.readouterr()
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(module, code, err, expected: str, whole: bool = False):
    """Exit 2 and exactly one stderr line, ``PROG: error: ...`` holding ``expected`` (or being it)."""
    prog = module.PROG if hasattr(module, "PROG") else "python -m shvit_numpy.profile"
    assert code == 2 and len(err) == 1, (code, err)
    line = err[0]
    assert "Traceback" not in line and line.startswith(f"{prog}: error: "), line
    if whole:
        assert line == f"{prog}: error: {expected}", line
    else:
        assert expected in line, (expected, line)


@pytest.mark.parametrize("family", list(RUN_CLIS))
@pytest.mark.parametrize("case", list(ARRAYS))
def test_run_clis_print_the_librarys_line(weights, tmp_path, capsys, family, case):
    module, extra = RUN_CLIS[family]
    x, message = ARRAYS[case]
    np.save(tmp_path / "x.npy", x)
    code, err = cli(module, ["--weights", weights[1], "--input", tmp_path / "x.npy", *extra], capsys)
    assert_one_line(module, code, err, message, whole=True)


COMMON_FLAGS = [  # (args, expected); {w}: the weight file, {d}: a temp folder
    (["--topk", "-1"], "--topk must be >= 0, got -1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--image", "{d}/nope.jpg"], "image not found"),
    (["--input", "{d}/none.npy"], "input file not found"),
    (["--input", "{d}/text.npy"], "is not a .npy file"),
    (["--input", "{d}/x.npy", "--image", "{d}/a.png"], "not allowed with argument"),
    (["--image", "{d}/a.png", "--resolution", "0"], "--resolution must be >= 1, got 0"),
]
FAMILY_FLAGS = {
    "numpy": [(["--device", "cpu"], "unrecognized arguments: --device")],
    "torch": [(["--device", "tpu"], "unknown device 'tpu'; expected one of: cpu, cuda, mps")],
    "tiny": [(["--device", "METAL"], "device METAL is not available on this machine; available: CPU"),
             (["--device", "quantum"], "unknown device 'quantum'"),
             (["--bench", "-1"], "--bench and --beam take a count >= 0"),
             (["--beam", "-2"], "--bench and --beam take a count >= 0"),
             (["--threads", "0"], "--threads takes a count >= 1, got 0"),
             (["--threads", "two"], "argument --threads: invalid int value: 'two'")],
}
FLAG_CASES = [(f, args, expected) for f in RUN_CLIS for args, expected in COMMON_FLAGS + FAMILY_FLAGS[f]]


@pytest.mark.parametrize("family,args,expected", FLAG_CASES, ids=[f"{f}:{' '.join(a)}" for f, a, _ in FLAG_CASES])
def test_run_clis_bad_flags(weights, tmp_path, capsys, family, args, expected):
    from PIL import Image

    module, extra = RUN_CLIS[family]
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    argv = ["--weights", str(weights[1]), *extra, *(a.replace("{d}", str(tmp_path)) for a in args)]
    if "--input" not in args and "--image" not in args:
        argv += ["--input", str(tmp_path / "x.npy")]
    code, err = cli(module, argv, capsys)
    assert_one_line(module, code, err, expected)


def test_tiny_cli_without_clang_says_how_to_install_it(weights, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    monkeypatch.setenv("PATH", str(tmp_path))  # no clang on this PATH
    monkeypatch.delenv("CC", raising=False)
    code, err = cli(tiny_run, ["--weights", weights[1], "--input", tmp_path / "x.npy", "--device", "CPU"], capsys)
    assert_one_line(tiny_run, code, err, "apt-get install clang")


@pytest.mark.parametrize("args,expected", [
    (["--variant", "s7"], "unknown variant 's7'"), (["--resolution", "0"], "--resolution must be >= 1"),
    (["--resolution", "x"], "invalid int value"), (["--bogus"], "unrecognized arguments"),
])
def test_profile_cli_bad_flags(capsys, args, expected):
    code, err = cli(numpy_profile, args, capsys)
    assert_one_line(numpy_profile, code, err, expected)


def test_convert_cli_bad_paths(weights, tmp_path, capsys):
    w = str(weights[1])
    for argv, expected in [([w, str(tmp_path / "out.pth")], "output must end in .safetensors, got out.pth"),
                           ([w, w], "output would overwrite the input; choose another path"),
                           ([w], "the following arguments are required: dst")]:
        code, err = cli(torch_convert, argv, capsys)
        assert_one_line(torch_convert, code, err, expected)
    assert list(tmp_path.iterdir()) == []


# ---- bad weight files: the library's line, and every CLI's --------------------------------------------

SHAPE_ERROR = r"tensor 'stages.1.blocks.0.mixer.m.qkv.c.weight' has shape \[80, 47, 1, 1\], expected \[80, 48, 1, 1\]"


@pytest.fixture(scope="module")
def s1():
    model = shvit_torch.create("s1").eval()
    state = randomize(model, seed=11)
    return model, state


def bad_files(tmp_path, s1) -> dict:
    """{expected error text (a regex): a file that must cause it}."""
    model, state = s1
    torch_state = {k: torch.from_numpy(v) for k, v in state.items()}
    shvit_torch.save(model, tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    torch.save({"model": torch_state}, tmp_path / "full.pth")
    full = (tmp_path / "full.pth").read_bytes()
    files = {}

    def add(match, name, writer):
        files[match] = tmp_path / name
        writer(files[match])

    add("weight file not found", "missing.safetensors", lambda p: None)
    add("truncated", "trunc.safetensors", lambda p: p.write_bytes(good[: len(good) // 2]))
    add("not a valid safetensors", "text.safetensors", lambda p: p.write_text("hello, I am not a checkpoint\n" * 10))
    add("header length 16 does not fit", "short.safetensors", lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"))
    add("not a readable torch checkpoint", "trunc.pth", lambda p: p.write_bytes(full[: len(full) // 3]))
    add("empty", "empty.pth", lambda p: p.write_bytes(b""))
    add("unknown tensor 'stages.0.blocks.0.extra'", "unknown.safetensors",
        lambda p: safetensors.numpy.save_file({**state, "stages.0.blocks.0.extra": np.zeros(3, np.float32)}, p))
    add("missing tensor 'head.l.bias'", "missing_key.pth",
        lambda p: torch.save({k: v for k, v in torch_state.items() if k != "head.l.bias"}, p))
    bad = {**state, "stages.1.blocks.0.mixer.m.qkv.c.weight": np.zeros((80, 47, 1, 1), np.float32)}
    add(SHAPE_ERROR, "shape.safetensors",
        lambda p: safetensors.numpy.save_file(bad, p, metadata={"shvit_config": model.config.to_json()}))
    add("holds no SHViT weights", "other.safetensors",
        lambda p: safetensors.numpy.save_file({"encoder.weight": np.zeros(3, np.float32)}, p))
    return files


def library_error(load, path) -> str:
    with pytest.raises(ShvitError) as e:
        load(path)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_bad_files_library_lines_and_every_cli_prints_its_own(tmp_path, s1, capsys):
    """shvit_torch.load (torch's reader) and shvit_numpy.load_weights (numpy's: also tinygrad's)
    each raise one line naming the problem; each CLI prints exactly its reader's line, exit 2,
    and writes nothing."""
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    out = tmp_path / "out.safetensors"
    for match, path in bad_files(tmp_path, s1).items():
        torch_line, numpy_line = library_error(shvit_torch.load, path), library_error(load_weights, path)
        assert re.search(match, torch_line), (match, torch_line)
        assert re.search(match, numpy_line), (match, numpy_line)
        for module, argv, line in [
            (torch_run, ["--weights", path, "--input", tmp_path / "x.npy"], torch_line),
            (torch_convert, [path, out], torch_line),
            (numpy_run, ["--weights", path, "--input", tmp_path / "x.npy"], numpy_line),
            (tiny_run, ["--weights", path, "--input", tmp_path / "x.npy", "--device", "CPU"], numpy_line),
        ]:
            code, err = cli(module, argv, capsys)
            assert_one_line(module, code, err, line, whole=True)
    assert not out.exists()  # nothing half-written


# ---- each module as a real process: python -m exits 2 with the one line and no traceback ----------------

@pytest.mark.parametrize("module", ["shvit_numpy.run", "shvit_torch.run", "shvit_tiny.run", "shvit_torch.convert",
                                    "shvit_numpy.profile"])
def test_module_entry_points_exit_2_with_one_line(weights, tmp_path, module):
    np.save(tmp_path / "x.npy", ARRAYS["rank 3"][0])
    argv, expected = {
        "shvit_torch.convert": ([tmp_path / "none.pth", tmp_path / "out.safetensors"], f"weight file not found: {tmp_path / 'none.pth'}"),
        "shvit_numpy.profile": (["--variant", "s7"], None),
    }.get(module, (["--weights", weights[1], "--input", tmp_path / "x.npy"], ARRAYS["rank 3"][1]))
    r = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert lines[0].startswith(f"python -m {module}: error: ") and "Traceback" not in r.stderr, r.stderr
    if expected is not None:
        assert lines[0] == f"python -m {module}: error: {expected}", lines[0]


def test_train_cli_bad_device(tmp_path, capsys):
    """shvit_torch.train's --device is shvit_torch.run's (one pick_device): checked before any data is read."""
    from shvit_torch import train

    code, err = cli(train, ["--out", tmp_path / "o", "--device", "tpu", "--epochs", "1"], capsys)
    assert_one_line(train, code, err, "unknown device 'tpu'; expected one of: cpu, cuda, mps", whole=True)
    assert not (tmp_path / "o").exists()
