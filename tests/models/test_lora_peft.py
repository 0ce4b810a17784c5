"""LoRA on the native Gemma decoders against ``peft`` + transformers, and adapters in PEFT's format.

- Gradients: the same tiny random Gemma 1/2/3 (every parameter randomised) and the same LoRA factors
  (peft's, with ``init_lora_weights=False`` so B != 0) on both sides, loaded into ours with
  :func:`load_adapter`; the causal LM loss on one batch with prompt positions masked. fp32, tolerance
  1e-5 on every LoRA gradient (they are of order 1e-2..1; both sides do the same fp32 math in another
  order, ~1e-7 apart), and the loss within 1e-5.
- Our adapters load in ``peft`` on transformers' model and give our logits (1e-5), rsLoRA and
  ``modules_to_save`` included; merging into the weights changes nothing (1e-5).
- ``merge_lora`` on state dicts against its definition, and its refusals.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_gemma import VOCAB, hf_model

from models import load_model
from models.lm_loss import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy
from models.lora import (
    DEFAULT_TARGETS,
    AdapterError,
    LoraAdapter,
    LoraAdapterConfig,
    LoraLinear,
    LoraSettings,
    add_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    merge_lora_modules,
    read_adapter,
    save_adapter,
)

ATOL = 1e-5
# Merged weights are rounded to fp32 once more (W + scale * B @ A); through four layers and the softcaps
# that moves logits of order 1-10 by up to ~1e-5, so merged models are compared at 5e-5.
MERGED_ATOL = 5e-5


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 15), generator=gen)
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # a prompt without loss
    labels[1, :3] = IGNORE_INDEX
    labels[1, 12:] = IGNORE_INDEX  # and a right-padded tail
    return ids, labels


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def pair(request, tmp_path_factory):
    arch = request.param
    ref = hf_model(arch, kv_heads=1 if arch == "gemma3" else 2, seed=5)
    directory = tmp_path_factory.mktemp(f"lora-{arch}")
    ref.save_pretrained(directory)
    return arch, ref, directory


def test_lora_gradients_match_peft(pair, tmp_path):
    arch, ref, directory = pair
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = get_peft_model(copy.deepcopy(ref), config)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_model(directory)
    load_adapter(ours, tmp_path / "peft")  # peft's adapter, unmerged: our LoraLinear holds its factors
    assert len(lora_modules(ours)) == 7 * ref.config.num_hidden_layers

    ids, labels = batch()
    theirs.train()
    ours.train()
    expected = theirs(input_ids=ids, labels=labels).loss
    expected.backward()
    total, count = causal_lm_loss(ours, ids, labels)
    (total / count).backward()
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert abs((total / count).item() - expected.item()) < ATOL

    their_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(their_grads) and len(our_grads) == 2 * 7 * ref.config.num_hidden_layers
    largest = max(float(g.abs().max()) for g in their_grads.values())
    assert largest > 1e-2  # gradients of a meaningful size
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=ATOL, rtol=0, msg=name)


def test_our_adapter_loads_in_peft_and_merges(pair, tmp_path):
    arch, ref, directory = pair
    ours = load_model(directory)
    settings = LoraSettings(r=3, alpha=5, dropout=0.1, rslora=arch == "gemma2",
                            targets=["q_proj", "v_proj", "down_proj"] if arch == "gemma" else list(DEFAULT_TARGETS))
    add_lora(ours, settings, seed=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in lora_modules(ours).values():  # B = 0 after init would make any loader look right
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.3)
    save_adapter(ours, tmp_path / "ours", base_model=str(directory))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["use_rslora"] == settings.rslora

    theirs = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "ours").eval()
    ids, _ = batch(2)
    ours.eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(ids)
        base = ref(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    merge_lora_modules(ours)
    assert not lora_modules(ours) and all(type(m) is not LoraLinear for m in ours.modules())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected, atol=MERGED_ATOL, rtol=0)
    unmerged = load_model(directory)  # in eval mode: the loaded adapter's dropout (0.1) must stay off
    load_adapter(unmerged, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(unmerged(ids), expected, atol=ATOL, rtol=0)
    merged = load_model(directory)
    load_adapter(merged, tmp_path / "ours", merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), expected, atol=MERGED_ATOL, rtol=0)


def test_add_lora_targets_freezing_and_dropout():
    from models.config import GemmaConfig
    from models.gemma import GemmaLM
    from models.loading import init_random_weights

    config = GemmaConfig(architecture="gemma3", vocab_size=40, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=64, query_pre_attn_scalar=16, sliding_window=8)
    model = init_random_weights(GemmaLM(config), seed=1)
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    names = add_lora(model, LoraSettings(r=2, alpha=2, dropout=0.5, targets=r"model\.layers\.1\..*_proj",
                                         exclude=["o_proj"], trainable=["model.norm"]))
    assert names == [f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}.weight" for n in names for f in "AB"} | {"model.norm.weight"}
    assert "model.layers.1.self_attn.q_proj.weight" in model.state_dict()  # base keys unchanged
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)  # B = 0: the base model exactly
        for module in lora_modules(model).values():
            module.lora_B.weight.fill_(0.1)
        evaluated = model(ids)
        model.train()
        dropped = model(ids)
    assert (dropped - evaluated).abs().max() > 1e-3  # dropout acts in training only
    with pytest.raises(AdapterError, match="no module"):
        add_lora(init_random_weights(GemmaLM(config)), LoraSettings(targets=["nothing_here"]))
    with pytest.raises(AdapterError, match="nn.Linear"):
        add_lora(init_random_weights(GemmaLM(config)), LoraSettings(targets=["embed_tokens"]))
    with pytest.raises(AdapterError, match="already has LoRA"):
        add_lora(model)


def test_linear_cross_entropy_matches_the_definition():
    """Values and gradients (hidden and weight) against cross_entropy of the full logits, with and
    without Gemma 2's final softcap, over several chunks. fp64: agreement to rounding."""
    gen = torch.Generator().manual_seed(0)
    for softcap in (None, 3.0):
        h = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 50, (37,), generator=gen)
        ours = linear_cross_entropy(h, w, t, softcap=softcap, chunk_rows=8)
        got = torch.autograd.grad(ours * 1.7, (h, w))
        logits = h @ w.T
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        reference = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
        expected = torch.autograd.grad(reference * 1.7, (h, w))
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=0)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="targets must lie"):
        linear_cross_entropy(h, w, torch.full((37,), IGNORE_INDEX))


