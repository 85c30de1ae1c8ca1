"""make bench's time-to-first-answer measurement (benchmarks/first_answer.py), on a tiny model
and the NumPy CLI only (~2 s: three short new processes)."""
import os

import numpy as np
import pytest

import shvit_numpy
from benchmarks import first_answer
from shvit_numpy.config import SHViTConfig
from shvit_numpy.names import state_shapes
from shvit_numpy.weights import save_weights
from tests.helpers import assert_close, random_state

TINY = SHViTConfig(embed_dim=(16, 24, 32), partial_dim=(4, 8, 8), depth=(1, 1, 1), num_classes=5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("first-answer")
    save_weights(d / "tiny.safetensors", TINY, random_state(state_shapes(TINY), seed=3))
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32))
    return d / "tiny.safetensors", d / "x.npy"


def test_measure_times_new_processes_cold_and_warm_and_keeps_their_answer(files):
    weights, x = files
    cpu = sorted(os.sched_getaffinity(0))[0] if hasattr(os, "sched_getaffinity") else None
    out = first_answer.measure(["numpy", "ort"], weights, x, None, dict(os.environ), cpu, warm_runs=2, log=lambda m: None)
    (row,) = out["rows"]  # ONNX Runtime had no export to load: skipped with the reason, not a crash
    assert row["runtime"] == "numpy" and row["cold_s"] > 0
    assert len(row["warm_s"]["samples"]) == 2 and 0 < row["warm_s"]["min"] <= row["warm_s"]["median"] <= row["warm_s"]["max"]
    assert row["max_abs_diff_vs_numpy"] == 0.0  # the reference is its own answer
    assert [(s["runtime"], s["reason"]) for s in out["skipped"]] == [("ort", "no ONNX export of this model")]


def test_time_first_answer_writes_the_logits_a_new_process_computes(files, tmp_path):
    weights, x = files
    logits = tmp_path / "y.npy"
    env = first_answer.cache_env(dict(os.environ), tmp_path)
    secs = first_answer.time_first_answer(first_answer.command("numpy", weights, x, logits), env, logits)
    assert secs > 0
    assert_close("first answer", np.load(logits), shvit_numpy.load(weights)(np.load(x)), atol=1e-5, rtol=1e-5)
    with pytest.raises(first_answer.NoAnswer, match="missing.safetensors"):  # the CLI's own one-line error
        first_answer.time_first_answer(first_answer.command("numpy", tmp_path / "missing.safetensors", x, logits), env, logits)
    assert not logits.exists()  # a stale file from an earlier run never counts as an answer
