"""shvit_numpy.pth: torch's .pth files read without torch, and nothing in them ever runs.

Files are written by the real ``torch.save`` (tests.helpers.authors_file and timm-style state
dicts) and must give, bitwise, the arrays ``torch.load`` gives and the same logits. Hostile
pickles (os.system, builtins.eval, subprocess.Popen, an importable module's function) must be
refused or made inert; each payload is shown to be live by letting torch's unsafe loader run it.
The last tests run the numpy and tinygrad CLIs in a process where ``import torch`` fails.
"""
import io
import os
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import shvit_numpy
import shvit_torch
from shvit_numpy.cli import DEMO_IMAGES, DEMO_WEIGHTS
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.model import from_weights
from shvit_numpy.names import state_shapes, unwrap_checkpoint
from shvit_numpy.pth import Archive, Inert, read_pth
from shvit_numpy.weights import load_weights, save_weights, write_safetensors
from shvit_torch.checkpoint import read_checkpoint, torch_load_safely
from tests.helpers import authors_file, random_state

ROOT = Path(__file__).resolve().parent.parent
SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7)
X = np.random.default_rng(3).standard_normal((2, 3, 37, 44)).astype(np.float32)


@pytest.fixture(scope="module")
def state():
    return random_state(state_shapes(SMALL), seed=31)


def torch_arrays(path) -> dict[str, np.ndarray]:
    """What torch itself reads from the file (its weights_only loader), as numpy; bfloat16 widened."""
    sd = unwrap_checkpoint(torch_load_safely(Path(path)))
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def assert_bitwise(got: dict, ref: dict):
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, (k, got[k].dtype, ref[k].dtype)
        assert got[k].tobytes() == np.ascontiguousarray(ref[k]).tobytes(), k


