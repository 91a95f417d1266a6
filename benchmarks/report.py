"""Run the benchmark suite, save its JSON under benchmarks/results/ named by device, and regenerate
the README's performance table from every saved result.

    python -m benchmarks.report --run            # run the suite here, save, update README
    python -m benchmarks.report                  # only regenerate the README table
    python -m benchmarks.report --run -- -k model  # extra pytest arguments after --
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from benchmarks.conftest import DEVICE
from fastconformer.environment import device_slug

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- performance-table:start -->", "<!-- performance-table:end -->"


def run_suite(extra: list[str]) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{device_slug(DEVICE)}.json"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-enable",
           f"--benchmark-json={path}", "-q", "-p", "no:cacheprovider", *extra]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return path


MEMORY_KEYS = (("step_memory_bytes", "step peak"), ("saved_activation_bytes", "saved activations"))


def _memory(info: dict) -> str:
    """The memory a benchmark recorded (a training step's), e.g. '1.75 GB saved activations', else ''."""
    for key, label in MEMORY_KEYS:
        if key in info:
            return f"{info[key] / 1e9:.2f} GB {label}"
    return ""


def table(path: pathlib.Path) -> str:
    """Markdown for one saved run: per group, each impl's median, speed vs the reference and, for
    training steps, the memory the step needs."""
    data = json.loads(path.read_text())
    benches = data["benchmarks"]
    first = benches[0]["extra_info"] if benches else {}
    machine = data.get("machine_info", {})
    lines = [f"**{first.get('device', path.stem)}** (torch {first.get('torch', '?')}, "
             f"Python {machine.get('python_version', '?')}, saved {data.get('datetime', '?')[:10]}, "
             f"`{path.relative_to(ROOT)}`)", "",
             "| benchmark | impl | median | vs reference | memory |", "|---|---|---:|---:|---:|"]
    groups: dict[str, list[dict]] = {}
    for bench in benches:
        groups.setdefault(bench["group"], []).append(bench)
    for group, rows in groups.items():
        ref = next((r["stats"]["median"] for r in rows if r["extra_info"].get("impl") == "reference"), None)
        for r in rows:
            median = r["stats"]["median"]
            ratio = f"{ref / median:.2f}x" if ref else "n/a"
            lines.append(f"| {group} | {r['extra_info'].get('impl', r['name'])} | {median * 1e3:.2f} ms | {ratio} "
                         f"| {_memory(r['extra_info'])} |")
    return "\n".join(lines)


def update_readme() -> None:
    files = sorted(RESULTS.glob("*.json"))
    body = "\n\n".join(table(p) for p in files) if files else "_No saved benchmark results yet._"
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{body}\n{END}{tail}")
    print(f"README.md performance table regenerated from {len(files)} result file(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the benchmark suite first and save its JSON")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    if args.run:
        print(f"saved {run_suite(args.pytest_args)}")
    update_readme()


if __name__ == "__main__":
    main()
