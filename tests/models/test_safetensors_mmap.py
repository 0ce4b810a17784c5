"""Zero-copy safetensors reading against the safetensors library (the oracle) on files it writes:
every dtype and an odd shape read back equal, as views of one mapping, and bad headers are clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loading import CheckpointError, read_safetensors


def test_tensors_equal_the_library_and_share_one_mapping(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).to(torch.bfloat16),
               "c": torch.randn(2, 3, 4, generator=gen).half(), "d": torch.arange(-5, 6, dtype=torch.int64),
               "e": torch.tensor([True, False, True]), "f": torch.randint(0, 255, (9,), dtype=torch.uint8,
                                                                              generator=gen)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    ours, expected = read_safetensors(path), load_file(str(path))
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    storages = {t.untyped_storage().data_ptr() for t in ours.values() if t.data_ptr() % t.element_size() == 0}
    assert len(storages) == 1  # views of one mapped file, not copies
    ours["a"] += 1  # copy-on-write: the file keeps its values
    assert torch.equal(load_file(str(path))["a"], tensors["a"])


@pytest.mark.parametrize("damage", ["header-length", "offsets"])
def test_bad_header_names_the_file(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(4, 4)}, str(path))
    data = bytearray(path.read_bytes())
    if damage == "header-length":
        data[:8] = (10 ** 9).to_bytes(8, "little")
    else:
        data = data.replace(b"[0,64]", b"[0,96]")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        read_safetensors(path)
