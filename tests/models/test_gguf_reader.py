"""The bulk GGUF header parser and the torch dequantisers against the gguf package (the oracle).

On the real Gemma 3 270M file every metadata key and value (types included) and every tensor's table
entry must equal ``gguf.GGUFReader``'s, and every tensor's values must equal
``gguf.quants.dequantize`` bit for bit (same fp32 operations in the same order, so no tolerance).
Building a GGUFReader over the 262k-entry vocabulary takes ~14 s on this machine: the one slow test
here, kept because the real file is the only one with every Gemma metadata key at full size. Large
tensors are compared on a spread of their rows (gguf.quants is slow). On random blocks, each
quantisation type is compared likewise. Small hand-made files cover strings the real
vocabulary lacks and truncation at every point of a header (a clear error naming the file).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from models.gguf import GGUFError, GGUFTensorInfo, _dequantize, _map, _parse, read_gguf_metadata

# Every type with a torch formula in models.gguf, and where its fp16 scale fields lie in a block.
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q5_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _reader_metadata(reader: gguf.GGUFReader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def test_real_file_header_equals_gguf_reader(gemma3_270m_gguf):
    ours = read_gguf_metadata(gemma3_270m_gguf)
    reader = gguf.GGUFReader(str(gemma3_270m_gguf))
    expected = _reader_metadata(reader)
    assert list(ours) == list(expected)
    assert len(ours["tokenizer.ggml.tokens"]) == 262144
    for key, value in expected.items():
        assert type(ours[key]) is type(value), key
        assert ours[key] == value, key
    _, tensors = _parse(gemma3_270m_gguf)
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for info, t in zip(tensors, reader.tensors, strict=True):
        assert (info.type_id, info.offset, info.nbytes) == (int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
        assert info.shape == tuple(reversed(t.shape.tolist()))


def test_real_file_tensors_dequantise_as_gguf_quants(gemma3_270m_gguf):
    _, tensors = _parse(gemma3_270m_gguf)
    data = torch.frombuffer(_map(gemma3_270m_gguf), dtype=torch.uint8)
    raw_file = np.memmap(gemma3_270m_gguf, dtype=np.uint8, mode="r")
    assert {t.type_name for t in tensors} >= {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    for info in tensors:
        ours = _dequantize(gemma3_270m_gguf, data, info)
        assert ours.shape == info.shape and ours.dtype == torch.float32
        raw = raw_file[info.offset:info.offset + info.nbytes].reshape(info.shape[0] if len(info.shape) > 1 else 1, -1)
        # gguf.quants (numpy) needs ~20 s for the 262144-row embedding alone: a spread of rows of every
        # large tensor (every 61st of the embedding, every 5th elsewhere) keeps this test to seconds
        every = 61 if info.name == "token_embd.weight" else 5 if raw.shape[0] >= 1024 else 1
        raw, ours = raw[::every], ours[::every]
        qtype = gguf.GGMLQuantizationType(info.type_id)
        expected = gguf.quants.dequantize(raw, qtype) if info.type_name != "F32" else raw.view(np.float32)
        assert torch.equal(ours.reshape(expected.shape), torch.from_numpy(np.array(expected))), info.name


@pytest.mark.parametrize("type_name", sorted(FP16_FIELDS))
def test_random_blocks_dequantise_as_gguf_quants(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, size=(3, 5 * size), dtype=np.uint8)  # 3 rows of 5 blocks
    scales = rng.uniform(-2, 2, size=(3, 5, len(FP16_FIELDS[type_name]))).astype(np.float16)
    view = blocks.reshape(3, 5, size)
    for j, at in enumerate(FP16_FIELDS[type_name]):  # finite fp16 scales (random bytes may be NaN)
        view[:, :, at:at + 2] = scales[:, :, j:j + 1].view(np.uint8).reshape(3, 5, 2)
    info = GGUFTensorInfo(name="t", type_name=type_name, type_id=int(qtype), shape=(3, 5 * block), offset=0,
                          nbytes=blocks.size)
    ours = _dequantize("random", torch.from_numpy(blocks.reshape(-1).copy()), info)
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    assert torch.isfinite(expected).all()
    assert torch.equal(ours, expected)


def _write(path, strings, extra=None):
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_array("test.strings", strings)
    writer.add_array("test.floats", [1.5, -2.25])
    writer.add_array("test.bools", [True, False])
    writer.add_string("test.text", "ünïcode ✓")
    writer.add_uint64("test.big", 2 ** 40)
    for key, value in (extra or {}).items():
        writer.add_int32(key, value)
    writer.add_tensor("output_norm.weight", np.arange(32, dtype=np.float32))
    writer.add_tensor("f16", np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("strings", [["a", "", "é😀", " ", "<0x0A>"], ["nul\x00inside", "x"], [""]],
                         ids=["multibyte", "nul", "one-empty"])
def test_small_file_header_equals_gguf_reader(tmp_path, strings):
    path = tmp_path / "small.gguf"
    _write(path, strings)
    ours = read_gguf_metadata(path)
    expected = _reader_metadata(gguf.GGUFReader(str(path)))
    assert ours == expected and [type(v) for v in ours.values()] == [type(v) for v in expected.values()]
    assert ours["test.strings"] == strings


def test_truncated_anywhere_in_the_header_names_the_file(tmp_path):
    path = tmp_path / "small.gguf"
    _write(path, ["abc", "défg"] * 3)
    data = path.read_bytes()
    _, tensors = _parse(path)
    header_end = tensors[0].offset
    for cut in range(5, header_end, 3):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated") as info:
            read_gguf_metadata(bad)
        assert str(bad) in str(info.value)


def test_absurd_string_length_is_a_clear_error(tmp_path):
    path = tmp_path / "small.gguf"
    _write(path, ["abc"])
    data = bytearray(path.read_bytes())
    at = data.index(b"abc") - 8  # the u64 length in front of the first array string
    data[at:at + 8] = (2 ** 62).to_bytes(8, "little")
    bad = tmp_path / "bad_len.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="truncated or corrupt") as info:
        read_gguf_metadata(bad)
    assert str(bad) in str(info.value)


def test_loading_writes_nothing_and_keeps_f32_as_file_views(tmp_path):
    path = tmp_path / "small.gguf"
    _write(path, ["a"])
    before = sorted(p.name for p in tmp_path.iterdir())
    original = path.read_bytes()
    _, tensors = _parse(path)
    data = torch.frombuffer(_map(path), dtype=torch.uint8)
    norm = _dequantize(path, data, tensors[0])
    assert torch.equal(norm, torch.arange(32, dtype=torch.float32))
    assert norm.untyped_storage().data_ptr() == data.untyped_storage().data_ptr()  # a view, no copy
    norm -= 1.0  # copy-on-write: the file itself is never written
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_string_arrays_are_decoded_on_first_read(tmp_path):
    """A model load parses the header without decoding string arrays (the vocabulary); the first read
    of the metadata decodes them once, in the in-memory cache; bad UTF-8 is reported then."""
    from models.gguf import _DeferredStrings

    path = tmp_path / "small.gguf"
    strings = ["a", "é😀", "nul\x00inside", ""]
    _write(path, strings)
    deferred = _parse(path, decode=False)[0]["test.strings"]
    assert isinstance(deferred, _DeferredStrings) and len(deferred) == len(strings)
    assert read_gguf_metadata(path)["test.strings"] == strings
    assert _parse(path, decode=False)[0]["test.strings"] == strings  # the cache now holds the list

    data = bytearray(path.read_bytes())
    data[data.index("é".encode())] = 0xFF
    bad = tmp_path / "bad_utf8.gguf"
    bad.write_bytes(bytes(data))
    assert len(_parse(bad, decode=False)[0]["test.strings"]) == len(strings)
    with pytest.raises(GGUFError, match="not valid UTF-8") as info:
        read_gguf_metadata(bad)
    assert str(bad) in str(info.value)
