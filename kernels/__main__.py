"""``python -m fastconformer.kernels [--arches 80 90] [--jobs N]``: compile every registered kernel
config ahead of time (no GPU needed) and print the reports as JSON."""

import argparse
import dataclasses
import json

from . import compile_matrix

parser = argparse.ArgumentParser(prog="python -m fastconformer.kernels", description=__doc__)
parser.add_argument("--arches", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
args = parser.parse_args()
reports = compile_matrix(tuple(args.arches), jobs=args.jobs)
print(json.dumps([dataclasses.asdict(r) for r in reports.values()]))
