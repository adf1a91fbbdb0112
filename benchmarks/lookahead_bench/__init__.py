"""The Lookahead benchmark, one job per module (run it with ``python benchmarks/bench_lookahead.py``).

- ``config``: shared constants (alpha, k, lr, paths) and the full / quick run settings.
- ``harness``: timing: interleaved rounds, self-timing loops (CPU clock or CUDA events), paired
  ratios, quartiles.
- ``contenders``: the operations timed: our sync and swap, the peers' and the fused alternatives,
  all on one shared parameter set.
- ``sync``: the sync-and-swap grid suite (parameter count x tensor count, every contender).
- ``training``: the training-overhead suite (Lightning fits with and without the callback).
- ``memory``: the peak / persistent memory suite (fresh subprocess, resident-set readings).
- ``cuda``: the sync-and-swap grid on a CUDA device, float32 and bfloat16, timed with CUDA events.
- ``tables``: the grid's Markdown tables and goal lines (CPU and GPU sections alike).
- ``report``: machine description, ``results*.json`` and ``RESULTS*.md`` (sections, verdicts, prose).
- ``plot``: ``docs/bench_sync.png``.
"""
