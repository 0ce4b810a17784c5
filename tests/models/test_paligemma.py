"""PaliGemma 1/2 against transformers' PaliGemmaForConditionalGeneration (eager, with token_type_ids).

Tiny random configs with every parameter randomised (norm weights included: zeros would hide a missing
``1 + w``), one with a Gemma 1 decoder (PaliGemma) and one with a Gemma 2 decoder (PaliGemma 2: softcaps
and a sliding window shorter than the sequence), loaded by ``models.load_model`` from checkpoints in
each of the four published key layouts.

Tolerance: fp32 logits within 1e-4 absolute. Both sides do the same fp32 arithmetic in a different
order (our attention accumulates in fp32 throughout); observed differences are ~1e-6 on logits of
order 1-10, so 1e-4 leaves room for summation order without hiding a wrong mask, scale or position
(each of those moves logits by > 1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from models import CheckpointError, load_model
from models.paligemma import PaliGemma, PaliGemmaConfig, normalize_checkpoint_keys, prefix_lengths

VOCAB = 131
IMAGE_SIZE, PATCH = 28, 14  # 2 x 2 = 4 image tokens
N_IMG = (IMAGE_SIZE // PATCH) ** 2
BOS, EOS, NEWLINE = 2, 1, 10

VISION = dict(hidden_size=60, intermediate_size=43, num_hidden_layers=2, num_attention_heads=3, image_size=IMAGE_SIZE,
              patch_size=PATCH, vision_use_head=False)  # head_dim 20: not a power of two, like So400m's 72
TEXT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, eos_token_id=EOS,
            bos_token_id=BOS)

ARCHS = {
    # Gemma 1 decoder; the <image> id lies past the embedding matrix (its lookup must be avoided).
    "paligemma1": dict(text=dict(TEXT, model_type="gemma", hidden_activation="gelu_pytorch_tanh"), image_token=VOCAB),
    # Gemma 2 decoder: softcaps small enough to matter, window 13 < sequence length 18 (but > the prefix).
    "paligemma2": dict(text=dict(TEXT, model_type="gemma2", sliding_window=13, query_pre_attn_scalar=20,
                                 attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
                       image_token=VOCAB - 1),
    # Window 6 shorter than the prefix (11 tokens): prefix pairs see each other whatever the window,
    # while suffix tokens see only the window (PaliGemma 2 at 896 px, in miniature).
    "paligemma2-window-in-prefix": dict(text=dict(TEXT, model_type="gemma2", sliding_window=6, query_pre_attn_scalar=20,
                                                  attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
                                        image_token=VOCAB - 1),
}


def hf_model(arch: str, seed: int = 0):
    spec = ARCHS[arch]
    config = transformers.PaliGemmaConfig(vision_config=dict(VISION), text_config=dict(spec["text"]),
                                          image_token_index=spec["image_token"], projection_dim=TEXT["hidden_size"],
                                          hidden_size=TEXT["hidden_size"], vocab_size=VOCAB)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "norm" in name else 0.15
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def to_layout(state: dict, layout: str) -> dict:
    """transformers 5.x ``state_dict`` keys (layout c) renamed to layouts (a) and (b)."""
    out = {}
    for key, t in state.items():
        t = t.detach().clone().contiguous()  # safetensors refuses shared (tied) storage
        if layout == "c":
            k = key
        elif layout == "b":
            k = key.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        elif layout == "a":
            k = (key.replace("model.language_model.", "language_model.model.", 1)
                 .replace("model.vision_tower.", "vision_tower.vision_model.", 1)
                 .replace("model.multi_modal_projector.", "multi_modal_projector.", 1))
            k = "language_model.lm_head.weight" if k == "lm_head.weight" else k
        out[k] = t
    return out


def save_checkpoint(ref, directory, layout: str) -> None:
    if layout == "d":
        ref.save_pretrained(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    ref.config.save_pretrained(directory)
    save_file(to_layout(ref.state_dict(), layout), str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def references():
    return {arch: hf_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def pixel_values():
    return torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1


def make_batch(arch: str, prefix_lens=(5, 3), total=18):
    """Two rows: <image> x 4, <bos>, prefix tokens, \\n, then suffix tokens; row 1 right-padded by 2."""
    image = ARCHS[arch]["image_token"]
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(11, VOCAB - 2, (2, total), generator=gen)
    types = torch.ones(2, total, dtype=torch.long)
    mask = torch.ones(2, total, dtype=torch.long)
    for row, n_prefix in enumerate(prefix_lens):
        ids[row, :N_IMG] = image
        ids[row, N_IMG] = BOS
        ids[row, N_IMG + 1 + n_prefix] = NEWLINE
        types[row, :N_IMG + 2 + n_prefix] = 0
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    return ids, types, mask


@pytest.mark.parametrize("layout", ["a", "b", "c", "d"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers_in_every_layout(arch, layout, references, pixel_values, tmp_path):
    ref = references[arch]
    save_checkpoint(ref, tmp_path / layout, layout)
    ours = load_model(tmp_path / layout)
    assert isinstance(ours, PaliGemma)
    ids, types, mask = make_batch(arch)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixel_values, token_type_ids=types, attention_mask=mask).logits
        got = ours(ids, pixel_values, token_type_ids=types, attention_mask=mask)
    assert got.shape == expected.shape == (2, ids.shape[1], VOCAB)
    assert expected.abs().max() > 1.0
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=0)


def test_save_pretrained_writes_layout_d(references, tmp_path):
    """Layout (d) is what transformers 5.23 writes; make sure the test above really exercises it."""
    from safetensors import safe_open

    references["paligemma2"].save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in keys
    assert "vision_tower.embeddings.patch_embedding.weight" in keys
    assert "multi_modal_projector.linear.weight" in keys
    assert not any(k.startswith(("model.", "vision_tower.vision_model.")) for k in keys)


@pytest.fixture(scope="module")
def loaded(references, tmp_path_factory):
    models = {}
    for arch, ref in references.items():
        directory = tmp_path_factory.mktemp(arch)
        ref.save_pretrained(directory)
        models[arch] = load_model(directory)
    return models


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefix_lm_mask(arch, loaded, pixel_values):
    """Changing a prefix token changes every position; changing a suffix token only later positions."""
    model = loaded[arch]
    ids, types, _ = make_batch(arch)
    ids, types, pixels = ids[:1], types[:1], pixel_values[:1]
    prefix = int(types[0].eq(0).sum())
    with torch.no_grad():
        base = model(ids, pixels, token_type_ids=types)
        changed_prefix = ids.clone()
        changed_prefix[0, prefix - 2] = (ids[0, prefix - 2] + 1 - 11) % (VOCAB - 13) + 11  # a text prefix token
        after_prefix_change = model(changed_prefix, pixels, token_type_ids=types)
        j = prefix + 3
        changed_suffix = ids.clone()
        changed_suffix[0, j] = (ids[0, j] + 1 - 11) % (VOCAB - 13) + 11
        after_suffix_change = model(changed_suffix, pixels, token_type_ids=types)
    per_position = (after_prefix_change - base).abs().amax(-1)[0]
    assert (per_position > 1e-4).all(), per_position  # even the image tokens see the changed prefix token
    per_position = (after_suffix_change - base).abs().amax(-1)[0]
    assert torch.equal(after_suffix_change[0, :j], base[0, :j])
    assert (per_position[j:] > 1e-4).all(), per_position


def test_prefix_lengths_from_token_types():
    types = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    assert prefix_lengths(types, torch.tensor([5, 3])).tolist() == [3, 2]
    with pytest.raises(ValueError, match="token_type_ids"):
        prefix_lengths(torch.tensor([[0, 1, 0, 1]]))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_triton_backend_matches_transformers(arch, references, loaded, pixel_values):
    """The Triton kernels (interpreted on CPU) with the prefix-LM mask, padding, window and softcap."""
    ref, ours = references[arch], loaded[arch]
    ids, types, mask = make_batch(arch)
    ours.attention_backend = "triton"
    try:
        with torch.no_grad():
            expected = ref(input_ids=ids, pixel_values=pixel_values, token_type_ids=types, attention_mask=mask).logits
            got = ours(ids, pixel_values, token_type_ids=types, attention_mask=mask)
    finally:
        ours.attention_backend = None
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=0)


# Decoding through the Triton kernels runs interpreted on CPU (slow): once, on the decoder with the
# most features (window, softcaps).
@pytest.mark.parametrize("arch,backend", [("paligemma1", "torch"), ("paligemma2", "torch"), ("paligemma2", "triton")])
def test_greedy_generation_matches_transformers(arch, backend, references, loaded, pixel_values):
    ref, ours = references[arch], loaded[arch]
    ours.attention_backend = backend
    ids, types, _ = make_batch(arch, prefix_lens=(5, 3))
    prompts = [ids[0, :N_IMG + 7].tolist(), ids[1, :N_IMG + 5].tolist()]  # prefix only, two lengths
    steps = 6
    expected = []
    for row, prompt in enumerate(prompts):
        p = torch.tensor([prompt])
        out = ref.generate(input_ids=p, pixel_values=pixel_values[row:row + 1], token_type_ids=torch.zeros_like(p),
                           attention_mask=torch.ones_like(p), max_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    got = ours.generate(prompts, pixel_values, max_new_tokens=steps, stop_token_ids=[])
    assert got == expected
    # Row by row (no padding) gives the same tokens as the right-padded batch.
    for row, prompt in enumerate(prompts if backend == "torch" else []):
        single = ours.generate([prompt], pixel_values[row:row + 1], max_new_tokens=steps, stop_token_ids=[])
        assert single[0] == expected[row]
    ours.attention_backend = None


def test_generation_stops_at_stop_token(loaded, pixel_values):
    model = loaded["paligemma1"]
    ids, _, _ = make_batch("paligemma1")
    prompt = ids[0, :N_IMG + 7].tolist()
    free = model.generate([prompt], pixel_values[:1], max_new_tokens=5, stop_token_ids=[])[0]
    k = max(i for i in range(len(free)) if free[i] not in free[:i])  # the last first-occurrence
    stopped = model.generate([prompt], pixel_values[:1], max_new_tokens=5, stop_token_ids=[free[k]])[0]
    assert stopped == free[:k + 1]


def test_image_token_count_is_checked(loaded, pixel_values):
    model = loaded["paligemma1"]
    ids, types, _ = make_batch("paligemma1")
    with pytest.raises(ValueError, match="<image> tokens"):
        model(ids[:, 1:], pixel_values, token_type_ids=types[:, 1:])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, None, token_type_ids=types)


def test_left_padding_is_rejected(loaded, pixel_values):
    model = loaded["paligemma1"]
    ids, types, mask = make_batch("paligemma1")
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, pixel_values, token_type_ids=types, attention_mask=mask.flip(-1))


def test_bidirectional_hidden_states_see_padding_only_as_padding(loaded, pixel_values):
    """causal=False with kv_lens (ColPali): valid positions ignore what lies in the padding."""
    model = loaded["paligemma2"]
    ids, _, _ = make_batch("paligemma2")
    lens = torch.tensor([14, 14])
    other = ids.clone()
    other[:, 14:] = 5
    with torch.no_grad():
        a = model.hidden_states(ids, pixel_values, causal=False, kv_lens=lens)
        b = model.hidden_states(other, pixel_values, causal=False, kv_lens=lens)
        # ...and a change early in the sequence reaches every valid position (no causal mask).
        late = ids.clone()
        late[:, 13] = (ids[:, 13] + 1 - 11) % (VOCAB - 13) + 11
        c = model.hidden_states(late, pixel_values, causal=False, kv_lens=lens)
    torch.testing.assert_close(a[:, :14], b[:, :14], atol=0, rtol=0)
    assert ((c[:, :13] - a[:, :13]).abs().amax(-1) > 1e-5).all()


def test_mixed_layouts_and_missing_keys_are_reported(references, tmp_path):
    ref = references["paligemma1"]
    state = to_layout(ref.state_dict(), "a")
    mixed = dict(state)
    mixed["model.language_model.norm.weight"] = state["language_model.model.norm.weight"].clone()
    with pytest.raises(CheckpointError, match="language_model.model.norm.weight"):
        normalize_checkpoint_keys(mixed)
    directory = tmp_path / "missing"
    directory.mkdir()
    ref.config.save_pretrained(directory)
    del state["multi_modal_projector.linear.bias"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear.bias"):
        load_model(directory)


# Official config.json files (abridged to what they contain): sizes must come from them, and the
# fields they omit must take the real model's values, not transformers' class defaults.
PALIGEMMA_3B_PT_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1,
                    "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}
PALIGEMMA2_3B_PT_448 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "image_token_index": 257152, "model_type": "paligemma",
    "projection_dim": 2304, "hidden_size": 2048,
    "text_config": {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                    "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304,
                    "intermediate_size": 9216, "model_type": "gemma2", "num_attention_heads": 8,
                    "num_hidden_layers": 26, "num_image_tokens": 1024, "num_key_value_heads": 4,
                    "query_pre_attn_scalar": 256, "sliding_window": 4096, "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "image_size": 448, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "num_image_tokens": 1024, "patch_size": 14, "projection_dim": 2304, "vision_use_head": False},
}


def test_official_configs_build_the_official_shapes(tmp_path):
    c1 = PaliGemmaConfig.from_hf(PALIGEMMA_3B_PT_224)
    assert (c1.text.architecture, c1.text.hidden_size, c1.text.num_key_value_heads) == ("gemma", 2048, 1)
    assert (c1.vision.intermediate_size, c1.vision.head_dim, c1.num_image_tokens) == (4304, 72, 256)
    c2 = PaliGemmaConfig.from_hf(PALIGEMMA2_3B_PT_448)
    assert (c2.text.architecture, c2.text.hidden_size, c2.text.attn_logit_softcapping) == ("gemma2", 2304, 50.0)
    assert c2.text.is_sliding(0) and not c2.text.is_sliding(1)
    assert (c2.image_size, c2.num_image_tokens) == (448, 1024)
    with torch.device("meta"):
        model = PaliGemma(c2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["vision_tower.encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["multi_modal_projector.linear.weight"] == (2304, 1152)
    assert shapes["language_model.model.embed_tokens.weight"] == (257216, 2304)
    assert shapes["vision_tower.embeddings.position_embedding.weight"] == (1024, 1152)
    bad = json.loads(json.dumps(PALIGEMMA_3B_PT_224))
    bad["projection_dim"] = 1024
    with pytest.raises(ValueError, match="projection_dim"):
        PaliGemmaConfig.from_hf(bad)
