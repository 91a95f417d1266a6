"""``python -m fastconformer.kernels [--arches 80 90] [--jobs N] [--all] [--summary]``: the compile
matrix (:mod:`fastconformer.kernels.compile_matrix`), every kernel variant the launchers launch for
the real workloads, built ahead of time for sm_80 and sm_90 (no GPU needed)."""

from .compile_matrix import main

main()
