"""`gemma-ground generate` on a tiny RecurrentGemma checkpoint directory (config.json, safetensors,
tokenizer.json; the ``tiny_recurrent_gemma`` fixture of tests/conftest.py), against greedy decoding by its
definition (full forward, argmax, no state)."""

from __future__ import annotations

import pytest
from test_cli import greedy_by_definition

from models import load_model, load_tokenizer
from models.cli import main


@pytest.mark.parametrize("chat", [False, True])
def test_generate_streams_the_greedy_continuation(tiny_recurrent_gemma, capsys, chat):
    model, tokenizer = load_model(tiny_recurrent_gemma), load_tokenizer(tiny_recurrent_gemma)
    prompt = "the cat sat on the"  # longer than the attention window
    args = ["generate", "--model", str(tiny_recurrent_gemma), "--max-new-tokens", "12", prompt]
    assert main(args + (["--chat"] if chat else [])) == 0
    text = prompt if not chat else tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    expected = greedy_by_definition(model, tokenizer, text, 12)
    assert len(set(expected)) > 3
    assert capsys.readouterr().out == expected + "\n"


def test_bad_input_is_a_clear_error(tiny_recurrent_gemma, capsys):
    assert main(["generate", "--model", str(tiny_recurrent_gemma), "--max-new-tokens", "5000", "the cat"]) == 2
    assert "exceeds the model's context of 4096 tokens" in capsys.readouterr().err
