"""`gemma-ground generate` end to end on a tiny checkpoint directory (config.json, safetensors,
tokenizer.json) against greedy decoding computed by its definition (full forward, argmax, no cache)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.cli import main
from models.config import GemmaConfig
from models.gemma import GemmaLM
from models.loading import init_random_weights
from models.tokenizer import CONTROL, NORMAL, UNKNOWN, load_tokenizer, tokenizer_from_vocabulary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
    normal = list("\u2581abcdefghijklmnopqrstuvwxyz.,?\n") + ["\u2581t", "he", "\u2581the"]
    pieces = [p for p, _ in specials] + normal
    types = [t for _, t in specials] + [NORMAL] * len(normal)
    directory = tmp_path_factory.mktemp("tiny_gemma_cli")
    tokenizer_from_vocabulary(pieces, types, bos_id=2).save(str(directory / "tokenizer.json"))
    config = GemmaConfig(architecture="gemma3", vocab_size=len(pieces), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=64, query_pre_attn_scalar=32, sliding_window=8)
    model = init_random_weights(GemmaLM(config), seed=3, std=0.05).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms too: a missing `1 + w` must show
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    return directory, model, load_tokenizer(directory)


def greedy_by_definition(model, tokenizer, text, n):
    ids = tokenizer.encode(text)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token in tokenizer.stop_token_ids:
                break
            out.append(token)
    return tokenizer.decode(out)


@pytest.mark.parametrize("chat", [False, True])
def test_generate_streams_the_greedy_continuation(checkpoint, capsys, chat):
    directory, model, tokenizer = checkpoint
    prompt = "the cat"
    args = ["generate", "--model", str(directory), "--max-new-tokens", "10", prompt] + (["--chat"] if chat else [])
    assert main(args) == 0
    text = prompt if not chat else tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    expected = greedy_by_definition(model, tokenizer, text, 10)
    assert expected  # the tiny model does write something
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("extra", [["--quantize", "int8"], ["--quantize", "int8", "--compile"]])
def test_quantised_and_compiled_generation_from_the_shell(checkpoint, capsys, monkeypatch, extra):
    """The flags reach the library: the output is the library's own int8 generation (whose agreement
    with fp32 is tested in test_quantize.py, and compiled against eager in test_compile_decode.py)."""
    import models
    from models import generate_ids, load_model
    from models.quantize import Int8Linear

    loaded, compiled = [], []

    def recording_load(*args, **kwargs):
        loaded.append((kwargs, load_model(*args, **kwargs)))
        return loaded[-1][1]

    def recording_compile(self, enabled=True):
        compiled.append(self)
        return original_compile(self, enabled)

    original_compile = GemmaLM.compile_decode
    monkeypatch.setattr(models, "load_model", recording_load, raising=False)
    monkeypatch.setattr(GemmaLM, "compile_decode", recording_compile)
    directory, _, tokenizer = checkpoint
    assert main(["generate", "--model", str(directory), "--max-new-tokens", "10", *extra, "the cat"]) == 0
    (kwargs, model), = loaded
    assert kwargs["quantize"] == "int8" and any(isinstance(m, Int8Linear) for m in model.modules())
    assert compiled == ([model] if "--compile" in extra else [])
    quantised = load_model(directory, quantize="int8")
    ids = generate_ids(quantised, [tokenizer.encode("the cat")], max_new_tokens=10,
                       stop_token_ids=tokenizer.stop_token_ids)[0]
    ids = [t for t in ids if t not in tokenizer.stop_token_ids]
    assert capsys.readouterr().out == tokenizer.decode(ids) + "\n"


def test_bad_input_is_a_clear_error_not_a_traceback(checkpoint, capsys):
    directory, _, _ = checkpoint
    assert main(["generate", "--model", str(directory), ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "--model", str(directory), "--max-new-tokens", "100", "the cat"]) == 2
    assert "exceeds the model's context of 64 tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(directory / "nope"), "hi"]) == 2
    assert "neither a checkpoint directory" in capsys.readouterr().err
