"""LoRA adapters merged at load time against ``peft`` applying the same adapter at run time.

The base model is a tiny random transformers ColPaliForRetrieval; ``peft.get_peft_model`` wraps it with
a LoRA adapter whose B factors are random (``init_lora_weights=False``: peft's default B = 0 would make
any merge look right). The adapter is saved with ``save_pretrained`` and loaded by ours with the base
checkpoint. Tolerance 1e-5 as in test_colpali.py (same fp32 arithmetic, merged vs unmerged order).

The adapter is tested as peft writes it for transformers' module names (``vlm.*``) and renamed to the
names of vidore's published adapters (``model.language_model.model.*``, ``custom_text_proj``) over a
base checkpoint in colpali-engine's layout.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_colpali import hf_colpali, paligemma_tokenizer, save_colpali

from vision_rag.colpali import ColPaliEmbedder

ATOL = 1e-5
QUERIES = ["what is the total", "red circle chart"]
HF_TARGETS = r"(.*(language_model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(embedding_proj_layer).*$)"
ENGINE_TARGETS = r"(.*(language_model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)"


@pytest.fixture(scope="module")
def tokenizer():
    return paligemma_tokenizer()


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory):
    model = hf_colpali(tokenizer, seed=4)
    root = tmp_path_factory.mktemp("base")
    dirs = {layout: save_colpali(model, tokenizer, root / layout, layout) for layout in ("hf", "engine")}
    return model, dirs


@pytest.fixture(scope="module")
def pixel_values():
    return torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(9)) * 2 - 1


def peft_model(base_model, seed: int, **lora):
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.1, target_modules=HF_TARGETS, **lora)
    return get_peft_model(copy.deepcopy(base_model), config).eval()


def to_engine_names(adapter_dir, out_dir):
    """Rename a peft adapter of transformers' ColPali to the names vidore's adapters use."""
    out_dir.mkdir()
    renamed = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        key = key.replace("base_model.model.vlm.language_model.", "base_model.model.model.language_model.model.")
        key = key.replace("base_model.model.embedding_proj_layer.", "base_model.model.custom_text_proj.")
        renamed[key] = tensor
    assert any("custom_text_proj.lora_B" in k for k in renamed)
    save_file(renamed, str(out_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["target_modules"] = ENGINE_TARGETS
    for field in ("rank_pattern", "alpha_pattern"):
        config[field] = {k.replace("embedding_proj_layer", "custom_text_proj"): v for k, v in config[field].items()}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return out_dir


def reference_embeddings(model, embedder, pixel_values):
    pages = dict(input_ids=torch.tensor([embedder.page_input_ids()] * 2), pixel_values=pixel_values)
    pages["attention_mask"] = torch.ones_like(pages["input_ids"])
    queries = embedder.query_batch(QUERIES)
    with torch.no_grad():
        out = [model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).embeddings for batch in (pages, queries)]
    return pages, queries, out


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=3, use_rslora=True),
                                  dict(r=4, lora_alpha=8, rank_pattern={"embedding_proj_layer": 2},
                                       alpha_pattern={"q_proj": 5})], ids=["plain", "rslora", "patterns"])
@pytest.mark.parametrize("names", ["transformers", "colpali-engine"])
def test_merged_adapter_matches_peft(base, tokenizer, pixel_values, tmp_path, lora, names):
    base_model, dirs = base
    wrapped = peft_model(base_model, seed=11, **lora)
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in load_file(str(adapter / "adapter_model.safetensors")).items())
    if names == "colpali-engine":
        adapter, source = to_engine_names(adapter, tmp_path / "engine-adapter"), dirs["engine"]
    else:
        source = dirs["hf"]
    ours = ColPaliEmbedder.load(source, adapter=adapter)
    plain = ColPaliEmbedder.load(source)
    assert ours.model_id != plain.model_id  # the merged model is another model

    pages, queries, (expected_pages, expected_queries) = reference_embeddings(wrapped, ours, pixel_values)
    with torch.no_grad():
        got_pages = ours.model(**pages)
        got_queries = ours.model(**queries)
        unmerged = plain.model(**pages)
    torch.testing.assert_close(got_pages, expected_pages, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_queries, expected_queries, atol=ATOL, rtol=0)
    assert (unmerged - expected_pages).abs().max() > 1e-2  # the adapter changes the embeddings


def test_adapter_directory_alone_finds_its_local_base(base, tmp_path):
    base_model, dirs = base
    wrapped = peft_model(base_model, seed=12, r=2, lora_alpha=2)
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(dirs["hf"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert ColPaliEmbedder.load(adapter).model_id == ColPaliEmbedder.load(dirs["hf"], adapter=adapter).model_id
    config["base_model_name_or_path"] = "vidore/colpaligemma-3b-pt-448-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="not a local directory"):
        ColPaliEmbedder.load(adapter)
