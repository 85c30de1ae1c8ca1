"""``make bench``: SHViT's three runtimes and their peers, timed side by side.

* ``benchmarks.bench``   the command: plans the runs, starts one worker process per thread
  setting and per memory measurement, writes JSON, Markdown and the chart, checks the floors.
* ``benchmarks.worker``  one process: sets its thread limits before numpy is imported, then
  times every runtime in interleaved rounds (or measures one runtime's peak memory).
* ``benchmarks.runners`` the runtimes behind one interface (load a weight file, time a batch).
* ``benchmarks.first_answer`` time to first answer: a new process per run, caches empty and warm.
* ``benchmarks.report``  Markdown tables, the speed floors, the PNG chart.
* ``benchmarks.machine`` what the figures were measured on.
* ``benchmarks.profile_ops`` where the time goes: torch.profiler and ONNX Runtime's profiler (``--numpy``:
  shvit_numpy by kind of operation).

Nothing here imports numpy at module level except the worker, which sets its thread
environment first (OpenBLAS reads it once, when numpy is imported).
"""
