"""``benchmarks/device_all.sh --dry-run`` runs every step of the GPU measurement script on the CPU
(Triton interpreter, tiny shapes), so the one-command GPU run is known to work before a GPU is lent.

Slow for a test (14 s on the quiet 2-core machine: four Python processes importing torch, interpreted
kernels); under a load of 6-8 it took 60-90 s, hence the long timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_dry_run_runs_every_step_and_prints_one_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env.pop("DEVICE_RESULTS", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_all.sh"), "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=380)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "device_results.jsonl").read_text().splitlines()]
    steps = {r["case"]: r["note"] for r in rows if r["section"] == "step"}
    assert steps == {name: "ok" for name in ("kernel-tests", "bench-attention", "bench-maxsim-gpu", "bench-colpali")}, steps
    sections = {r["section"] for r in rows}
    assert {"prefill Gemma 2 softcap+window hd256", "prefill causal hd128", "prefill prefix-LM hd256 softcap",
            "decode split-K hd256", "MaxSim kernel", "ColPali page embedding"} <= sections
    assert "CHECK FAILED" not in sections  # the interpreted kernels agree with their references
    table = (tmp_path / "device_results.md").read_text()
    assert table.startswith("| section | case | ours |") and table.count("\n") == len(rows) + 2  # header, rule, a line per figure
    assert table in result.stdout
