"""One results table for ``benchmarks/device_all.sh``.

Each benchmark run by the script calls :func:`record` for its headline figures; when the environment
variable ``DEVICE_RESULTS`` names a file, the figure is appended to it as one JSON line (nothing is
written otherwise, so the benchmarks behave as before when run alone). ``python
benchmarks/device_results.py FILE`` prints the lines as one Markdown table, in the order recorded.
"""

from __future__ import annotations

import json
import os
import sys


def record(section: str, case: str, value: float | None, unit: str, *, baseline: float | None = None,
           baseline_name: str = "", target: str = "", note: str = "") -> None:
    """Append one figure (and, if any, the baseline measured beside it in the same run)."""
    path = os.environ.get("DEVICE_RESULTS")
    if not path:
        return
    row = dict(section=section, case=case, value=value, unit=unit, baseline=baseline, baseline_name=baseline_name,
               target=target, note=note)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def table(lines: list[dict]) -> str:
    out = ["| section | case | ours | baseline | ratio | target | note |", "|---|---|---|---|---|---|---|"]
    for r in lines:
        ratio = f"{r['value'] / r['baseline']:.2f}x" if r["value"] and r["baseline"] else "-"
        baseline = f"{_fmt(r['baseline'])} ({r['baseline_name']})" if r["baseline"] is not None else "-"
        out.append(f"| {r['section']} | {r['case']} | {_fmt(r['value'])} {r['unit']} | {baseline} | {ratio} | "
                   f"{r['target'] or '-'} | {r['note'] or ''} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/device_results.py RESULTS.jsonl", file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        lines = []
    print(table(lines) if lines else "(no figures were recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
