"""RecurrentGemma against Google's own PyTorch implementation (``recurrentgemma.torch``; installed by
``make install-test`` with ``--no-deps``, see pyproject.toml).

transformers and Google's code differ in two known ways, and our model follows transformers by default
with each of Google's behaviours as a setting (``RecurrentGemmaConfig``):

- ``attention_window_plus_one``: Google's local attention sees ``window + 1`` keys, transformers' ``window``;
- ``isolate_documents``: in Google's full forward, a position 0 inside a sequence stops the conv and the
  attention from looking back across it; transformers only resets the RG-LRU state.

With both settings on, our logits equal Google's (fp32, within 1e-4 as for transformers); with them
off they differ exactly where the settings matter. Weights are random, every parameter included, and
mapped by hand onto Google's parameter layout.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from test_recurrent_gemma import randomise

from models import RecurrentGemmaConfig, RecurrentGemmaLM

WINDOW = 5
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, lru_width=48, attention_window_size=WINDOW, logits_soft_cap=6.0)


def google_modules():
    """``recurrentgemma.torch.griffin`` and ``recurrentgemma.common``, imported without the package's
    ``__init__`` (which imports JAX, not a dependency here)."""
    if "recurrentgemma" not in sys.modules:
        spec = importlib.util.find_spec("recurrentgemma")
        if spec is None:
            pytest.fail("Google's recurrentgemma is not installed: "
                        "pip install --no-deps recurrentgemma==1.0.1 (make install-test does)")
        package = types.ModuleType("recurrentgemma")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = package
    from recurrentgemma import common
    from recurrentgemma.torch import griffin

    return griffin, common


def to_google(ours: RecurrentGemmaLM):
    """Google's Griffin holding our weights (its layout: conv w (taps, width), MLP up as one einsum)."""
    griffin, common = google_modules()
    c = ours.config
    kinds = {"recurrent": common.TemporalBlockType.RECURRENT, "attention": common.TemporalBlockType.ATTENTION}
    config = common.GriffinConfig(
        vocab_size=c.vocab_size, width=c.hidden_size, mlp_expanded_width=c.mlp_width, num_heads=c.num_attention_heads,
        block_types=tuple(kinds[t] for t in c.layer_types), embeddings_scale_by_sqrt_dim=True,
        attention_window_size=c.attention_window_size, logits_soft_cap=c.logits_soft_cap, lru_width=c.lru_width)
    model = griffin.Griffin(config, gradient_checkpointing=False).eval()
    ours_state = ours.state_dict()
    state = {"embedder.input_embedding": ours_state["model.embed_tokens.weight"],
             "final_norm.scale": ours_state["model.final_norm.weight"]}
    for i, kind in enumerate(c.layer_types):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        get = lambda key, src=src: ours_state[src + key]  # noqa: E731
        state[dst + "temporal_pre_norm.scale"] = get("temporal_pre_norm.weight")
        state[dst + "channel_pre_norm.scale"] = get("channel_pre_norm.weight")
        state[dst + "mlp_block.ffw_up.w"] = torch.stack([get("mlp_block.gate_proj.weight").T,
                                                         get("mlp_block.up_proj.weight").T])
        state[dst + "mlp_block.ffw_up.b"] = torch.stack([get("mlp_block.gate_proj.bias"),
                                                         get("mlp_block.up_proj.bias")])[:, None, None]
        state[dst + "mlp_block.ffw_down.weight"] = get("mlp_block.down_proj.weight")
        state[dst + "mlp_block.ffw_down.bias"] = get("mlp_block.down_proj.bias")
        if kind == "recurrent":
            block = dst + "recurrent_block."
            for name in ("linear_x", "linear_y", "linear_out"):
                for part in ("weight", "bias"):
                    state[f"{block}{name}.{part}"] = get(f"temporal_block.{name}.{part}")
            state[block + "conv_1d.w"] = get("temporal_block.conv_1d.weight")[:, 0, :].T
            state[block + "conv_1d.b"] = get("temporal_block.conv_1d.bias")
            lru = "temporal_block.rg_lru."
            state[block + "rg_lru.a_param"] = get(lru + "recurrent_param")
            state[block + "rg_lru.input_gate.w"] = get(lru + "input_gate_weight")
            state[block + "rg_lru.input_gate.b"] = get(lru + "input_gate_bias")
            state[block + "rg_lru.a_gate.w"] = get(lru + "recurrent_gate_weight")
            state[block + "rg_lru.a_gate.b"] = get(lru + "recurrent_gate_bias")
        else:
            block = dst + "attention_block."
            for ours_name, google_name in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v")):
                state[f"{block}{google_name}.weight"] = get(f"temporal_block.{ours_name}.weight")
            state[block + "proj_final.weight"] = get("temporal_block.o_proj.weight")
            state[block + "proj_final.bias"] = get("temporal_block.o_proj.bias")
    model.load_state_dict(state, strict=True)
    return model


