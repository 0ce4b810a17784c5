"""JumpReLU SAE files against SAELens (the oracle), for Gemma Scope's params.npz, Gemma Scope 2's
params.safetensors and SAELens directories.

SAELens reads Gemma Scope files through its own Gemma Scope loaders; only their Hugging Face download
(and, for Gemma Scope 2, the remote read of a safetensors header) is replaced by the local file, so the
key mapping and config (e.g. ``apply_b_dec_to_input=False``) are SAELens' own. Tolerance: fp32 encode and
decode within 1e-6 absolute (same operations; values of order 1-10). bf16: both sides run the same bf16
operations, so they must agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.hooks import Site
from models.sae import JumpReLUSAE, SAEError, load_sae

D_IN, D_SAE = 24, 40
GS_FOLDER = "layer_3/width_16k/average_l0_50"
GS2_FOLDER = "resid_post/layer_5_width_16k_l0_medium"


def random_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"W_enc": rng.standard_normal((D_IN, D_SAE)) / np.sqrt(D_IN),
              "W_dec": rng.standard_normal((D_SAE, D_IN)),
              "b_enc": rng.standard_normal(D_SAE) * 0.3,
              "b_dec": rng.standard_normal(D_IN),
              "threshold": rng.uniform(0.0, 1.2, D_SAE)}
    return {k: v.astype(np.float32) for k, v in arrays.items()}  # Gemma Scope stores fp32


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.fixture(scope="module")
def saelens():
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders

    return sae_lens, pretrained_sae_loaders


def saelens_from_hub_layout(saelens, monkeypatch, root: Path, repo_id: str, folder: str, loader_name: str,
                            dtype: str = "float32"):
    """SAELens' own pretrained loader, reading ``root/repo_id/...`` instead of downloading."""
    sae_lens, loaders = saelens

    def local_download(repo_id, filename, subfolder=None, **_):
        return str(root / repo_id / (subfolder or "") / filename)

    def local_shapes(repo_id, filename):
        with safe_open(str(root / repo_id / filename), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    monkeypatch.setattr(loaders, "hf_hub_download", local_download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", local_shapes)
    loader = getattr(loaders, loader_name)

    def converter(repo_id, folder_name, device, force_download, cfg_overrides):
        # the Gemma Scope loaders take d_in from the model name; ours is a tiny random SAE
        return loader(repo_id, folder_name, device, force_download, {**cfg_overrides, "d_in": D_IN, "d_sae": D_SAE})

    sae, _, _ = sae_lens.SAE.from_pretrained_with_cfg_and_sparsity(repo_id, folder, dtype=dtype, converter=converter)
    return sae.eval()


def assert_same_sae(ours: JumpReLUSAE, theirs, atol: float = 1e-6) -> None:
    x = inputs().to(ours.dtype)
    with torch.no_grad():
        acts, expected_acts = ours.encode(x), theirs.encode(x)
        active = (expected_acts > 0).float().mean()
        assert 0.1 < active < 0.9, active  # the thresholds really cut
        torch.testing.assert_close(acts, expected_acts, atol=atol, rtol=0)
        torch.testing.assert_close(ours.decode(expected_acts), theirs.decode(expected_acts), atol=atol, rtol=0)
        torch.testing.assert_close(ours(x), theirs(x), atol=atol, rtol=0)


@pytest.fixture
def gemma_scope_npz(tmp_path):
    repo = tmp_path / "local" / "gemma-scope-2b-pt-res"
    (repo / GS_FOLDER).mkdir(parents=True)
    np.savez(repo / GS_FOLDER / "params.npz", **random_arrays(1))
    return tmp_path, "local/gemma-scope-2b-pt-res", repo / GS_FOLDER


@pytest.fixture
def gemma_scope_2(tmp_path):
    repo = tmp_path / "local" / "gemma-scope-2-270m-pt"
    folder = repo / GS2_FOLDER
    folder.mkdir(parents=True)
    arrays = random_arrays(2)
    save_file({k.lower(): torch.from_numpy(v) for k, v in arrays.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.5.output"}))
    return tmp_path, "local/gemma-scope-2-270m-pt", folder


def test_gemma_scope_npz_matches_saelens(saelens, monkeypatch, gemma_scope_npz):
    root, repo_id, folder = gemma_scope_npz
    theirs = saelens_from_hub_layout(saelens, monkeypatch, root, repo_id, GS_FOLDER, "gemma_2_sae_huggingface_loader")
    assert theirs.cfg.apply_b_dec_to_input is False
    ours = load_sae(folder / "params.npz")
    assert ours.site == Site("res", 3)  # read from Gemma Scope's repo / folder layout
    assert_same_sae(ours, theirs)
    assert load_sae(folder).site == Site("res", 3)  # the directory works too


def test_gemma_scope_2_safetensors_matches_saelens(saelens, monkeypatch, gemma_scope_2):
    root, repo_id, folder = gemma_scope_2
    theirs = saelens_from_hub_layout(saelens, monkeypatch, root, repo_id, GS2_FOLDER, "gemma_3_sae_huggingface_loader")
    ours = load_sae(folder)
    assert ours.site == Site("res", 5)  # from config.json's hf_hook_point_in
    assert_same_sae(ours, theirs)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_directory_matches_saelens(saelens, tmp_path, apply_b_dec):
    sae_lens, _ = saelens
    cfg = sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec)
    cfg.metadata.hook_name = "blocks.2.attn.hook_z"
    theirs = sae_lens.JumpReLUSAE(cfg)
    with torch.no_grad():
        for name, value in random_arrays(3).items():
            getattr(theirs, name).copy_(torch.from_numpy(value))
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert ours.apply_b_dec_to_input is apply_b_dec and ours.site == Site("att", 2)
    assert_same_sae(ours, theirs)
    assert_same_sae(ours, sae_lens.SAE.load_from_disk(tmp_path))


def test_bf16_equals_saelens_bf16(saelens, monkeypatch, gemma_scope_2):
    root, repo_id, folder = gemma_scope_2
    theirs = saelens_from_hub_layout(saelens, monkeypatch, root, repo_id, GS2_FOLDER, "gemma_3_sae_huggingface_loader",
                                     dtype="bfloat16")
    ours = load_sae(folder, dtype="bfloat16")
    assert ours.W_enc.dtype == theirs.W_enc.dtype == torch.bfloat16
    assert_same_sae(ours, theirs, atol=0)


def test_saved_directory_loads_in_saelens_and_back(saelens, tmp_path):
    sae_lens, _ = saelens
    ours = JumpReLUSAE.from_tensors(random_arrays(4), source="test", site=Site("mlp", 7),
                                    metadata={"model_name": "tiny"})
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.metadata.hook_name == "blocks.7.hook_mlp_out"
    assert_same_sae(ours, theirs)
    again = load_sae(tmp_path)
    assert again.site == Site("mlp", 7) and again.metadata["model_name"] == "tiny"
    assert_same_sae(again, theirs)
    assert not list(tmp_path.glob("*.partial"))


def test_encode_is_the_spec_formula():
    """Strict ``>``: a pre-activation exactly at its threshold stays off; ``relu`` keeps negative
    thresholds from passing negative values."""
    arrays = random_arrays(5)
    arrays["threshold"][:] = 0.5
    arrays["threshold"][0] = -1.0
    sae = JumpReLUSAE.from_tensors(arrays, source="test")
    x = torch.zeros(1, D_IN)
    with torch.no_grad():
        sae.b_enc[:3] = torch.tensor([0.5, 0.5000001, -0.5])
        acts = sae.encode(x)[0]
    assert acts[0] == 0.5 and acts[1] == pytest.approx(0.5000001) and acts[2] == 0.0
    sae.b_enc.data[0] = -0.25  # above a negative threshold, below zero: relu gives 0
    assert sae.encode(x)[0, 0] == 0.0


# -- bad files ------------------------------------------------------------------------------------
def test_pickled_npz_is_refused_not_unpickled(tmp_path):
    arrays = random_arrays(6)
    arrays["threshold"] = np.array([object()] * D_SAE, dtype=object)
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(SAEError, match="without unpickling"):
        load_sae(tmp_path / "params.npz")


def test_missing_and_misshapen_arrays_are_named(tmp_path):
    arrays = random_arrays(7)
    del arrays["b_dec"]
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(SAEError, match=r"missing array\(s\) b_dec"):
        load_sae(tmp_path / "params.npz")
    arrays = random_arrays(7)
    arrays["threshold"] = arrays["threshold"][:-1]
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(SAEError, match=r"threshold \(39,\) \(expected \(40,\)\)"):
        load_sae(tmp_path / "params.npz")


def test_truncated_and_foreign_files_are_clear_errors(tmp_path, gemma_scope_2):
    _, _, folder = gemma_scope_2
    f = folder / "params.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SAEError, match="not a readable safetensors file"):
        load_sae(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="no SAE here"):
        load_sae(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nope.npz")


def test_transcoders_and_other_architectures_are_refused(tmp_path, gemma_scope_2):
    _, _, folder = gemma_scope_2
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hf_hook_point_out"] = "model.layers.5.post_feedforward_layernorm.output"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="a transcoder"):
        load_sae(folder)
    JumpReLUSAE.from_tensors(random_arrays(8), source="test").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(SAEError, match="'topk' is not a JumpReLU SAE"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEError, match="normalize_activations='layer_norm' is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match="cfg.json: not valid JSON"):
        load_sae(tmp_path)


def test_nan_weights_are_refused():
    arrays = random_arrays(9)
    arrays["W_dec"][3, 4] = np.nan
    with pytest.raises(SAEError, match="W_dec holds NaN"):
        JumpReLUSAE.from_tensors(arrays, source="x")
