"""``python -m fastconformer.kernels [--arches 80 90] [--jobs N] [--sample | --all | --specs FILE] [--list]
[--summary]``: the compile matrix (:mod:`fastconformer.kernels.compile_matrix`), the kernel variants
the launchers launch for the real workloads (one per launch config and layout; ``--sample``: one per kernel and
pointer dtypes, as the test suite; ``--all``: every specialisation), built ahead of time for sm_80
and sm_90 (no GPU needed). ``--list`` prints the specs as JSON instead; ``--specs FILE`` builds the
specs of such a list (say, the ones a change touched, under another triton).

``python -m fastconformer.kernels --model [--workload W ...] [--no-build]``: the performance model
(:mod:`fastconformer.kernels.perf_model`) of those launches on an H100."""

import sys

if "--model" in sys.argv[1:]:
    from .perf_model import main
else:
    from .compile_matrix import main

main()
