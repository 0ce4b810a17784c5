"""Gemma 1/2/3 decoders against transformers on tiny random configs (every parameter randomised).

Tolerances: fp32 logits within 1e-4 absolute (logits are of order 1-10; both sides do the same fp32
math in a different order, so differences are ~1e-6). bf16: our error against the fp32 reference
must be no worse than twice transformers' own bf16 error against the same reference (+1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from models import CheckpointError, GemmaConfig, GemmaLM, generate_ids, load_model
from models.generate import GenerationError, sample_next

VOCAB = 97

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def hf_config(arch: str, kv_heads: int = 2):
    kw = dict(BASE, num_key_value_heads=kv_heads)
    if arch == "gemma":
        cfg = transformers.GemmaConfig(**kw, hidden_activation="gelu_pytorch_tanh")
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(**kw, sliding_window=5, query_pre_attn_scalar=24,
                                        attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
    else:
        cfg = transformers.Gemma3TextConfig(
            **kw, sliding_window=5, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}})
    cfg._attn_implementation = "eager"
    return cfg


HF_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norm weights included (zeros would hide a missing `1 + w`)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if "norm" in name else 0.15
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_model(arch: str, kv_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[arch])(hf_config(arch, kv_heads)).eval()
    randomise(model, seed)
    return model


@pytest.fixture(scope="module", params=[("gemma", 2), ("gemma", 1), ("gemma2", 2), ("gemma3", 2), ("gemma3", 1)],
                ids=["gemma1-gqa", "gemma1-mqa", "gemma2-gqa", "gemma3-gqa", "gemma3-mqa"])
def pair(request, tmp_path_factory):
    arch, kv = request.param
    ref = hf_model(arch, kv)
    directory = tmp_path_factory.mktemp(f"{arch}-{kv}")
    ref.save_pretrained(directory)
    ours = load_model(directory)
    return ref, ours


def test_logits_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, 17, VOCAB)
    assert expected.abs().max() > 1.0  # logits of a meaningful scale
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_identically(tmp_path):
    ref = hf_model("gemma3", 2, seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_model(tmp_path)
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_config_reads_sliding_layers_and_rope(pair):
    ref, ours = pair
    c = ours.config
    assert c.layer_types == list(getattr(ref.config, "layer_types", None) or ["full_attention"] * 4)
    if c.architecture == "gemma3":
        assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling_factor) == (50000.0, 300.0, 4.0)
        assert c.layer_types == ["sliding_attention", "full_attention"] * 2


def test_incremental_decoding_equals_full_forward_past_the_window(pair):
    _, ours = pair
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, 32)
        steps = [ours(ids[:, :3], input_pos=0)]  # prefill a chunk, then one token at a time
        for t in range(3, 14):
            steps.append(ours(ids[:, t:t + 1], input_pos=t))
        ours.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_cached_results_do_not_depend_on_an_earlier_calls_cache_size(pair):
    """The same cached forward gives the same bits after a call that left a larger cache behind (the
    cache is reused while large enough; the key length read must depend on the positions only)."""
    _, ours = pair
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours.clear_cache()
        ours.setup_cache(1, 12)
        fresh = ours(ids, input_pos=0)
        ours.clear_cache()
        ours.setup_cache(1, 300)  # a longer call before
        ours(torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(8)), input_pos=0)
        ours.setup_cache(1, 12)  # keeps the larger cache
        assert ours.cache_len >= 300
        after = ours(ids, input_pos=0)
        ours.clear_cache()
    assert torch.equal(fresh, after)


def test_per_row_positions_decode_like_single_rows(pair):
    """Right-padded rows of different lengths decoding at their own positions."""
    _, ours = pair
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, VOCAB, (1, 11), generator=gen), torch.randint(3, VOCAB, (1, 6), generator=gen)
    with torch.no_grad():
        ours.setup_cache(2, 24)
        padded = torch.zeros(2, 11, dtype=torch.long)
        padded[0], padded[1, :6] = a[0], b[0]
        ours(padded, input_pos=0)
        nxt = torch.randint(3, VOCAB, (2, 1), generator=gen)
        step = ours(nxt, input_pos=torch.tensor([11, 6]))
        ours.clear_cache()
        alone_a = ours(torch.cat([a, nxt[:1]], dim=1))[:, -1]
        alone_b = ours(torch.cat([b, nxt[1:]], dim=1))[:, -1]
    torch.testing.assert_close(step[0, -1], alone_a[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[1, -1], alone_b[0], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(pair):
    ref, ours = pair
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    got = generate_ids(ours, prompt, max_new_tokens=32, stop_token_ids=[])[0]
    assert len(got) == 32
    assert got == expected


def test_batched_generation_equals_one_by_one(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 2, 12)]
    batched = generate_ids(ours, prompts, max_new_tokens=10, stop_token_ids=[])
    single = [generate_ids(ours, [p], max_new_tokens=10, stop_token_ids=[])[0] for p in prompts]
    assert batched == single


def test_bf16_within_stated_tolerance():
    ref = hf_model("gemma2", 2, seed=11)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = ref(ids).logits
        ref_bf16_err = (ref.to(torch.bfloat16)(ids).logits.float() - exact).abs().max().item()
        ref.float()
        ours = GemmaLM(GemmaConfig.from_hf({**ref.config.to_dict(), "architectures": ["Gemma2ForCausalLM"]}))
        ours.load_state_dict(ref.state_dict(), strict=False)
        ours_err = (ours.to(torch.bfloat16)(ids).float() - exact).abs().max().item()
    assert ours_err <= 2 * ref_bf16_err + 1e-2, (ours_err, ref_bf16_err)


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    draws = [sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(s))
             for s in range(30)]
    top3 = torch.topk(logits, 3).indices
    for d in draws:
        assert all(d[i] in top3[i] for i in range(3))
    again = sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(again, draws[4])
    nucleus = sample_next(logits, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nucleus, logits.argmax(-1))  # a vanishing nucleus keeps only the top token


# -- bad input -------------------------------------------------------------------------------------
def _saved(tmp_path, arch="gemma2"):
    ref = hf_model(arch, 2, seed=1)
    ref.save_pretrained(tmp_path)
    return tmp_path


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model(d)


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    d = _saved(tmp_path)
    from safetensors.torch import load_file

    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    msg = str(err.value)
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1): model.layers.0.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: checkpoint (3, 3) vs model (64, 64)" in msg


def test_unknown_architecture_is_named(tmp_path):
    d = _saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown architecture.*llama"):
        load_model(d)


def test_pickled_checkpoint_is_refused(tmp_path):
    d = _saved(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled checkpoints are never loaded"):
        load_model(d)


def test_empty_prompt_and_overlong_prompt_are_errors():
    model = GemmaLM(GemmaConfig(**BASE, num_key_value_heads=1, architecture="gemma3", sliding_window=4))
    with pytest.raises(GenerationError, match="empty"):
        generate_ids(model, [[]])
    with pytest.raises(GenerationError, match="exceeds the model's context of 128"):
        generate_ids(model, [[5] * 120], max_new_tokens=20)


def test_presets_cover_official_sizes():
    from models.config import preset

    assert preset("gemma-2-27b").query_pre_attn_scalar == 144
    assert preset("datagemma-rag-27b-it") == preset("gemma-2-27b")
    assert preset("codegemma-7b") == preset("gemma-7b")
    assert preset("shieldgemma-9b") == preset("gemma-2-9b")
    g3 = preset("gemma-3-4b")
    assert g3.layer_types[5] == "full_attention" and g3.layer_types[4] == "sliding_attention"
    assert g3.rope_scaling_factor == 8.0 and g3.vocab_size == 262208
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gemma-5-1t")
