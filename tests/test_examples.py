"""Every example runs as a user would run it (a subprocess, no arguments: sample PDFs, tiny random models, the
embedded statistics store) and prints what it promises. Numbers are checked against the gapminder CSV and the
text the sample PDFs were written with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gapminder_truth import gapminder

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import sample_data  # noqa: E402

TITLES = {(name, number + 1): title for name, pages in sample_data.SAMPLE_PAGES.items()
          for number, (title, _lines, _colour) in enumerate(pages)}




def run_example(name: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    env.pop("DC_API_KEY", None)  # the examples must work offline
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env=env)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_ask_statistics():
    out = run_example("ask_statistics.py")
    assert f"{gapminder('Kenya', 2007, 'lifeExp'):.2f} years" in out
    assert "=== Data Commons NL client" in out and "=== RIG: grounding" in out


HIT = re.compile(r"^\s+(\d)\.\s+(-?\d+\.\d+) \((-?\d\.\d+)\)\s+(\S+) p\.(\d+)\s+page_id=\d+\s+'(.*)'$")


def test_search_scans_default_and_with_paths(tmp_path):
    out = run_example("search_scans.py")
    assert "5 pages in the index (2 files added, 0 unchanged)" in out
    blocks = out.split("query: ")[1:]
    assert len(blocks) == 2
    for block in blocks:
        hits = [HIT.match(line) for line in block.splitlines()[1:4]]
        assert all(hits), block
        scores = [float(h.group(2)) for h in hits]
        assert scores == sorted(scores, reverse=True)
        for h in hits:  # each hit names a real page and prints that page's first text line
            assert TITLES[(h.group(4), int(h.group(5)))] == h.group(6)
    assert re.search(r"^only \S+\.pdf: p\.\d", out, re.M)
    # With real paths: a folder of PDFs, a checkpoint directory, a persistent index; a second run adds nothing.
    pdfs = sample_data.write_sample_pdfs(tmp_path / "scans")
    checkpoint = sample_data.write_tiny_colpali(tmp_path / "colpali", seed=5)
    args = ["--pdfs", str(pdfs[0].parent), "--colpali", str(checkpoint), "--index", str(tmp_path / "index"),
            "-k", "2", "invoice"]
    assert "5 pages in the index (2 files added, 0 unchanged)" in run_example("search_scans.py", *args)
    again = run_example("search_scans.py", *args)
    assert "5 pages in the index (0 files added, 2 unchanged)" in again
    assert (tmp_path / "index" / "embedder.json").is_file()


def test_answer_from_pages():
    out = run_example("answer_from_pages.py")
    assert out.startswith("question: What is the total due on the invoice?")
    pages = re.findall(r"^\d\. (\S+) p\.(\d+) \(score -?\d+\.\d+\)\n   page text: '(.*)'\n   PaliGemma: '(.+)'$", out, re.M)
    assert len(pages) == 2
    for document, number, first_line, reply in pages:
        assert TITLES[(document, int(number))] == first_line and reply.strip()


def test_langchain_chain():
    out = run_example("langchain_chain.py")
    assert len(re.findall(r"^  retrieved \S+\.pdf p\.\d \(score", out, re.M)) == 2
    usage = re.search(r"usage: \{'input_tokens': (\d+), 'output_tokens': (\d+), 'total_tokens': (\d+)\}", out)
    assert usage and int(usage.group(2)) == 40 and int(usage.group(1)) + 40 == int(usage.group(3))
    assert re.search(r"^answer: '.+'$", out, re.M) and re.search(r"^streamed: .+$", out, re.M)
    assert f"Japan was {gapminder('Japan', 2007, 'lifeExp'):g} years in 2007, according to Gapminder [Table 1]" in out


def test_guarded_chain():
    """Threshold 0 flags everything (nothing looked up, the chat model never runs), 1 flags nothing."""
    strict = run_example("guarded_chain.py", "--threshold", "0")
    assert re.search(r"^guard: Dangerous Content 0\.\d{3}, Harassment 0\.\d{3}, Hate Speech 0\.\d{3}, "
                     r"Sexually Explicit Information 0\.\d{3} \(threshold 0: flagged\)$", strict, re.M)
    refusal = "Refused: the safety guard (tiny-shieldgemma) flagged this question for "
    assert f"1. guard | retriever: refused: {refusal}" in strict
    assert f"2. guarded(prompt | chat model): refused (prompt): {refusal}" in strict and "retrieved" not in strict
    lenient = run_example("guarded_chain.py", "--threshold", "1")
    assert "(threshold 1: passed)" in lenient and "Refused" not in lenient
    assert "1. guard | retriever: retrieved 'Life expectancy in Kenya' (Gapminder)" in lenient
    assert re.search(r"^2\. guarded\(prompt \| chat model\): answer: '.+'$", lenient, re.M)


NOT_HERE = {"sample_data.py": "a helper module of the examples, not an example",
            "demo.py": "`make demo` runs it (it loads the real Gemma 3 270M)"}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in NOT_HERE))
def test_every_example_is_run_here(name):
    assert any(test.startswith(f"test_{name.removesuffix('.py')}") for test in globals()), \
        f"examples/{name} has no test in tests/test_examples.py"
