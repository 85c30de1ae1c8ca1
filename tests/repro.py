"""Reproduce one equivalence check from the one line a failing test prints:

    python -m tests.repro --config '{"embed_dim": [8, 5, 9], ...}' --shape 1,3,17,30 --seed 7

Prints, per runtime and per block, the max difference against torch and OK / NOT OK, and
exits 1 if anything is NOT OK (llm.c's test prints NOT OK and exits 0: never that).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.names import state_shapes
from tests.helpers import TOL, compare, random_state
from tests.runtimes import block_paths, runtimes


def make_weights(cfg: SHViTConfig, seed: int, directory) -> Path:
    """A canonical file with random weights and BatchNorm statistics drawn from ``seed``."""
    model = shvit_torch.create(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in random_state(state_shapes(cfg), seed).items()}, strict=False)
    path = Path(directory) / f"w{seed}.safetensors"
    shvit_torch.save(model, path)
    return path


def make_input(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)


def command(cfg: SHViTConfig, shape, seed: int) -> str:
    return f"python -m tests.repro --config '{cfg.to_json()}' --shape {','.join(map(str, shape))} --seed {seed}"


def check(cfg: SHViTConfig, shape, seed: int, fold: bool, blocks: bool, directory) -> list[str]:
    """Run every installed runtime against torch; return the lines of failures (empty: all agree)."""
    path = make_weights(cfg, seed, directory)
    x = make_input(shape, seed)
    rts = runtimes(path, fold=fold)
    ref, failures = rts[0](x), []
    for rt in rts[1:]:
        msg = compare(f"{rt.name} logits", rt(x), ref, **TOL["float32"])
        print(f"{rt.name:6s} logits  max|diff| {np.abs(rt(x) - ref).max():.2e}  {'OK' if msg is None else 'NOT OK'}")
        failures += [msg] if msg else []
    if blocks:
        for kind, (bpath, ch, flat) in block_paths(cfg).items():
            xb = make_input((shape[0], ch) if flat else (shape[0], ch, shape[2], shape[3]), seed)
            bref = rts[0].block(bpath, xb)
            for rt in rts[1:]:
                got = rt.block(bpath, xb)
                msg = compare(f"{rt.name} {kind} ({bpath})", got, bref, **TOL["float32"])
                print(f"{rt.name:6s} {kind:22s} max|diff| {np.abs(got - bref).max():.2e}  {'OK' if msg is None else 'NOT OK'}")
                failures += [msg] if msg else []
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.repro", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="SHViTConfig as JSON")
    p.add_argument("--shape", required=True, help="B,3,H,W")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--unfolded", action="store_true", help="compare the unfolded models (default: folded)")
    args = p.parse_args(argv)
    cfg = SHViTConfig(**json.loads(args.config))
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as d:
        failures = check(cfg, shape, args.seed, fold=not args.unfolded, blocks=True, directory=d)
    for f in failures:
        print("NOT OK:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