def timm_file(state, path, wrap=None, dtype=None, parameters=False):
    """A timm-style file: a real module's state_dict() (OrderedDict with _metadata, num_batches_tracked)."""
    model = shvit_torch.create(SMALL)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    sd = model.state_dict()
    if dtype is not None:
        sd = OrderedDict((k, v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items())
    if parameters:
        sd = OrderedDict((k, torch.nn.Parameter(v, requires_grad=False) if v.is_floating_point() else v) for k, v in sd.items())
    torch.save({wrap: sd} if wrap else sd, path)


WRITERS = {
    "authors": lambda s, p: authors_file(s, p),
    "authors_fp16": lambda s, p: authors_file(s, p, fp16=True),
    "authors_two_d": lambda s, p: authors_file(s, p, two_d=True),
    "authors_training": lambda s, p: authors_file(s, p, training=True, fp16=True),  # args=Namespace, model_ema
    "authors_prefix_module": lambda s, p: authors_file(s, p, prefix_module=True, two_d=True),
    "timm": lambda s, p: timm_file(s, p),
    "timm_state_dict_bf16": lambda s, p: timm_file(s, p, wrap="state_dict", dtype=torch.bfloat16),
    "timm_parameters": lambda s, p: timm_file(s, p, wrap="model", parameters=True),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_files_read_as_torch_reads_them(kind, state, tmp_path):
    """Bitwise the arrays torch.load gives; the same numpy logits as loading through torch."""
    path = tmp_path / f"{kind}.pth"
    WRITERS[kind](state, path)
    assert_bitwise(read_pth(path), torch_arrays(path))
    model = shvit_numpy.load(path)
    assert model.config == SMALL
    np.testing.assert_array_equal(model(X), from_weights(read_checkpoint(path))(X))
    if kind in ("authors", "authors_two_d", "timm"):  # float32 files: exactly the source weights
        save_weights(tmp_path / "ref.safetensors", SMALL, state)
        np.testing.assert_array_equal(model(X), shvit_numpy.load(tmp_path / "ref.safetensors")(X))


def test_training_file_args_are_inert_and_model_is_used(state, tmp_path):
    path = tmp_path / "train.pth"
    authors_file(state, path, training=True)
    archive = Archive(path)
    args = archive.obj["args"]
    assert isinstance(args, Inert) and args.global_name == "argparse.Namespace"
    assert args.state == {"model": "shvit_s1", "lr": 1e-3, "batch_size": 256, "distillation_type": "none"}
    assert archive.obj["epoch"] == 299
    w = load_weights(path)  # model, not model_ema (which holds state + 1)
    assert all(np.array_equal(w.state[k], state[k]) for k in state)


def test_views_strides_offsets_and_dtypes(tmp_path):
    base = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    attr = torch.randn(3)
    attr.note = "a tensor with a Python attribute"  # saved via torch._tensor._rebuild_from_type_v2
    sd = {"t": base.t(), "slice": base[1::2, 2:6:3], "offset": base.view(-1)[5:9], "scalar": torch.tensor(2.5),
          "empty": torch.empty(0, 3), "count": torch.tensor(7), "flags": torch.tensor([True, False]),
          "u16": torch.from_numpy(np.array([1, 2, 60000], np.uint16)),  # torch._utils._rebuild_tensor_v3
          "half": base[:2].half(), "bf16": base[2:].bfloat16(), "attr": attr, "f64": base.double()[::3]}
    torch.save(sd, tmp_path / "v.pth")
    ref = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}
    assert_bitwise(read_pth(tmp_path / "v.pth"), ref)


def rewrite(src: Path, dst: Path, change) -> None:
    """Copy a torch zip, replacing entries: ``change(name, data)`` returns the new bytes or None to drop."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_big_endian_files(tmp_path):
    a = torch.randn(3, 4)
    torch.save({"a": a, "n": torch.tensor([5, -6])}, tmp_path / "le.pth")
    sizes = {"0": 4, "1": 8}

    def swap(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        return np.frombuffer(data, f"<u{sizes[key]}").byteswap().tobytes() if "/data/" in name else data

    rewrite(tmp_path / "le.pth", tmp_path / "be.pth", swap)
    got = read_pth(tmp_path / "be.pth")
    assert got["a"].dtype == np.float32 and np.array_equal(got["a"], a.numpy()) and got["n"].tolist() == [5, -6]


def test_file_kind_by_name_then_by_zip_signature(state, tmp_path):
    """A .pth renamed without a suffix is still read as torch's zip; a safetensors file whose header
    length starts with byte 0x80 (a pickle's first byte) is still read as safetensors."""
    authors_file(state, tmp_path / "a.pth")
    (tmp_path / "weights").write_bytes((tmp_path / "a.pth").read_bytes())
    assert load_weights(tmp_path / "weights").config == SMALL
    for n in range(300):
        write_safetensors(tmp_path / "w", state, {"pad": "x" * n})
        if (tmp_path / "w").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "w").read_bytes()[:1] == b"\x80"
    assert load_weights(tmp_path / "w").config == SMALL


# ---- hostile pickles: refused or inert, and nothing runs ------------------------------------------

def payload(fn, *args):
    class Payload:
        def __reduce__(self):
            return (fn, args)

    return Payload()


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_code_running_globals_are_refused_and_never_run(kind, state, tmp_path):
    marker = tmp_path / "ran"
    fn, args = {"os.system": (os.system, (f"touch {marker}",)),
                "builtins.eval": (eval, (f"open({str(marker)!r}, 'w').close()",)),
                "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],))}[kind]
    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save({"model": sd, "extra": payload(fn, *args)}, tmp_path / "evil.pth")
    for load in (read_pth, shvit_numpy.load, load_weights):
        with pytest.raises(ShvitError, match="no weight file needs .*refused, nothing was run") as e:
            load(tmp_path / "evil.pth")
        assert "\n" not in str(e.value)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is live: torch's unsafe loader runs it
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.02)  # Popen runs touch in the background
    assert marker.exists()


def test_unknown_globals_are_inert_and_not_imported(state, tmp_path, monkeypatch):
    """A function of an importable module (no deny-list names it): stored as data, never imported, never called."""
    marker = tmp_path / "ran"
    (tmp_path / "shvit_evil_mod.py").write_text("def run(path):\n    open(path, 'w').write('ran')\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import shvit_evil_mod

    sd = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save({"model": sd, "extra": payload(shvit_evil_mod.run, str(marker))}, tmp_path / "evil.pth")
    del sys.modules["shvit_evil_mod"]
    model = shvit_numpy.load(tmp_path / "evil.pth")  # the weights are fine: they load
    assert model.config == SMALL
    extra = Archive(tmp_path / "evil.pth").obj["extra"]
    assert isinstance(extra, Inert) and extra.global_name == "shvit_evil_mod.run" and extra.args == (str(marker),)
    assert "shvit_evil_mod" not in sys.modules and not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()  # the payload was live


def test_a_non_tensor_rebuild_in_the_state_is_an_error(tmp_path):
    torch.save({"model": {"patch_embed.0.c.weight": torch.randn(4, 4).to_sparse()}}, tmp_path / "sparse.pth")
    with pytest.raises(ShvitError, match="no tensors|cannot be read"):
        read_pth(tmp_path / "sparse.pth")


# ---- damaged and foreign files: one line ------------------------------------------------------------

def bad_files(state, tmp_path) -> dict:
    """{expected error text: a file that must cause it}."""
    authors_file(state, tmp_path / "good.pth")
    good = (tmp_path / "good.pth").read_bytes()
    files = {}

    def add(match, name, write):
        files[match] = tmp_path / name
        write(files[match])

    add("weight file not found", "missing.pth", lambda p: None)
    add("is empty", "empty.pth", lambda p: p.write_bytes(b""))
    add("truncated or damaged zip", "half.pth", lambda p: p.write_bytes(good[: len(good) // 2]))
    add("truncated or damaged zip", "tail.pth", lambda p: p.write_bytes(good[:-30]))
    add("not a torch checkpoint .torch.save writes a zip", "text.pth", lambda p: p.write_text("not a checkpoint\n" * 9))
    add("not a torch checkpoint .torch.save writes a zip", "noise.pth",
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)))
    add("legacy .non-zip. torch pickle", "legacy.pth",
        lambda p: torch.save({"model": {}}, p, _use_new_zipfile_serialization=False))
    add("0 '<name>/data.pkl' entries", "other.pth", lambda p: zipfile.ZipFile(p, "w").writestr("a.txt", "hi"))
    add("holds .* bytes, its tensors need", "short.pth",
        lambda p: rewrite(tmp_path / "good.pth", p, lambda n, d: d[:-4] if n.endswith("/data/0") else d))
    add("has no entry", "nodata.pth", lambda p: rewrite(tmp_path / "good.pth", p, lambda n, d: None if n.endswith("/data/3") else d))
    add("not a readable torch checkpoint", "badpickle.pth",
        lambda p: rewrite(tmp_path / "good.pth", p, lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d))
    add("holds no tensors", "notensors.pth", lambda p: torch.save({"model": {"a": 1}}, p))
    add("holds no SHViT weights", "foreign.pth", lambda p: torch.save({"encoder.weight": torch.zeros(3)}, p))
    add("missing tensor 'head.l.bias'", "missing_key.pth",
        lambda p: torch.save({k: torch.from_numpy(v) for k, v in state.items() if k != "head.l.bias"}, p))
    return files


def test_bad_files_raise_one_line(state, tmp_path):
    for match, path in bad_files(state, tmp_path).items():
        with pytest.raises(ShvitError, match=match) as e:
            shvit_numpy.load(path)
        assert "\n" not in str(e.value), str(e.value)
        if match not in CHECKED_AFTER_READING:  # the reader's own errors name the file
            assert str(path) in str(e.value), str(e.value)


CHECKED_AFTER_READING = ("holds no SHViT weights", "missing tensor 'head.l.bias'")


# ---- the CLIs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_pth(tmp_path_factory):
    """The bundled demo weights as the authors' .pth ({'model': ...}, their names)."""
    path = tmp_path_factory.mktemp("pth") / "demo.pth"
    authors_file(load_weights(DEMO_WEIGHTS).state, path)
    return path


def demo_answers() -> tuple[int, list[int]]:
    """The bundled weights' resolution, and the class index each bundled PNG should get (its
    name ends with its label: canvas-3-5-9.png shows 3, 5 and 9, and the largest is 9)."""
    w = load_weights(DEMO_WEIGHTS)
    return w.resolution, [w.labels.index(p.stem.split("-")[-1]) for p in sorted(DEMO_IMAGES.glob("*.png"))]


def test_numpy_cli_reads_pth_directly(demo_pth, tmp_path, capsys):
    """In this process (a bad .pth through the CLIs: tests/test_bad_input.py)."""
    from shvit_numpy import run

    images = sorted(DEMO_IMAGES.glob("*.png"))
    res, answers = demo_answers()
    assert run.main(["--save-logits", str(tmp_path / "a.npy")]) == 0  # bundled safetensors + sample images
    a = capsys.readouterr().out
    assert run.main(["--weights", str(demo_pth), "--image", *map(str, images), "--resolution", str(res),
                     "--save-logits", str(tmp_path / "b.npy")]) == 0
    b = capsys.readouterr().out
    la, lb = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    np.testing.assert_array_equal(lb, la)
    names = [[line.split(":")[0] for line in out.splitlines()] for out in (a, b)]  # the .pth has no label names
    assert names[0] == names[1] == [p.name for p in images]
    assert la.argmax(1).tolist() == answers  # the demo weights get every sample right


NO_TORCH = """
import importlib.abc, runpy, sys
attempts = []
class NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
try:
    import torch
    raise SystemExit("the torch blocker does not work")
except ImportError:
    attempts.clear()
import shvit_tiny.fast.runner  # noqa: F401  (the fast path imports without torch too)
for argv in [a.split("|") for a in sys.argv[1:]]:
    sys.argv = argv[1:]
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code
    print(f"{argv[0]} exit {code}", file=sys.stderr)
    assert code == 0, argv
assert "torch" not in sys.modules
print("torch imports attempted:", attempts, file=sys.stderr)
"""


@pytest.mark.slow  # compiles the demo model in tinygrad in a new process (the one compile is the test's point)
def test_tiny_and_numpy_clis_work_without_torch(demo_pth, tmp_path):
    """Issue 13 item 4: the bundled digits and a .pth through shvit_tiny.run (and shvit_numpy.run)
    in one process where ``import torch`` fails; one tiny config, one input shape (one compile, of
    the reference path: half the fast path's compile time; the fast path's modules are imported
    there too, and its answers are tinygrad's in tests/test_tiny.py)."""
    images = "|".join(str(p) for p in sorted(DEMO_IMAGES.glob("*.png")))
    res, answers = demo_answers()
    out = {k: tmp_path / f"{k}.npy" for k in ("tiny_demo", "tiny_pth", "numpy_pth")}
    runs = [f"shvit_tiny.run|shvit_tiny.run|--device|CPU|--no-fast|--save-logits|{out['tiny_demo']}",
            f"shvit_tiny.run|shvit_tiny.run|--device|CPU|--no-fast|--weights|{demo_pth}|--image|{images}|--resolution|{res}|--save-logits|{out['tiny_pth']}",
            f"shvit_numpy.run|shvit_numpy.run|--weights|{demo_pth}|--image|{images}|--resolution|{res}|--save-logits|{out['numpy_pth']}"]
    env = {**os.environ, "SHVIT_CACHE": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *runs], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tiny_demo, tiny_pth, numpy_pth = (np.load(out[k]) for k in ("tiny_demo", "tiny_pth", "numpy_pth"))
    np.testing.assert_array_equal(tiny_pth, tiny_demo)  # the same weights from either file
    assert tiny_pth.argmax(1).tolist() == numpy_pth.argmax(1).tolist() == answers
    np.testing.assert_allclose(tiny_pth, numpy_pth, atol=1e-4, rtol=1e-4)


def test_tiny_extra_does_not_install_torch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [req.split("=")[0].split(">")[0].split("[")[0].strip().lower() for req in
             project["dependencies"] + project["optional-dependencies"]["tiny"]]
    assert "numpy" in names and "tinygrad" in names and not any(n.startswith("torch") for n in names), names


def test_reader_is_not_torchs():
    """The reader imports numpy and the standard library only (no torch, no tinygrad's torch_load)."""
    source = (ROOT / "shvit_numpy" / "pth.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in io.StringIO(source) if line.startswith(("import ", "from "))}
    assert imports <= {"", "__future__", "collections", "io", "pickle", "zipfile", "zlib", "dataclasses", "pathlib", "numpy"}, imports
