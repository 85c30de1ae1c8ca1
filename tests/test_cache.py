"""shvit_tiny's compiled-model cache (shvit_tiny/fast/cache.py): a capture saved by one process is
loaded by the next without lowering anything, bit for bit the same answer; every damaged,
foreign or mismatched entry is reported in one line and rebuilt; an untrusted folder is not
used; the switches turn it off; concurrent writers leave one good file; the size stays bounded.

One small model and input keep compiling cheap; the tests run in one xdist worker (one process:
tinygrad's in-memory caches make the rebuilds after the first compile fast).
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tinygrad import dtypes

import shvit_tiny
from shvit_numpy.config import SHViTConfig
from shvit_tiny import fast
from shvit_tiny import run as tiny_run
from shvit_tiny.fast import cache
from tests.helpers import random_model_file

pytestmark = pytest.mark.xdist_group("cache")  # one process: the rebuilds after the first compile reuse its kernels

TINY = SHViTConfig(embed_dim=(16, 24, 32), partial_dim=(4, 8, 8), depth=(1, 1, 1), num_classes=5)
X = np.random.default_rng(5).standard_normal((1, 3, 40, 36)).astype(np.float32)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "tiny.safetensors"
    random_model_file(TINY, 31, path)
    return path


@pytest.fixture(scope="module")
def reference(weights):
    return shvit_tiny.load(weights, device="CPU", cache=False)(X)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """The cache switched on, in a folder of this test's own."""
    monkeypatch.setenv("SHVIT_CACHE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fast._SAID.clear()
    return tmp_path / "xdg" / "shvit"


def entries(d):
    return sorted(d.glob("*.jit")) if d.is_dir() else []


def run_once(weights, **kw):
    """A freshly loaded model's first answer, and whether its capture came from the cache."""
    model = shvit_tiny.load(weights, device="CPU", **kw)
    y = model(X)
    (jit,) = model.runner.jits.values()
    return y, jit.fxn is None  # a loaded capture has no Python function behind it


def test_first_run_saves_and_the_next_loads_it(weights, reference, cache_home):
    y, loaded = run_once(weights)
    assert not loaded
    np.testing.assert_array_equal(y, reference)
    (entry,) = entries(cache_home)
    assert oct(cache_home.stat().st_mode & 0o777) == "0o700" and oct(entry.stat().st_mode & 0o777) == "0o600"
    assert not list(cache_home.glob("*.tmp")), "a temporary file was left behind"
    y2, loaded = run_once(weights)
    assert loaded, "the second load compiled again instead of using the saved capture"
    np.testing.assert_array_equal(y2, reference)


@pytest.mark.slow
def test_a_loaded_capture_answers_from_its_flat_replay_and_is_saved_lean(weights, reference, cache_home, monkeypatch):
    """A capture loaded from the cache answers its first numpy call through replay.py's flat calls
    (no TinyJit call first), bit for bit; the entry's programs kept their binaries, launch info
    and parameters but not the graphs they were lowered through (cache.lean), while the process
    that captured keeps its own whole."""
    from tinygrad.uop.ops import Ops

    from shvit_tiny.fast.replay import CpuReplay
    from shvit_tiny.fast.runner import Runner

    def programs(jit):
        return {c.src[0] for c in jit.captured._linear.src if c.src[0].op is Ops.PROGRAM}

    model = shvit_tiny.load(weights, device="CPU")
    model(X)
    (mine,) = model.runner.jits.values()
    lowered = [p for p in programs(mine) if p.src[0].src]  # tinygrad's own kernels (csource.py's C has no graph)
    assert mine.fxn is not None and len(lowered) > 10, "the capturing process lost its graphs"
    (entry,) = entries(cache_home)
    header = json.loads(entry.read_bytes()[len(cache.MAGIC):].partition(b"\n")[0])
    saved = programs(cache.fetch(header["parts"]))
    assert len(saved) == len(programs(mine)) > 10
    for p in saved:
        assert not p.src[0].src and {u.op for u in p.src[1].src} == {Ops.PARAM} and p.src[3].op is Ops.BINARY, p.arg.name
    loaded = shvit_tiny.load(weights, device="CPU")
    loaded.runner = Runner(loaded)  # as its first call makes it
    def no_tinyjit(t):
        raise AssertionError("a loaded capture's first call went through TinyJit")
    monkeypatch.setattr(loaded.runner, "jitted", no_tinyjit)
    y = loaded(X)
    jit = loaded.runner.jits[(X.shape, dtypes.float32, "CPU")]
    assert jit.fxn is None and isinstance(loaded.runner.replays[X.shape], CpuReplay)
    np.testing.assert_array_equal(y, reference)
    x2 = np.random.default_rng(6).standard_normal(X.shape).astype(np.float32)
    np.testing.assert_array_equal(loaded(x2), model(x2), err_msg="a new input: the loaded replay differs from the capture")


@pytest.mark.slow
def test_a_new_process_answers_without_lowering(weights, reference, cache_home, tmp_path):
    """...and right although that process already holds other tinygrad buffers (tinygrad numbers
    buffers per process: a loaded capture must not take over the live ones with its numbers)."""
    run_once(weights)  # fill the cache
    script = textwrap.dedent(f"""
        import numpy as np, tinygrad.engine.jit as jit
        import shvit_tiny
        x = np.load({str(tmp_path / 'x.npy')!r})
        other = shvit_tiny.load({str(weights)!r}, device="CPU", half=True, cache=False)
        before = other(x, jit=False)  # this process's own buffers, numbered from 0 as the saver's were
        def refuse(*a, **k): raise SystemExit("tinygrad lowered a graph: the cache was not used")
        jit.jit_lower = refuse  # capture-time lowering: a cache hit never gets there
        m = shvit_tiny.load({str(weights)!r}, device="CPU")
        np.save({str(tmp_path / 'y.npy')!r}, m(x))
        (j,) = m.runner.jits.values(); assert j.fxn is None
        assert np.array_equal(other(x, jit=False), before), "loading the capture changed another model's answer"
    """)
    np.save(tmp_path / "x.npy", X)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": os.getcwd()},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), reference)


def damage_truncate(data):
    return data[: len(data) // 2]


def damage_flip(data):
    b = bytearray(data)
    b[-1000] ^= 0xFF
    return bytes(b)


def damage_garbage(data):
    return b"\x00\x01 not a cache entry" * 100


def damage_version(data):
    line, _, payload = data[len(cache.MAGIC):].partition(b"\n")
    header = json.loads(line)
    header["format"] = 999
    return cache.MAGIC + json.dumps(header).encode() + b"\n" + payload


def damage_payload(data, marker):
    """A valid header and checksum around a pickle that would run a shell command."""
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    line, _, _ = data[len(cache.MAGIC):].partition(b"\n")
    return cache.encode(json.loads(line)["parts"], pickle.dumps(Evil()))


@pytest.mark.slow
@pytest.mark.parametrize("damage, says", [
    (damage_truncate, "truncated"), (damage_flip, "checksum differs"), (damage_garbage, "not a shvit cache entry"),
    (damage_version, "another version"), (damage_payload, "UnpicklingError"),
])
def test_a_damaged_entry_is_reported_and_rebuilt(weights, reference, cache_home, capsys, tmp_path, damage, says):
    run_once(weights)
    (entry,) = entries(cache_home)
    marker = tmp_path / "payload-ran"
    data = entry.read_bytes()
    entry.write_bytes(damage(data, marker) if damage is damage_payload else damage(data))
    capsys.readouterr()
    y, loaded = run_once(weights)
    err = capsys.readouterr().err.strip().splitlines()
    assert not loaded and len(err) == 1 and says in err[0] and entry.name in err[0], err
    np.testing.assert_array_equal(y, reference)
    assert not marker.exists(), "the damaged entry's pickle ran code"
    assert run_once(weights)[1], "the rebuilt entry was not used by the next load"


@pytest.mark.slow
def test_an_entry_for_another_key_is_not_used(weights, reference, cache_home, capsys):
    """An entry copied under another key's name (another input shape) is refused, not run on X."""
    model = shvit_tiny.load(weights, device="CPU")
    model(X[:, :, :32, :32])  # saves the capture for 32 x 32
    (other,) = entries(cache_home)
    parts = model.runner.cache_parts(X.shape, dtypes.float32)
    other.rename(cache.entry_path(cache_home, cache.key_of(parts)))
    capsys.readouterr()
    y, loaded = run_once(weights)
    err = capsys.readouterr().err
    assert not loaded and "made for another model, input or setup" in err
    np.testing.assert_array_equal(y, reference)


@pytest.mark.slow
def test_an_untrusted_folder_is_not_used(weights, reference, cache_home, capsys):
    run_once(weights)
    os.chmod(cache_home, 0o777)
    capsys.readouterr()
    y, loaded = run_once(weights)
    err = capsys.readouterr().err.strip().splitlines()
    assert not loaded and len(err) == 1 and "group/world writable" in err[0], err
    np.testing.assert_array_equal(y, reference)
    os.chmod(cache_home, 0o700)
    (entry,) = entries(cache_home)
    os.chmod(entry, 0o666)
    fast._SAID.clear()
    assert not run_once(weights)[1]
    assert "file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_a_folder_of_another_user_is_not_used(weights, cache_home, capsys):
    run_once(weights)
    os.chown(cache_home, 65534, 65534)  # nobody
    capsys.readouterr()
    assert not run_once(weights)[1]
    assert "belongs to another user" in capsys.readouterr().err


@pytest.mark.slow
def test_switches_turn_it_off(weights, cache_home, monkeypatch, tmp_path):
    run_once(weights, cache=False)
    assert entries(cache_home) == []
    monkeypatch.setenv("SHVIT_CACHE", "0")
    run_once(weights)
    assert entries(cache_home) == []
    monkeypatch.setenv("SHVIT_CACHE", "1")
    np.save(tmp_path / "x.npy", X)
    assert tiny_run.main(["--weights", str(weights), "--input", str(tmp_path / "x.npy"), "--device", "CPU", "--no-cache"]) == 0
    assert entries(cache_home) == []
    assert tiny_run.main(["--weights", str(weights), "--input", str(tmp_path / "x.npy"), "--device", "CPU"]) == 0
    assert len(entries(cache_home)) == 1


def test_the_key_names_everything_that_changes_the_kernels(weights):
    base = dict(weights_id="w", shape=(1, 3, 40, 36), dtype="float", device="CPU", cores=2)
    key = cache.key_of(cache.key_parts(**base))
    for change in (dict(weights_id="v"), dict(shape=(2, 3, 40, 36)), dict(dtype="half"), dict(device="CL"), dict(cores=1)):
        assert cache.key_of(cache.key_parts(**(base | change))) != key, change
    from tinygrad import Context

    for setting in (dict(BEAM=2), dict(NOOPT=1)):
        with Context(**setting):
            assert cache.key_of(cache.key_parts(**base)) != key, setting
    a = shvit_tiny.model.weights_digest(weights, fold=True, half=False)
    assert a != shvit_tiny.model.weights_digest(weights, fold=True, half=True) != shvit_tiny.model.weights_digest(weights, False, True)


@pytest.mark.slow
def test_a_change_to_any_source_that_shapes_a_capture_rebuilds_it(weights, reference, cache_home, tmp_path, monkeypatch):
    """The key covers shvit_tiny's sources AND shvit_numpy's (which reads and folds the weights a
    capture holds) and the package version: here shvit_numpy's BatchNorm folding is changed in a
    copy of the sources, and the saved capture is not answered from again."""
    assert not run_once(weights)[1] and run_once(weights)[1]  # saved, then reused
    roots = tuple(Path(shutil.copytree(r, tmp_path / "src" / r.name)) for r in cache.SOURCES)
    layers = roots[0] / "layers.py"
    text = layers.read_text()
    assert "scale = self.weight / np.sqrt(" in text
    layers.write_text(text.replace("scale = self.weight / np.sqrt(", "scale = 2 * self.weight / np.sqrt("))
    assert cache.source_digest(roots) != cache.source_digest(cache.SOURCES)
    monkeypatch.setattr(cache, "SOURCES", roots)
    y, loaded = run_once(weights)
    assert not loaded, "a capture made by other folding code was reused"
    np.testing.assert_array_equal(y, reference)
    monkeypatch.setattr(cache, "package_version", lambda: "9.9.9")
    assert cache.source_digest.__wrapped__(roots) != cache.source_digest(roots)  # the version counts too


@pytest.mark.slow
@pytest.mark.xdist_group("cache-processes")  # its own processes: it can run beside the cache group
def test_two_processes_filling_one_key_leave_one_good_file(weights, reference, cache_home, tmp_path):
    np.save(tmp_path / "x.npy", X)
    cmd = [sys.executable, "-m", "shvit_tiny.run", "--weights", str(weights), "--input", str(tmp_path / "x.npy"), "--device", "CPU",
           "--save-logits"]
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen(cmd + [str(tmp_path / f"y{i}.npy")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert len(entries(cache_home)) == 1 and not list(cache_home.glob("*.tmp"))
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"y{i}.npy"), reference)
    y, loaded = run_once(weights)
    assert loaded
    np.testing.assert_array_equal(y, reference)


def test_the_oldest_entries_go_first(tmp_path):
    for i, size in enumerate((300, 200, 100, 50)):
        p = tmp_path / f"{i}.jit"
        p.write_bytes(b"x" * size)
        os.utime(p, (1000 + i, 1000 + i))
    gone = cache.evict(tmp_path, limit=200)
    assert sorted(p.name for p in gone) == ["0.jit", "1.jit"]
    assert sorted(p.name for p in tmp_path.glob("*.jit")) == ["2.jit", "3.jit"]
    assert cache.evict(tmp_path, limit=0) == [tmp_path / "2.jit"]  # the newest stays, however small the bound
