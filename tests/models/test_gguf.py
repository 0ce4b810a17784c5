"""GGUF loading on tiny files written here with the gguf package's writer, against transformers.

Each test writes a tiny random Gemma 1/2/3 model (every parameter randomised, norms included) the way
llama.cpp's converter does: llama.cpp tensor names (the table below is written from llama.cpp's
naming, independently of models.gguf), norm weights stored as ``1 + w``, matrices ``[out, in]``.
Loading the file back must give transformers' logits on the original weights (fp32, 1e-4 absolute on
logits of order 1-10: the same math in a different order differs by ~1e-6), and Q8_0 tensors must
equal the gguf package's own dequantisation of what was written.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from models import load_model
from models.gguf import GGUFError, load_gguf_model, read_gguf, read_gguf_metadata

VOCAB = 96
HIDDEN, INTER, HEADS, KV, HEAD_DIM, WINDOW = 64, 96, 4, 2, 32, 5

# Hugging Face module -> llama.cpp tensor name (per block unless top level), per architecture.
LLAMA_CPP_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def llama_cpp_name(hf_key: str, arch: str) -> str:
    if hf_key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_key == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *module, _ = hf_key.split(".")
    module = ".".join(module)
    if module == "post_attention_layernorm":
        # Gemma 1's post_attention_layernorm is the norm before the MLP: llama.cpp's ffn_norm.
        return f"blk.{layer}.{'ffn_norm' if arch == 'gemma' else 'post_attention_norm'}.weight"
    return f"blk.{layer}.{LLAMA_CPP_BLOCK_NAMES[module]}.weight"


def hf_tiny(arch: str, seed: int = 0, layers: int = 6, layer_types=None, local_base: float = 10_000.0):
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
              num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
              max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, rms_norm_eps=1e-6)
    if arch == "gemma":
        config = transformers.GemmaConfig(**kw, hidden_activation="gelu_pytorch_tanh", rope_theta=10_000.0)
        cls = transformers.GemmaForCausalLM
    elif arch == "gemma2":
        # What llama.cpp assumes for Gemma 2: even layers local, query scale head_dim ** -0.5.
        config = transformers.Gemma2Config(**kw, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM,
                                           attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
        cls = transformers.Gemma2ForCausalLM
    else:
        layer_types = layer_types or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                      for i in range(layers)]
        config = transformers.Gemma3TextConfig(
            **kw, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM, layer_types=layer_types,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": local_base}})
        cls = transformers.Gemma3ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "norm" in name else 0.15))
    return model


def write_gguf(path, arch: str, model, *, quantize: str | None = None, extra=None, raw=None) -> None:
    """A GGUF file as llama.cpp writes Gemma: names, ``1 + w`` norms, metadata, a vocabulary."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    else:
        writer.add_rope_freq_base(10_000.0)
    if arch != "gemma":
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    for key, value in (extra or {}).items():
        getattr(writer, key)(value)
    writer.add_tokenizer_model("llama")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(VOCAB - 4)]
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 2] + [6] * (VOCAB - 4))
    writer.add_token_scores([0.0] * VOCAB)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key in (raw or {}):
            data, raw_dtype = raw[key]
            writer.add_tensor(llama_cpp_name(key, arch), data, raw_dtype=raw_dtype)
            continue
        array = value.float().numpy().copy()
        if key.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp stores 1 + w
        name = llama_cpp_name(key, arch)
        if quantize == "Q8_0" and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_logits_match(ref, ours):
    ids = torch.randint(4, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_tiny_gguf_logits_match_transformers(tmp_path, arch):
    ref = hf_tiny(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, ref)
    ours = load_model(path, dtype=torch.float32)
    assert ours.config.architecture == arch
    assert_logits_match(ref, ours)


def test_norms_are_stored_plus_one_and_names_map_to_hf(tmp_path):
    ref = hf_tiny("gemma3", layers=2)
    path = tmp_path / "g3.gguf"
    write_gguf(path, "gemma3", ref)
    _, state, metadata = read_gguf(path)
    expected = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=key)
    assert metadata["general.architecture"] == "gemma3"


def test_gemma3_layer_pattern_and_local_rope_base_from_metadata(tmp_path):
    """Newer llama.cpp files list the sliding layers and the local RoPE base explicitly."""
    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    ref = hf_tiny("gemma3", layers=4, layer_types=types, local_base=300.0)
    path = tmp_path / "g3.gguf"
    pattern = [t == "sliding_attention" for t in types]
    extra = {"add_sliding_window_pattern": pattern, "add_rope_freq_base_swa": 300.0}
    write_gguf(path, "gemma3", ref, extra=extra)
    ours = load_gguf_model(path)
    assert ours.config.layer_types == types and ours.config.rope_local_base_freq == 300.0
    assert_logits_match(ref, ours)


def test_q8_0_tensors_dequantise_as_written(tmp_path):
    ref = hf_tiny("gemma2", layers=2)
    path = tmp_path / "q8.gguf"
    write_gguf(path, "gemma2", ref, quantize="Q8_0")
    _, state, _ = read_gguf(path)
    q = gguf.GGMLQuantizationType.Q8_0
    for key, value in ref.state_dict().items():
        if key == "lm_head.weight" or value.dim() != 2:
            continue
        written = gguf.quants.dequantize(gguf.quants.quantize(value.numpy(), q), q)
        torch.testing.assert_close(state[key], torch.from_numpy(written), atol=0, rtol=0, msg=key)
        # and Q8_0 is close to the original: one int8 step of the block's absmax
        assert (state[key] - value).abs().max() <= value.abs().max() / 127 + 1e-6


# -- bad input ---------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b'{"this is": "json, not GGUF"}')
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_model(path)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_metadata(path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "g2.gguf"
    write_gguf(path, "gemma2", hf_tiny("gemma2", layers=2))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf_model(cut)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="unsupported architecture 'llama'"):
        load_gguf_model(path)


def test_tensor_type_that_cannot_be_dequantised(tmp_path):
    ref = hf_tiny("gemma", layers=1)
    path = tmp_path / "q8_1.gguf"
    # One tensor in Q8_1 (blocks of 32 values in 40 bytes), which gguf.quants cannot decode.
    q8_1 = np.zeros((INTER, HIDDEN // 32 * 40), dtype=np.uint8)
    raw = {"model.layers.0.mlp.up_proj.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)}
    write_gguf(path, "gemma", ref, raw=raw)
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight has type Q8_1"):
        load_gguf_model(path)


def test_unknown_tensor_type_id(tmp_path):
    path = tmp_path / "g1.gguf"
    write_gguf(path, "gemma", hf_tiny("gemma", layers=1))
    data = bytearray(path.read_bytes())
    # The tensor table entry of output_norm: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    name = b"output_norm.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == 0  # F32
    data[type_at:type_at + 4] = (200).to_bytes(4, "little")
    bad = tmp_path / "bad_type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown ggml type"):
        load_gguf_model(bad)


def test_other_byte_order(tmp_path):
    path = tmp_path / "big_endian.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma", endianess=gguf.GGUFEndian.BIG)
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="byte order"):
        read_gguf(path)
