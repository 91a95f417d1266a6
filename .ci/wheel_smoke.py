"""Wheel smoke test: build the wheel, install it alone in a fresh venv, use it from outside the checkout.

Editable installs read the checkout, so they hide a package or data file that the wheel leaves out.
This script:
  1. creates a fresh venv in a temporary folder, copies the checkout's files (tracked and untracked,
     not git-ignored) there, so that a stale build/ folder cannot add files to the wheel, and
     builds the wheel from the copy with the venv's pip (``pip wheel --no-deps``);
  2. checks the wheel's contents: every file under fastconformer/ and kernels/ (installed as
     fastconformer/kernels/) is in it, and nothing else is at its top level (no ``kernels``,
     ``tests`` or ``benchmarks``);
  3. installs torch==2.13.0 and the wheel into the venv in one pip command;
  4. from a folder outside the checkout, runs .ci/wheel_check.py (imports, package data, fast model
     against the float64 reference) and ``fastconformer info`` in that venv.

Usage: python3 .ci/wheel_smoke.py   (standard library only; needs git and Python >= 3.10 with venv).
Exits 0 and prints "wheel smoke: passed" as its last line, or exits 1 with "wheel smoke: FAILED: ...".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
# Source folder -> its place in the wheel.
PACKAGE_TREES = {"fastconformer": "fastconformer", "kernels": "fastconformer/kernels"}


class SmokeFailure(Exception):
    """A check failed; the message says which and why."""


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    """Run ``cmd`` and print its output; on a non-zero exit raise SmokeFailure with the command and
    the last line of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.rstrip()
    if output:
        print(output, flush=True)
    if proc.returncode != 0:
        last_line = output.splitlines()[-1] if output else "no output"
        raise SmokeFailure(f"`{' '.join(cmd)}` exited {proc.returncode}: {last_line}")


def copy_checkout(dest: Path) -> None:
    """Copy the checkout's tracked and untracked, not git-ignored files to ``dest``."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             check=True, stdout=subprocess.PIPE).stdout.decode()
    for rel in filter(None, listing.split("\0")):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the work tree is listed but absent
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def check_wheel_contents(wheel: Path, source: Path) -> None:
    """Every file of the package trees is in the wheel at its installed path; the wheel's top level
    holds only fastconformer and its .dist-info."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{installed}/{path.relative_to(source / tree).as_posix()}"
        for tree, installed in PACKAGE_TREES.items()
        for path in (source / tree).rglob("*") if path.is_file()
    }
    missing = sorted(expected - names)
    if missing:
        raise SmokeFailure(f"{wheel.name} lacks {len(missing)} file(s) of the checkout: {', '.join(missing)}; "
                           "a package folder needs an __init__.py (setup.py discovers packages) and a data file "
                           "an entry in pyproject.toml [tool.setuptools.package-data]")
    top_level = {name.split("/", 1)[0] for name in names}
    unexpected = sorted(t for t in top_level if t != "fastconformer" and not t.endswith(".dist-info"))
    if unexpected:
        raise SmokeFailure(f"{wheel.name} installs {', '.join(unexpected)} at the top level of site-packages; "
                           "expected only the fastconformer package (kernels/ belongs at fastconformer/kernels)")
    print(f"wheel contents: {len(expected)} files of fastconformer/ and kernels/ present, top level "
          f"{sorted(top_level)}")


def smoke(work: Path) -> None:
    """Build, inspect, install and exercise the wheel inside the folder ``work``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    source, dist, venv, outside = work / "src", work / "dist", work / "venv", work / "outside"
    outside.mkdir()

    start = time.perf_counter()
    run([sys.executable, "-m", "venv", str(venv)], work, env)
    python = venv / "bin" / "python"
    copy_checkout(source)
    run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)], work, env)
    wheels = sorted(dist.glob("fastconformer-*.whl"))
    if len(wheels) != 1:
        raise SmokeFailure(f"expected one fastconformer wheel in {dist}, found {[w.name for w in wheels]}")
    wheel = wheels[0]
    check_wheel_contents(wheel, source)
    print(f"built {wheel.name} in a fresh venv ({time.perf_counter() - start:.0f} s)")

    start = time.perf_counter()
    run([str(python), "-m", "pip", "install", "-q", TORCH, str(wheel)], work, env)
    print(f"installed {TORCH} and the wheel in it ({time.perf_counter() - start:.0f} s)")

    start = time.perf_counter()
    # -I: neither the script's folder nor the current folder nor PYTHON* variables reach sys.path.
    run([str(python), "-I", str(REPO / ".ci" / "wheel_check.py"), str(REPO)], outside, env)
    run([str(venv / "bin" / "fastconformer"), "info"], outside, env)
    print(f"checks in the venv ({time.perf_counter() - start:.0f} s)")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fastconformer-wheel-") as tmp:
        try:
            smoke(Path(tmp))
        except SmokeFailure as failure:
            sys.stdout.flush()
            print(f"wheel smoke: FAILED: {failure}", file=sys.stderr)
            return 1
    print("wheel smoke: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
