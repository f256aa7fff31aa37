"""One table for the GPU check (`nox -s gpu`): the CUDA tests, then B1/B2/B5 on the GPU.

Usage::

    python -m benchmarks.gpu_report runs/gpu/tests.xml runs/gpu/bench.json

The first file is pytest's JUnit XML of ``pytest -m cuda``, the second the ``--json``
rows of ``python -m benchmarks.run_all``. Exits 1 when a test failed or a benchmark
row is FAILED, so the nox session fails too.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks._common import Row, fmt


def test_rows(junit: Path) -> list[tuple[str, str, str, str]]:
    """(kind, name, result, note) per test case of a JUnit XML report."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        result, note = "passed", f"{float(case.get('time', 0)):.2f} s"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                result = "skipped" if tag == "skipped" else "FAILED"
                note = (found.get("message") or "").splitlines()[0][:100] if (
                    found.get("message")) else tag
        rows.append(("test", name, result, note))
    return rows


def bench_rows(path: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for data in json.loads(path.read_text()):
        r = Row(**data)
        lo, med, hi = r.stats
        ok = "" if r.passed is None else ("ok" if r.passed else "missed")
        result = "FAILED" if r.name == "FAILED" else f"{fmt(lo)} / {fmt(med)} / {fmt(hi)} {r.unit}"
        note = "; ".join(x for x in (f"target {r.target} {ok}" if r.target else "", r.note) if x)
        rows.append((r.bench, r.name, result, note))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    junit, bench = Path(args[0]), Path(args[1])
    rows = test_rows(junit) if junit.exists() else [("test", "pytest -m cuda", "FAILED",
                                                      "no report written")]
    rows += bench_rows(bench) if bench.exists() else [("bench", "B1/B2/B5", "FAILED",
                                                       "no rows written")]
    print("| kind | what | result (min / median / max) | note |")
    print("|---|---|---|---|")
    for kind, name, result, note in rows:
        print(f"| {kind} | {name} | {result} | {note} |")
    return 1 if any(r[2] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
