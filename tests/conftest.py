"""Hypothesis profiles, registered once for the whole suite.

* ``ci`` (hypothesis loads it by itself when ``CI`` is set; also the default here):
  derandomized, few examples, no deadline: fits ``make test``'s 10-minute budget.
* ``thorough`` (``make test-thorough``): many more examples, for humans with time.
Select one with ``HYPOTHESIS_PROFILE=name``.
"""
import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", settings.get_profile("ci"), max_examples=8, derandomize=True, **_common)
settings.register_profile("dev", max_examples=8, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
# tests.plant_bugs: find a failure, report it, skip shrinking (each shrink step recompiles tinygrad kernels)
settings.register_profile("plant", max_examples=8, derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate], **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# The compiled-model cache (shvit_tiny/fast/cache.py) stays off: every test compiles as a fresh machine
# would and nothing is written to the user's ~/.cache; tests/test_cache.py turns it on in a temp folder.
os.environ["SHVIT_CACHE"] = "0"

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the CLIs the tests start
    os.environ.setdefault("NUM_CPU_THREADS", "1")  # tinygrad's CPU kernels unsplit (tests/test_tiny.py splits some)
    import torch

    torch.set_num_threads(1)
