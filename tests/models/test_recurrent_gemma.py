"""RecurrentGemma against transformers' RecurrentGemmaForCausalLM on tiny random configs (every parameter
randomised: norms, gate weights and biases, recurrent_param, conv, every bias), loaded through
``load_model`` from single and sharded checkpoints; the fixed-size state; bad input.

Tolerances: fp32 logits within 1e-4 absolute (logits reach ~5; both sides run the same fp32 math in a
different order, measured differences ~1e-6). bf16: our error against the fp32 reference must be no
worse than twice transformers' own bf16 error against it (+1e-2), as for the Gemma decoders.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from models import CheckpointError, RecurrentGemmaConfig, RecurrentGemmaLM, generate_ids, load_model
from models.config import ConfigError
from models.recurrent_gemma import recurrent_preset, recurrent_preset_names

VOCAB = 97
WINDOW = 5  # shorter than every test sequence


def hf_config(block_types=("recurrent", "recurrent", "attention"), layers=4, kv_heads=1, **extra):
    cfg = transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, lru_width=48, attention_window_size=WINDOW, block_types=list(block_types),
        rope_parameters={"rope_type": "default", "rope_theta": 300.0, "partial_rotary_factor": 0.5},
        logits_soft_cap=6.0, **extra)
    cfg._attn_implementation = "eager"
    return cfg


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights init to 0 and would hide a missing ``1 + w``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if "norm" in name else 0.15
            if name.endswith("recurrent_param"):
                std = 1.0  # decays from ~0 to ~1: the state both forgets and remembers
            if "embed_tokens" in name:
                std = 0.05  # larger tied embeddings make greedy decoding repeat one token
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def hf_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = transformers.RecurrentGemmaForCausalLM(hf_config(**kwargs)).eval()
    randomise(model, seed)
    return model


PAIRS = {"default-pattern": dict(), "attention-first-gqa": dict(block_types=("attention", "recurrent"), layers=3,
                                                                   kv_heads=2)}


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request, tmp_path_factory):
    ref = hf_model(**PAIRS[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory)
    return ref, load_model(directory)


def random_ids(shape, seed):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(pair):
    ref, ours = pair
    assert isinstance(ours, RecurrentGemmaLM)
    ids = random_ids((2, 17), 1)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, 17, VOCAB)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_long_prefill_uses_query_blocks_and_still_matches(pair, monkeypatch):
    """On the CPU long inputs attend in blocks of queries; shrink the block to cross several."""
    import models.recurrent_gemma as rg

    ref, ours = pair
    monkeypatch.setattr(rg, "_QUERY_BLOCK", 4)
    ids = random_ids((1, 15), 11)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_identically(tmp_path):
    ref = hf_model(seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_model(tmp_path)
    ids = random_ids((1, 9), 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_document_boundary_resets_the_recurrence_as_transformers_does(pair):
    """A position 0 inside a sequence: transformers (and our default) reset only the RG-LRU state."""
    ref, ours = pair
    ids = random_ids((1, 14), 4)
    positions = torch.cat([torch.arange(6), torch.arange(8)])[None]
    with torch.no_grad():
        expected = ref(ids, position_ids=positions).logits
        got = ours(ids, position_ids=positions)
        plain = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got[0, 6:] - plain[0, 6:]).abs().max() > 1e-2  # the boundary matters


def test_incremental_decoding_equals_full_forward_past_the_window(pair):
    _, ours = pair
    ids = random_ids((2, 16), 2)
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None].expand(2, 16)  # a document starts at 9
    with torch.no_grad():
        full = ours(ids, position_ids=positions)
        ours.setup_cache(2, 0)
        steps = [ours(ids[:, :3], input_pos=0, position_ids=positions[:, :3]),  # chunk, chunk, then tokens
                 ours(ids[:, 3:11], input_pos=3, position_ids=positions[:, 3:11])]
        for t in range(11, 16):
            steps.append(ours(ids[:, t:t + 1], input_pos=t, position_ids=positions[:, t:t + 1]))
        ours.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_per_row_lengths_decode_like_single_rows(pair):
    """Right-padded rows of different lengths: each row's state ends at its own last token."""
    _, ours = pair
    a, b = random_ids((1, 11), 5), random_ids((1, 6), 6)
    nxt = random_ids((2, 1), 7)
    with torch.no_grad():
        ours.setup_cache(2, 0)
        padded = torch.zeros(2, 11, dtype=torch.long)
        padded[0], padded[1, :6] = a[0], b[0]
        ours(padded, input_pos=0, kv_lens=torch.tensor([11, 6]))
        step = ours(nxt, input_pos=torch.tensor([11, 6]))
        ours.clear_cache()
        alone_a = ours(torch.cat([a, nxt[:1]], dim=1))[:, -1]
        alone_b = ours(torch.cat([b, nxt[1:]], dim=1))[:, -1]
    torch.testing.assert_close(step[0, -1], alone_a[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[1, -1], alone_b[0], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(pair):
    ref, ours = pair
    prompt = random_ids((1, 5), 7)
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    got = generate_ids(ours, prompt, max_new_tokens=32, stop_token_ids=[])[0]
    assert len(got) == 32 and len(set(got)) > 3
    assert got == expected


def test_batched_generation_equals_one_by_one(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 2, 12)]
    batched = generate_ids(ours, prompts, max_new_tokens=10, stop_token_ids=[])
    single = [generate_ids(ours, [p], max_new_tokens=10, stop_token_ids=[])[0] for p in prompts]
    assert batched == single


def test_state_memory_is_constant(tmp_path):
    """The state's bytes after 10 and after 1,000 decoded tokens are equal, and it is the same tensors."""
    hf_model(seed=1).save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    prompt = random_ids((1, 4), 8)
    generate_ids(ours, prompt, max_new_tokens=10, stop_token_ids=[])
    tensors = ours.state.tensors()
    after_10 = ours.state.nbytes()
    pointers = [t.data_ptr() for t in tensors]
    assert int(ours.state.seen[0]) == 4 + 9  # the last sampled token is never fed back
    generate_ids(ours, prompt, max_new_tokens=1000, stop_token_ids=[])
    assert int(ours.state.seen[0]) == 4 + 999
    assert ours.state.nbytes() == after_10
    assert [t.data_ptr() for t in ours.state.tensors()] == pointers  # updated in place, nothing reallocated
    c = ours.config
    rec, att = c.layer_types.count("recurrent"), c.layer_types.count("attention")
    expected = 4 * (rec * ((c.conv1d_width - 1) * c.lru_width + c.lru_width)
                    + att * 2 * c.num_key_value_heads * WINDOW * c.head_dim) + 8
    assert after_10 == expected


def test_bf16_within_stated_tolerance():
    ref = hf_model(seed=11)
    ids = random_ids((2, 12), 4)
    with torch.no_grad():
        exact = ref(ids).logits
        ref_bf16_err = (ref.to(torch.bfloat16)(ids).logits.float() - exact).abs().max().item()
        ref.float()
        ours = RecurrentGemmaLM(RecurrentGemmaConfig.from_hf(ref.config.to_dict()))
        ours.load_state_dict(ref.state_dict(), strict=False)
        ours_err = (ours.to(torch.bfloat16)(ids).float() - exact).abs().max().item()
    assert ours_err <= 2 * ref_bf16_err + 1e-2, (ours_err, ref_bf16_err)


# -- config ----------------------------------------------------------------------------------------
def test_config_reads_transformers_4_and_5_keys():
    v5 = hf_config(block_types=("attention", "recurrent")).to_dict()
    c5 = RecurrentGemmaConfig.from_hf(v5)
    assert (c5.rope_theta, c5.partial_rotary_factor, c5.rotary_dim) == (300.0, 0.5, 8)
    assert c5.layer_types == ["attention", "recurrent", "attention", "recurrent"]
    # transformers 4.x / the official config.json: top-level rope keys and the private _block_types.
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "block_types")}
    v4.update(rope_theta=300.0, partial_rotary_factor=0.5, _block_types=["attention", "recurrent"])
    assert RecurrentGemmaConfig.from_hf(v4) == c5
    # to_hf round-trips through transformers' own config class.
    again = transformers.RecurrentGemmaConfig(**c5.to_hf())
    assert again.layers_block_type == ["sliding_attention", "linear_attention"] * 2
    assert RecurrentGemmaConfig.from_hf(again.to_dict()) == c5