# -- merge_lora against its definition, on small tensors ---------------------------------------------------------
def adapter_of(tensors, **config) -> LoraAdapter:
    return LoraAdapter(directory="test-adapter", config=LoraAdapterConfig(**config), tensors=tensors)


def test_merge_definition_and_fan_in_fan_out():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(6, 3, generator=gen)
    tensors = {"base_model.model.layer.lin.lora_A.weight": a, "base_model.model.layer.lin.lora_B.weight": b}
    merged = merge_lora({"layer.lin.weight": w}, adapter_of(tensors, r=3, lora_alpha=6, target_modules=["lin"]))
    torch.testing.assert_close(merged["layer.lin.weight"], w + 2.0 * b @ a)
    rs = merge_lora({"layer.lin.weight": w}, adapter_of(tensors, r=3, lora_alpha=6, use_rslora=True,
                                                         target_modules=["lin"]))
    torch.testing.assert_close(rs["layer.lin.weight"], w + 6 / math.sqrt(3) * b @ a)
    # fan_in_fan_out: the base weight is stored (in, out), as GPT-2's Conv1D stores it.
    stored_t = w.T.contiguous()
    ff = merge_lora({"layer.lin.weight": stored_t}, adapter_of(tensors, r=3, lora_alpha=3, fan_in_fan_out=True))
    torch.testing.assert_close(ff["layer.lin.weight"], stored_t + (b @ a).T)
    # bf16 weights: computed in fp32, cast back once.
    half = merge_lora({"layer.lin.weight": w.bfloat16()}, adapter_of(tensors, r=3, lora_alpha=3))
    assert half["layer.lin.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(half["layer.lin.weight"], (w.bfloat16().float() + b @ a).bfloat16())


def test_merge_refuses_inconsistent_adapters():
    w = torch.zeros(4, 4)
    a, b = torch.ones(2, 4), torch.ones(4, 2)
    key = "base_model.model.blk.q_proj.lora_{}.weight"
    both = {key.format("A"): a, key.format("B"): b}
    with pytest.raises(AdapterError, match="target_modules"):
        merge_lora({"blk.q_proj.weight": w}, adapter_of(both, r=2, target_modules=["v_proj"]))
    with pytest.raises(AdapterError, match="not both"):
        merge_lora({"blk.q_proj.weight": w}, adapter_of({key.format("A"): a}, r=2))
    with pytest.raises(AdapterError, match="rank"):
        merge_lora({"blk.q_proj.weight": w}, adapter_of(both, r=3))
    with pytest.raises(AdapterError, match="no blk.q_proj.weight"):
        merge_lora({"other.weight": w}, adapter_of(both, r=2))
    with pytest.raises(AdapterError, match="shape"):
        merge_lora({"blk.q_proj.weight": torch.zeros(4, 5)}, adapter_of(both, r=2))
    with pytest.raises(AdapterError, match="DoRA"):
        merge_lora({"blk.q_proj.weight": w}, adapter_of({**both, "base_model.model.blk.q_proj.lora_magnitude_vector": a}, r=2))


def test_read_adapter_refuses_bad_directories(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="never loaded"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(AdapterError, match="corrupt"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA"):
        read_adapter(tmp_path)
