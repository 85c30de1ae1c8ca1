# shvit: two commands on a fresh machine:  make demo   and   make test
# (both install first if needed: the system packages tinygrad's CPU and OpenCL devices need,
# clang and PoCL, through scripts/system-packages.sh, then the pinned Python packages in .venv).
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PYTHONHASHSEED := 0

.PHONY: install system render-check test test-fast test-thorough docs docs-test lint demo demo-weights train-numpy bench experiments figures clean

install: system $(STAMP)

system:  ## clang and PoCL for tinygrad's CPU and OpenCL devices: apt-get when missing, or the command to run
	@bash scripts/system-packages.sh

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps timm==1.0.31  # the peer model; its torchvision would pull CUDA torch
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: install  ## everything: unit, equivalence (hypothesis 'ci' profile), CLI, docs
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

test-fast: install  ## every runtime, no compile-heavy or multi-process test (marked slow), stop at the first failure
	$(PY) -m pytest -q -x -n 2 --dist loadgroup tests -m "not slow"

test-thorough: install  ## many more hypothesis examples, for humans with time
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q -n 2 --dist loadgroup tests

docs: install  ## run every page's code blocks; write their output and the included source into the pages
	$(PY) -m docs.render

docs-test: install  ## run every python code block of docs/*.md and README.md
	$(PY) -m pytest -q tests/test_docs.py

lint: install
	$(PY) -m ruff check shvit_numpy shvit_torch shvit_tiny tests benchmarks

demo: install  ## the main job: train on digits, evaluate in all three runtimes
	$(PY) -m shvit_torch.demo --out runs/demo

demo-weights: install  ## remake the bundled demo weights and sample images
	$(PY) -m shvit_torch.demo --out runs/demo-weights --bundle

train-numpy: install  ## the demo's task trained in nothing but NumPy: hand-written backward pass, AdamW (docs/09)
	$(PY) -m shvit_numpy.train --out runs/numpy

render-check: install  ## S1 at 224 lowered to Metal, CUDA, OpenCL and WGSL source (no GPU needed, ~30 s)
	$(PY) -m shvit_tiny.render --variant s1
	$(PY) -m shvit_tiny.render --variant s1 --half

bench: install  ## latest.{json,md} and docs/bench.png, then docs/throughput.png from the same latest.json
	$(PY) -m benchmarks.bench
	$(PY) -m docs.figures throughput

experiments: install  ## the paper's three claims at laptop scale: results in benchmarks/results/experiments/, docs/claims-*.png
	$(PY) -m shvit_torch.experiments all --jobs 2

figures: install
	$(PY) -m docs.figures

clean:
	rm -rf runs .pytest_cache .hypothesis
