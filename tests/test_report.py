"""``python -m benchmarks.report``: the README's engines tables are the saved ``bench --engines``
runs, rendered as the report renders them (a run saved without README regeneration, or a README
edited by hand, fails here)."""

import json

from benchmarks import report


def test_readme_engines_tables_are_the_saved_runs():
    readme = report.README.read_text()
    runs = sorted((report.RESULTS / "engines").glob("*.json"))
    assert runs
    for path in runs:
        table = report.engines_table(path)
        assert table in readme, f"{path.name}: run `python -m benchmarks.report` to regenerate the README"
        malloc = json.loads(path.read_text()).get("malloc", "process defaults")
        assert f"; malloc: {malloc}; " in table.splitlines()[0]
