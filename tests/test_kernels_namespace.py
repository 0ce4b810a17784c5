"""Our kernel package and Hugging Face's `kernels` live side by side.

transformers 5.25 depends on Hugging Face's `kernels` package, whose top-level name this project's
kernel package used to have (it is `gemma_kernels` now). A top-level `kernels` module in the
repository would shadow HF's for anything run from the repository root (the tests, the examples),
and transformers would then import ours in its place.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed_kernels_init() -> Path:
    """Where pip put HF's `kernels/__init__.py` (the venv may well live inside the repository, as in CI)."""
    return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()


def test_repository_has_no_top_level_kernels_module():
    assert not (ROOT / "kernels").exists()
    assert not (ROOT / "kernels.py").exists()


@pytest.mark.parametrize("order", ["gemma_kernels first", "kernels first"])
def test_hf_kernels_and_gemma_kernels_import_side_by_side(order):
    # Asked of the installed distributions, not of `import kernels`: pytest puts tests/ on sys.path, where
    # the folder tests/kernels passes for a namespace package when HF's is not installed.
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25)")
    first, second = ("gemma_kernels", "kernels") if order == "gemma_kernels first" else ("kernels", "gemma_kernels")
    # A fresh interpreter started in the repository root, whose sys.path begins with the root as the
    # tests' and the examples' does, so an import that the root shadows would show here.
    code = (
        f"import {first}, {second}, json, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "print(json.dumps({'kernels': kernels.__file__, 'gemma_kernels': gemma_kernels.__file__,\n"
        "                  'available': is_kernels_available(), 'get_kernel': hasattr(kernels, 'get_kernel')}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["gemma_kernels"]).resolve().is_relative_to(ROOT / "gemma_kernels")
    assert Path(seen["kernels"]).resolve() == _installed_kernels_init()
    assert seen["get_kernel"]  # HF's API, not a stand-in
    # transformers finds the package it depends on (in the version range it declares).
    assert seen["available"] is True


def test_kernels_in_the_test_process_is_hf_s():
    """Under pytest, with tests/ and tests/kernels on sys.path, `kernels` is still HF's package."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25)")
    import kernels

    assert kernels.__file__ is not None  # a regular package, not the tests/kernels namespace
    assert Path(kernels.__file__).resolve() == _installed_kernels_init()
    assert hasattr(kernels, "get_kernel")
