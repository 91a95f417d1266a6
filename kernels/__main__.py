"""``python -m fastconformer.kernels [--arches 80 90] [--jobs N] [--all]``: compile every registered
kernel config ahead of time (no GPU needed) and print the reports as JSON; ``--all`` adds the extra
specialisations the test suite leaves out (e.g. unaligned twins of aligned launches)."""

import argparse
import dataclasses
import json

from . import compile_matrix

parser = argparse.ArgumentParser(prog="python -m fastconformer.kernels", description=__doc__)
parser.add_argument("--arches", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
parser.add_argument("--all", action="store_true", help="also the specialisations the test suite leaves out")
args = parser.parse_args()
reports = compile_matrix(tuple(args.arches), jobs=args.jobs, include_all=args.all)
print(json.dumps([dataclasses.asdict(r) for r in reports.values()]))
