"""make bench's time-to-first-answer measurement (benchmarks/first_answer.py), on a tiny model
and the NumPy CLI only (~2 s: three short new processes); its floors and targets
(benchmarks/report.py) on synthetic results, and that its default plan times every floor's
cell (benchmarks/bench.py, nothing run)."""
import os

import numpy as np
import pytest

import shvit_numpy
from benchmarks import bench, first_answer, report
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


# -- floors and targets on synthetic results (nothing timed) ----------------------------------------------------

MACHINE = {"cpu": "Test CPU 9000", "cpu_flags": ["avx2"], "cores": 2, "virtual_machine": False, "memory_gib": 8.0,
           "os": "Linux", "python": "3.11", "libraries": {"numpy": "2"}, "numpy_blas": None}


def speed_row(runtime, variant, batch, threads, images_per_s):
    """A bench speed row whose median throughput is ``images_per_s`` (min and max 10% either side)."""
    s = batch / images_per_s
    return {"runtime": runtime, "variant": variant, "resolution": 256 if variant == "s4" else 224, "batch": batch,
            "threads": threads, "device": "cpu", "seconds": {"median": s, "min": 0.9 * s, "max": 1.1 * s}}


def synthetic(cores, rows, skipped=()):
    return {"machine": {**MACHINE, "cores": cores}, "speed": rows, "skipped": list(skipped)}


def by_cell(floors):
    """{(name, variant, batch, threads): entry}: a floor's name alone repeats across variants."""
    return {(f["name"], f["variant"], f["batch"], f["threads"]): f for f in floors}


TINY_ORT = "shvit_tiny CPU (JIT) ÷ ONNX Runtime (same folded weights)"
TINY_ORT_B1 = "shvit_tiny CPU (JIT) ÷ ONNX Runtime, batch 1 (inverse latency)"
TINY_ORT_ALL = "shvit_tiny CPU (JIT) ÷ ONNX Runtime, all cores"
SCALING = "shvit_tiny CPU (JIT) on all cores ÷ on one core"


def issue_22_rows(cores):
    """tiny ÷ ORT: S1 1.0, S2 0.9, S3 1.2, S4 no ORT row; batch 1: 1.25; all cores 170 / 200; tiny 1.7x on all cores."""
    rows = [speed_row("tiny-cpu", "s1", 16, 1, 100), speed_row("ort", "s1", 16, 1, 100),
            speed_row("tiny-cpu", "s2", 16, 1, 90), speed_row("ort", "s2", 16, 1, 100),
            speed_row("tiny-cpu", "s3", 16, 1, 120), speed_row("ort", "s3", 16, 1, 100),
            speed_row("tiny-cpu", "s4", 16, 1, 50),
            speed_row("tiny-cpu", "s1", 1, 1, 125), speed_row("ort", "s1", 1, 1, 100)]
    if cores > 1:
        rows += [speed_row("tiny-cpu", "s1", 16, cores, 170), speed_row("ort", "s1", 16, cores, 200)]
    return rows


def test_issue_22_floors_pass_fail_and_skip_each_at_its_own_cell():
    no_export = {"runtime": "ort", "where": "1 thread, s4", "reason": "no ONNX export"}
    floors = by_cell(report.check_floors(synthetic(2, issue_22_rows(2), [no_export])))
    got = {k: (f["status"], f["value"] and round(f["value"], 6), f.get("goal_met")) for k, f in floors.items()}
    assert got[(TINY_ORT, "s1", 16, 1)] == ("PASS", 1.0, False)  # 0.95 <= 1.0 < 1.1
    assert got[(TINY_ORT, "s2", 16, 1)] == ("FAIL", 0.9, False)
    assert got[(TINY_ORT, "s3", 16, 1)] == ("PASS", 1.2, True)
    assert got[(TINY_ORT, "s4", 16, 1)] == ("SKIP", None, None)
    assert floors[(TINY_ORT, "s4", 16, 1)]["reason"] == "ort: no ONNX export"  # the run's note for that cell
    assert got[(TINY_ORT_B1, "s1", 1, 1)] == ("PASS", 1.25, False)  # 1.0 <= 1.25 < 1.3
    assert got[(TINY_ORT_ALL, "s1", 16, 2)] == ("FAIL", 0.85, False)  # 170 / 200 on 2 cores, not 170 / 100 on one
    assert got[(SCALING, "s1", 16, 2)] == ("PASS", 1.7, False)  # 170 on 2 cores / 100 on one: 1.6 <= 1.7 < 1.9
    assert floors[(SCALING, "s1", 16, 2)]["denominator_threads"] == 1
    # issue 15's tiny / ORT floors are replaced (no "best shvit runtime" left), its others kept, SKIP without their runtimes
    assert not any("best shvit" in name for name, *_ in floors)
    folded = floors[("shvit_tiny CPU (JIT) ÷ shvit_torch folded", "s1", 16, 1)]
    assert folded["status"] == "SKIP" and folded["reason"] == "torch-folded: not measured in this run (see --quick, --runtimes)"


def test_issue_22_floor_values_are_the_issues():
    got = sorted((f.name, f.variant, f.batch, f.threads, f.kind, f.floor, f.goal) for f in report.FLOORS if f.issue == 22)
    assert got == sorted([*((TINY_ORT, v, 16, "one", "runtimes", 0.95, 1.1) for v in ("s1", "s2", "s3", "s4")),
                          (TINY_ORT_B1, "s1", 1, "one", "runtimes", 1.0, 1.3),
                          (TINY_ORT_ALL, "s1", 16, "all", "runtimes", 0.9, 1.2),
                          (SCALING, "s1", 16, "all", "threads", 1.6, 1.9)])
    with pytest.raises(ValueError, match="compares one runtime"):  # a threads floor needs one runtime on all cores
        report.Floor("x", ("tiny-cpu",), "ort", 1.0, 1.0, 22, threads="all", kind="threads")