def with_settings(model: RecurrentGemmaLM, **settings) -> RecurrentGemmaLM:
    other = RecurrentGemmaLM(model.config.replace(**settings)).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.fixture(scope="module")
def ours_and_google():
    ours = RecurrentGemmaLM(RecurrentGemmaConfig(**BASE)).eval()
    randomise(ours, seed=21)
    return ours, to_google(ours)


def google_logits(google, ids, positions):
    with torch.no_grad():
        logits, _ = google(ids, positions, return_cache=False)
    return logits


def test_window_plus_one_matches_google(ours_and_google):
    ours, google = ours_and_google
    ids = torch.randint(3, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(17)[None].expand(2, 17)
    expected = google_logits(google, ids, positions)
    with torch.no_grad():
        plus_one = with_settings(ours, attention_window_plus_one=True)(ids)
        default = ours(ids)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(plus_one, expected, atol=1e-4, rtol=0)
    # transformers' window (the default) agrees until a query has more than `window` keys behind it.
    torch.testing.assert_close(default[:, :WINDOW], expected[:, :WINDOW], atol=1e-4, rtol=0)
    assert (default[:, WINDOW:] - expected[:, WINDOW:]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("query_block", [256, 4], ids=["one-call", "query-blocks"])
def test_document_isolation_matches_google(ours_and_google, query_block, monkeypatch):
    import models.recurrent_gemma as rg

    monkeypatch.setattr(rg, "_QUERY_BLOCK", query_block)  # the CPU's blocks of queries, per-query windows each
    ours, google = ours_and_google
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(9)]),  # a document starts at index 7
                             torch.cat([torch.arange(3), torch.arange(2), torch.arange(11)])])
    expected = google_logits(google, ids, positions)
    with torch.no_grad():
        isolated = with_settings(ours, attention_window_plus_one=True, isolate_documents=True)(
            ids, position_ids=positions)
        crossing = with_settings(ours, attention_window_plus_one=True)(ids, position_ids=positions)
    torch.testing.assert_close(isolated, expected, atol=1e-4, rtol=0)
    # Without isolation the conv and attention see the previous document: different right after index 7.
    torch.testing.assert_close(crossing[0, :7], expected[0, :7], atol=1e-4, rtol=0)
    assert (crossing[0, 7:10] - expected[0, 7:10]).abs().amax(dim=-1).min() > 1e-3


def test_cached_decoding_matches_google_past_the_window(ours_and_google):
    """Google's sampler path: a prompt prefilled into its cache, then one token at a time (its cache
    holds `window` keys plus the new one, so it needs attention_window_plus_one)."""
    ours, google = ours_and_google
    plus_one = with_settings(ours, attention_window_plus_one=True)
    ids = torch.randint(3, 97, (2, 15), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(15)[None].expand(2, 15)
    with torch.no_grad():
        logits, cache = google(ids[:, :4], positions[:, :4])
        expected = [logits]
        for t in range(4, 15):
            logits, cache = google(ids[:, t:t + 1], positions[:, t:t + 1], cache)
            expected.append(logits)
        plus_one.setup_cache(2)
        got = [plus_one(ids[:, :4], input_pos=0)] + [plus_one(ids[:, t:t + 1], input_pos=t) for t in range(4, 15)]
    torch.testing.assert_close(torch.cat(got, dim=1), torch.cat(expected, dim=1), atol=1e-4, rtol=0)


def test_isolated_documents_decode_like_the_full_forward(ours_and_google):
    """With isolation on, decoding through the state (ring buffer, conv history) sees what the full
    forward sees: only the current document."""
    ours, _ = ours_and_google
    isolated = with_settings(ours, attention_window_plus_one=True, isolate_documents=True)
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    positions = torch.stack([torch.cat([torch.arange(9), torch.arange(7)]),
                             torch.cat([torch.arange(5), torch.arange(2), torch.arange(9)])])
    with torch.no_grad():
        full = isolated(ids, position_ids=positions)
        isolated.setup_cache(2)
        got = [isolated(ids[:, :6], input_pos=0, position_ids=positions[:, :6])]
        for t in range(6, 16):
            got.append(isolated(ids[:, t:t + 1], input_pos=t, position_ids=positions[:, t:t + 1]))
        isolated.setup_cache(2)
        chunks = [isolated(ids[:, :3], input_pos=0, position_ids=positions[:, :3]),
                  isolated(ids[:, 3:16], input_pos=3, position_ids=positions[:, 3:16])]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=0)