def test_presets_have_the_official_shapes():
    two = recurrent_preset("google/recurrentgemma-2b-it")
    assert (two.hidden_size, two.mlp_width, two.num_hidden_layers, two.num_attention_heads, two.head_dim) == \
        (2560, 7680, 26, 10, 256)
    assert two.layer_types[:3] == ["recurrent", "recurrent", "attention"] and two.layer_types[-1] == "recurrent"
    nine = recurrent_preset("recurrentgemma-9b")
    assert (nine.hidden_size, nine.mlp_width, nine.num_hidden_layers, nine.num_attention_heads, nine.lru_width) == \
        (4096, 12288, 38, 16, 4096)
    for c in (two, nine):
        assert (c.num_key_value_heads, c.attention_window_size, c.conv1d_width, c.logits_soft_cap, c.vocab_size) == \
            (1, 2048, 4, 30.0, 256000)
    assert recurrent_preset_names() == ["recurrentgemma-2b", "recurrentgemma-2b-it", "recurrentgemma-9b",
                                        "recurrentgemma-9b-it"]
    with pytest.raises(ConfigError, match="unknown RecurrentGemma preset"):
        recurrent_preset("recurrentgemma-7b")


def test_embedding_scale_is_rounded_to_bf16():
    config = RecurrentGemmaConfig(vocab_size=2, hidden_size=2560, intermediate_size=2, num_hidden_layers=1,
                                  num_attention_heads=10, lru_width=10, block_types=["recurrent"])
    model = RecurrentGemmaLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
    assert model.embed(torch.tensor([0]))[0, 0].item() == 50.5  # sqrt(2560) = 50.596 in fp32


