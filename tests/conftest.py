"""Shared test set-up. Triton kernels run under its interpreter when no CUDA device is present; the
variable is read when triton is imported, so it is set here, before any test module imports it.
Fixtures used by several test packages live here too."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_recurrent_gemma(tmp_path_factory):
    """A tiny random RecurrentGemma checkpoint directory (config.json, model.safetensors) with a small
    Gemma-style tokenizer.json, for the paths a user takes: the CLI, the grounding backends, LangChain.
    Every norm and bias is random; small tied embeddings keep a random model from repeating one token."""
    import json

    from safetensors.torch import save_file

    from models.loading import init_random_weights
    from models.recurrent_gemma import RecurrentGemmaConfig, RecurrentGemmaLM
    from models.tokenizer import CONTROL, NORMAL, UNKNOWN, tokenizer_from_vocabulary

    directory = tmp_path_factory.mktemp("tiny_recurrent_gemma")
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
    normal = list("\u2581abcdefghijklmnopqrstuvwxyz.,?\n") + ["\u2581t", "he", "\u2581the"]
    tokenizer_from_vocabulary([p for p, _ in specials] + normal, [t for _, t in specials] + [NORMAL] * len(normal),
                              bos_id=2).save(str(directory / "tokenizer.json"))
    config = RecurrentGemmaConfig(vocab_size=len(specials) + len(normal), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=2, lru_width=48, attention_window_size=6,
                                  max_position_embeddings=4096)
    model = init_random_weights(RecurrentGemmaLM(config), seed=0, std=0.15)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("recurrent_param", "bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.model.embed_tokens.weight.normal_(0.0, 0.05, generator=gen)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    return directory