def test_scaling_floor_skips_on_a_one_core_machine():
    floors = by_cell(report.check_floors(synthetic(1, issue_22_rows(1))))
    scaling = floors[(SCALING, "s1", 16, 1)]
    assert scaling["status"] == "SKIP" and "one-core machine" in scaling["reason"]
    # all cores is the one core there: the same cell as the one-core ratio
    assert floors[(TINY_ORT_ALL, "s1", 16, 1)]["value"] == floors[(TINY_ORT, "s1", 16, 1)]["value"] == 1.0


def test_quick_run_checks_the_s1_batch_16_one_core_floors_and_skips_the_rest():
    rows = [speed_row(k, "s1", 16, 1, ips) for k, ips in
            (("tiny-cpu", 100), ("ort", 90), ("torch-folded", 80), ("torch-traced", 70), ("timm", 60), ("numpy", 50))]
    floors = report.check_floors(synthetic(2, rows))
    for f in floors:
        if (f["variant"], f["batch"], f["threads"], f["kind"]) == ("s1", 16, 1, "runtimes"):
            assert f["status"] in ("PASS", "FAIL"), f["name"]
        else:
            assert f["status"] == "SKIP" and "not measured in this run" in f["reason"], f["name"]
    checked = {(f["name"], f["status"]) for f in floors if f["status"] != "SKIP"}
    assert (TINY_ORT, "PASS") in checked and ("shvit_numpy ÷ shvit_torch folded", "PASS") in checked  # 1.11; 0.625
    assert ("shvit_torch fast path (optimize()) ÷ timm folded and traced", "PASS") in checked  # 70 / 60


def test_first_answer_targets_are_issue_22s():
    assert {(t.runtime, t.state): (t.ceiling, t.goal) for t in report.TARGETS if t.runtime == "tiny-cpu"} == {
        ("tiny-cpu", "warm"): (1.5, 1.0), ("tiny-cpu", "cold"): (15.0, 10.0)}

    def status(warm, cold):
        fa = {"rows": [{"runtime": "tiny-cpu", "cold_s": cold, "warm_s": {"median": warm, "min": warm, "max": warm}}]}
        return {(t["runtime"], t["state"]): (t["status"], t.get("goal_met")) for t in report.check_targets({"first_answer": fa})}

    assert status(1.4, 14.0)[("tiny-cpu", "warm")] == ("PASS", False)
    assert status(1.6, 16.0)[("tiny-cpu", "warm")] == ("FAIL", False)
    assert status(0.9, 9.0)[("tiny-cpu", "cold")] == ("PASS", True)
    assert status(0.9, 16.0)[("tiny-cpu", "cold")] == ("FAIL", False)
    assert "| shvit_tiny CPU, warm caches | 1.40 | 1.5 | 1 | PASS, above goal |" in report.targets_table(
        report.check_targets({"first_answer": {"rows": [{"runtime": "tiny-cpu", "cold_s": 9.0, "warm_s": {"median": 1.4}}]}}))


def test_markdown_floors_table_names_each_cell_and_the_machine():
    result = {**synthetic(2, issue_22_rows(2)), "mode": "default", "started": "2025-01-01T00:00:00",
              "settings": {"rounds": 5, "warmup": 2, "min_round_s": 0.25}, "memory": []}
    result["floors"] = report.check_floors(result)
    text = report.markdown(result)
    heading = next(line for line in text.splitlines() if line.startswith("#### Speed floors"))
    assert "Test CPU 9000" in heading and "2 cores" in heading
    assert f"Machine: {report.one_line(result['machine'])}." in text.split(heading)[1]
    assert f"| {TINY_ORT} | S2 at 224, batch 16, 1 core | 0.90 | 0.95 | 1.10 | FAIL, below goal |" in text
    assert f"| {TINY_ORT} | S4 at 256, batch 16, 1 core | — | 0.95 | 1.10 | SKIP: ort: not measured" in text
    assert f"| {TINY_ORT_B1} | S1 at 224, batch 1, 1 core | 1.25 |" in text
    assert f"| {TINY_ORT_ALL} | S1 at 224, batch 16, 2 cores | 0.85 |" in text
    assert f"| {SCALING} | S1 at 224, batch 16, 2 cores ÷ 1 core | 1.70 | 1.60 | 1.90 | PASS, below goal |" in text


@pytest.mark.parametrize("cores", [1, 2, 4])
def test_default_and_full_plans_time_every_floors_cell_and_quick_the_s1_batch_16_one_core_ones(monkeypatch, cores):
    monkeypatch.setattr(bench.machine, "usable_cpus", lambda: list(range(cores)))

    def needed(f):
        num, den = f.cells(cores)
        return {(k, *num) for k in f.numerator} | {(f.denominator, *den)}

    for argv in ([], ["--full"]):
        timed = bench.timed_cells(bench.plan(bench.make_parser().parse_args(argv)))
        for f in report.FLOORS:
            assert needed(f) <= timed, (argv, f.name, f.variant, f.batch, f.threads, sorted(needed(f) - timed))
    timed = bench.timed_cells(bench.plan(bench.make_parser().parse_args(["--quick"])))
    covered = {(f.name, f.variant, f.batch, f.threads) for f in report.FLOORS if needed(f) <= timed}
    assert covered == {(f.name, f.variant, f.batch, f.threads) for f in report.FLOORS
                       if set(f.cells(cores)) == {("s1", 16, 1)}}  # on one core, "all" is that cell too
    assert len(covered) == (7 if cores == 1 else 5)