def test_preset_names_load_random_models(monkeypatch):
    import models.recurrent_gemma as rg

    tiny = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, lru_width=48,
                vocab_size=VOCAB)
    monkeypatch.setitem(rg._PRESETS, "recurrentgemma-2b", tiny)  # the real shapes hold 2.7B parameters
    model = load_model("google/recurrentgemma-2b-it", seed=5)
    assert isinstance(model, RecurrentGemmaLM) and model.config.hidden_size == 64
    assert generate_ids(model, [[2, 5, 9]], max_new_tokens=4, stop_token_ids=[])[0]
    again = load_model("recurrentgemma-2b", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(FileNotFoundError, match="recurrent_preset_names"):
        load_model("recurrentgemma-7b")


# -- bad input -------------------------------------------------------------------------------------
def _gemma_checkpoint(tmp_path):
    cfg = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    transformers.GemmaForCausalLM(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_gemma_checkpoint_with_a_recurrent_config_is_one_key_report(tmp_path):
    directory = _gemma_checkpoint(tmp_path)
    (directory / "config.json").write_text(json.dumps(hf_config().to_dict()))
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    msg = str(err.value)
    assert "does not fit the model config" in msg
    assert "missing keys" in msg and "model.layers.0.temporal_block.rg_lru.recurrent_param" in msg
    assert "unexpected keys" in msg and "model.layers.0.self_attn.q_proj.weight" in msg


def test_recurrent_checkpoint_with_a_gemma_config_is_one_key_report(tmp_path):
    hf_model(seed=2).save_pretrained(tmp_path)
    gemma = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(gemma.to_dict()))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "missing keys" in msg and "model.layers.0.self_attn.q_proj.weight" in msg
    assert "unexpected keys" in msg and "model.layers.0.temporal_block.linear_x.weight" in msg


def test_bad_configs_name_the_field(tmp_path):
    bad = hf_config().to_dict()
    with pytest.raises(ConfigError, match="unknown block types"):
        RecurrentGemmaConfig.from_hf({**bad, "block_types": ["recurrent", "mamba"]})
    with pytest.raises(ConfigError, match="must divide lru_width"):
        RecurrentGemmaConfig.from_hf({**bad, "lru_width": 50})
    with pytest.raises(ConfigError, match="not a RecurrentGemma config"):
        RecurrentGemmaConfig.from_hf({**bad, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]})
    hf_model(seed=2).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**bad, "num_attention_heads": 5}))
    with pytest.raises(CheckpointError, match="config.json.*num_attention_heads"):
        load_model(tmp_path)


def test_positions_that_do_not_continue_the_state_are_refused(pair):
    _, ours = pair
    ids = random_ids((2, 4), 3)
    ours.clear_cache()
    generate_ids(ours, ids, max_new_tokens=2)  # a state made under inference_mode ...
    with torch.no_grad():
        ours.setup_cache(2)
        ours(ids, input_pos=0)  # ... is replaced outside it (inference tensors cannot be updated in place)
        with pytest.raises(RuntimeError, match="call setup_cache"):
            ours.clear_cache() or ours(ids, input_pos=0)
        ours.setup_cache(2, 0)
        ours(ids, input_pos=0)
        with pytest.raises(ValueError, match="row 0: input_pos 3 but its recurrent state holds 4 tokens"):
            ours(ids[:, :1], input_pos=3)
        with pytest.raises(ValueError, match="kv_lens must hold"):
            ours(ids, input_pos=0, kv_lens=torch.tensor([9, 4]))
        assert ours.state.seen.tolist() == [4, 4]  # a refused call leaves the state as it was
        with pytest.raises(ValueError, match="one start per row"):
            ours(ids, input_pos=torch.tensor([4, 4, 4]))
        with pytest.raises(ValueError, match="exceeds the state's batch"):
            ours(random_ids((3, 1), 1), input_pos=4)
        ours(ids[:, :1], input_pos=torch.tensor([4, 0]))  # row 0 continues, row 1 restarts
        assert ours.state.seen.tolist() == [5, 1]
    ours.clear_cache()
