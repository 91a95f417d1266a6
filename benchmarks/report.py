"""Run the benchmark suite, save its JSON under benchmarks/results/ named by device, and regenerate
the README's performance table from every saved result, and its engines table from every
``fastconformer bench --engines --json`` run saved under benchmarks/results/engines/.

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
from fastconformer.timing import per_round_speedup

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
START, END = "<!-- performance-table:start -->", "<!-- performance-table:end -->"
ENGINES_START, ENGINES_END = "<!-- engines-table:start -->", "<!-- engines-table:end -->"


def run_suite(extra: list[str]) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{device_slug(DEVICE)}.json"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-enable", "-n0",
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


def engines_table(path: pathlib.Path) -> str:
    """Markdown for one saved ``bench --engines`` run: each row's precision, median, speed vs the
    eager reference in fp32 (ratio of medians, and median of the per-round ratios), logits error and
    top-1 agreement vs float64, and the conditions it ran under."""
    data = json.loads(path.read_text())
    load = data["load_average"]
    versions = ", ".join(f"{package} {version}" for package, version in data["versions"].items())
    environment = ", ".join(f"`{k}={v}`" for k, v in data.get("environment", {}).items()) or "default environment"
    malloc = data.get("malloc", "process defaults")  # runs saved before --keep-freed-memory existed
    lines = [f"**{data['device']}**, {data['model']}, batch {data['batch_size']}, {data['image_size']}x"
             f"{data['image_size']}, {data['rounds']} interleaved rounds (torch {data['torch']}, {versions}; load "
             f"average {load['before']:.2f} before, {load['after']:.2f} after; {environment}; malloc: {malloc}; "
             f"`{path.relative_to(ROOT)}`)", "",
             "| impl | precision | median | vs eager reference fp32 | same, per round | spread "
             "| logits rel. error vs float64 | top-1 agreement with float64 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    reference = next(r["seconds"] for r in data["results"] if r["impl"] == "reference")
    for r in data["results"]:
        agreement = f"{r['top1_agreement']:.1%}" if "top1_agreement" in r else "-"
        lines.append(f"| {r['impl']} | {r['precision']} | {r['seconds_per_batch'] * 1e3:.1f} ms | {r['speedup']:.2f}x "
                     f"| {per_round_speedup(reference, r['seconds']):.2f}x | {r['spread']:.1%} "
                     f"| {r['rel_error_vs_float64']:.1e} | {agreement} |")
    lines += [f"\nSkipped: {what}: {why}." for what, why in data["skipped"].items()]
    lines += [f"\nWarning: {warning}" for warning in data["warnings"]]
    return "\n".join(lines)


def _replace_between(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_readme() -> None:
    files = sorted(RESULTS.glob("*.json"))
    body = "\n\n".join(table(p) for p in files) if files else "_No saved benchmark results yet._"
    # runs in the default environment first, then those under allocator or thread settings
    def settings(path: pathlib.Path) -> bool:
        data = json.loads(path.read_text())
        return bool(data.get("environment")) or data.get("malloc", "process defaults") != "process defaults"

    engine_files = sorted((RESULTS / "engines").glob("*.json"), key=lambda p: (settings(p), p.name))
    engines = ("\n\n".join(engines_table(p) for p in engine_files) if engine_files
               else "_No saved `bench --engines` run yet._")
    text = _replace_between(README.read_text(), START, END, body)
    README.write_text(_replace_between(text, ENGINES_START, ENGINES_END, engines))
    print(f"README.md tables regenerated from {len(files)} result file(s) and {len(engine_files)} engines run(s)")


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
