"""shvit_tiny on GPU backends this machine does not have.

* Emulated: tinygrad's PYTHON device with a Metal or CUDA target (``--device PYTHON::METAL``,
  ``PYTHON::sm_80``) lowers every kernel as it would for that GPU (its local sizes, its GPU code
  paths) and runs the result in an interpreter. Checked against torch in eval mode on random
  weights and random BatchNorm statistics, through the CLI, each in its own process (tinygrad
  opens a device once per process, with one target).
* Rendered: the NULL device turns the model into Metal, CUDA, OpenCL and WGSL source
  (shvit_tiny/render.py; ``make render-check`` does S1 at 224).

Small model, small input: the emulator interprets every operation in Python (~15 s a run).
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_tiny.devices import resolve_device
from tests.helpers import TOL, assert_close, random_model_file

# every block type, a distillation head; 48 x 40 gives stage maps of 3x3, 2x2 and 1x1 tokens
TINY = SHViTConfig(embed_dim=(16, 24, 32), partial_dim=(4, 8, 8), depth=(1, 1, 1), num_classes=5, distillation=True)
X = np.random.default_rng(7).standard_normal((1, 3, 48, 40)).astype(np.float32)  # one image: the emulator interprets every op
ENV = os.environ | {"PYTHONPATH": os.getcwd(), "SHVIT_CACHE": "0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("emulated")
    model = random_model_file(TINY, 41, d / "tiny.safetensors")
    np.save(d / "x.npy", X)
    with torch.no_grad():
        ref = model(torch.from_numpy(X)).numpy()
    return d, ref


@pytest.mark.slow
@pytest.mark.parametrize("device, gpu", [
    pytest.param("PYTHON::METAL", "METAL", marks=pytest.mark.xdist_group("emulated-metal")),
    pytest.param("PYTHON::sm_80", "CUDA", marks=pytest.mark.xdist_group("emulated-cuda")),
])
@pytest.mark.parametrize("half", [False, pytest.param(True, marks=pytest.mark.skipif(
    sys.version_info < (3, 12), reason="tinygrad's PYTHON emulator has no float16 before Python 3.12 (PythonRenderer.supported_dtypes)"))])
def test_emulated_gpu_matches_torch(files, device, gpu, half):
    d, ref = files
    out = d / f"{gpu}-{half}.npy"
    script = textwrap.dedent(f"""
        import sys
        from tinygrad import Device
        from shvit_tiny import run
        args = ["--weights", {str(d / 'tiny.safetensors')!r}, "--input", {str(d / 'x.npy')!r}, "--device", {device!r},
                "--save-logits", {str(out)!r}] + (["--half"] if {half} else [])
        assert run.main(args) == 0
        target = Device["PYTHON"].renderer.target
        assert target.device == {gpu!r}, f"lowered for {{target}}, not {gpu}"
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_close(f"{device} logits{' (float16)' if half else ''}", np.load(out), ref, **TOL["float16" if half else "float32"])


@pytest.mark.slow
@pytest.mark.xdist_group("rendered")
def test_renders_for_every_gpu_backend():
    """Each backend's own source (its kernel syntax), float32 and float16, no op or dtype missing."""
    script = textwrap.dedent(f"""
        from shvit_numpy.config import SHViTConfig
        from shvit_tiny import render
        cfg = SHViTConfig(**{TINY.__dict__!r})
        render.stub_compilers()
        for half in (False, True):  # float16 on the GPUs that run it (make render-check: all four, S1)
            model = render.null_model(cfg, half)
            for backend in render.RENDERERS if not half else ("METAL", "CUDA"):
                r = render.render(model, (1, 3, 48, 40), backend)
                print(backend, r.dtype, r.kernels, "|".join(r.sources).replace(chr(10), " "))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln.split(" ", 3) for ln in r.stdout.splitlines()]
    want = [(b, "float") for b in ("METAL", "CUDA", "CL", "WEBGPU")] + [("METAL", "half"), ("CUDA", "half")]
    assert [(b, t) for b, t, _, _ in lines] == want
    syntax = {"METAL": "kernel void", "CUDA": 'extern "C" __global__', "CL": "__kernel void", "WEBGPU": "@compute"}
    for backend, dtype, kernels, source in lines:
        assert int(kernels) > 10, (backend, dtype, kernels)
        assert syntax[backend] in source, f"{backend} {dtype}: no {syntax[backend]!r} in the rendered source"
        if dtype == "half" and backend in ("METAL", "CUDA"):
            assert "half" in source, f"{backend}: float16 model rendered without half"


def test_device_strings_are_parsed_or_refused_in_one_line():
    with pytest.raises(ShvitError, match="bad device 'CPU:A:B:C'.*expected DEVICE"):
        resolve_device("CPU:A:B:C")
    with pytest.raises(ShvitError, match="unknown device 'TPU::X'"):
        resolve_device("TPU::X")
    assert resolve_device("cpu") == "CPU"
