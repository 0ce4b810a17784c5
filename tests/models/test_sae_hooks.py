"""Hook sites on the native Gemma 1/2/3 decoders against transformers on the same tiny random weights.

Oracles: ``output_hidden_states`` for the residual stream (entry L + 1 is block L's output, except the
last entry, which transformers returns after the final norm: the last block is read with a forward
hook there); forward hooks on ``o_proj``'s input (attention) and on the post-feedforward norm's output
(MLP; the MLP's own output in Gemma 1). Edits (splice, steering) are compared with transformers
running the same edit through its own hooks, the SAE being SAELens' ``JumpReLUSAE``.

Tolerances: fp32, 1e-4 absolute on activations and logits of order 1-10 (the same math in a different
order: differences are ~1e-6, as in test_gemma.py); identical greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gemma import VOCAB, hf_model

from models import generate_ids, load_model
from models.hooks import HookError, Site, Steer, edit, record, run_to_sites, site_width, splice, steer
from models.sae import JumpReLUSAE

ATOL = 1e-4
LAYERS = 4


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def pair(request, tmp_path_factory):
    ref = hf_model(request.param, kv_heads=2, seed=21)
    directory = tmp_path_factory.mktemp(f"hooks-{request.param}")
    ref.save_pretrained(directory)
    return ref, load_model(directory)


def ids(batch=2, seq=11, seed=3):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_module(ref, site: Site):
    layer = ref.model.layers[site.layer]
    if site.kind == "res":
        return layer
    if site.kind == "att":
        return layer.self_attn.o_proj
    return getattr(layer, "post_feedforward_layernorm", None) or layer.mlp


def hf_run(ref, input_ids, edits=(), *, capture=()):
    """transformers' logits with ``edits`` ``(site, fn)`` applied by its own hooks; captured activations."""
    captured, handles = {}, []
    for site in capture:
        if site.kind == "att":
            handles.append(hf_module(ref, site).register_forward_pre_hook(
                lambda m, args, s=site: captured.__setitem__(s, args[0].clone())))
        else:
            handles.append(hf_module(ref, site).register_forward_hook(
                lambda m, a, out, s=site: captured.__setitem__(s, out.clone())))
    for site, fn in edits:
        if site.kind == "att":
            handles.append(hf_module(ref, site).register_forward_pre_hook(
                lambda m, args, fn=fn: (fn(args[0]), *args[1:])))
        else:
            handles.append(hf_module(ref, site).register_forward_hook(lambda m, a, out, fn=fn: fn(out)))
    try:
        with torch.no_grad():
            out = ref(input_ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, captured


ALL_SITES = [Site(kind, layer) for layer in range(LAYERS) for kind in ("res", "att", "mlp")]


def test_recorded_activations_equal_transformers(pair):
    ref, ours = pair
    x = ids()
    expected_out, captured = hf_run(ref, x, capture=[s for s in ALL_SITES if s.kind != "res" or s.layer == 3])
    with torch.no_grad(), record(ours, ALL_SITES) as rec:
        ours(x)
    for site in ALL_SITES:
        if site.kind == "res" and site.layer < LAYERS - 1:
            expected = expected_out.hidden_states[site.layer + 1]
        else:
            expected = captured[site]
        got = rec[site]
        width = 4 * 16 if site.kind == "att" else 64  # heads * head_dim; hidden size
        assert got.shape == expected.shape == (2, 11, width), site
        assert expected.abs().max() > 0.1, site
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m, s=site: f"{s}: {m}")


def test_no_hook_is_left_behind(pair):
    _, ours = pair
    with record(ours, ALL_SITES), steer(ours, Steer(Site("res", 1), torch.ones(64))):
        pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.modules())


def test_run_to_sites_stops_after_the_deepest_site(pair):
    _, ours = pair
    x = ids(seed=4)
    later = []
    handle = ours.model.layers[2].register_forward_pre_hook(lambda *a: later.append(1))
    try:
        got = run_to_sites(ours, x, ["att:1", "res:0", "mlp:1"])
    finally:
        handle.remove()
    assert later == []  # layer 2 never ran
    with torch.no_grad(), record(ours, ["att:1", "res:0", "mlp:1"]) as rec:
        ours(x)
    for site, value in got.items():
        torch.testing.assert_close(value, rec[site], atol=0, rtol=0)


def test_recording_during_cached_generation_equals_a_full_forward(pair):
    _, ours = pair
    prompt = ids(batch=1, seq=5, seed=6)
    with record(ours, "res:2") as rec:
        new = generate_ids(ours, prompt, max_new_tokens=6, stop_token_ids=[])[0]
    assert len(rec.calls[Site("res", 2)]) == 6  # the prefill and five decode steps
    full = torch.cat([prompt, torch.tensor([new[:-1]])], dim=1)
    with torch.no_grad(), record(ours, "res:2") as whole:
        ours(full)
    torch.testing.assert_close(rec["res:2"], whole["res:2"], atol=ATOL, rtol=0)


def saelens_sae(d_in: int, seed: int):
    """SAELens' JumpReLUSAE with random weights scaled to the activations, and the same weights in ours."""
    sae_lens = pytest.importorskip("sae_lens")
    rng = np.random.default_rng(seed)
    d_sae = 48
    arrays = {"W_enc": rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in), "W_dec": rng.standard_normal((d_sae, d_in)),
              "b_enc": rng.standard_normal(d_sae) * 0.1, "b_dec": rng.standard_normal(d_in) * 0.1,
              "threshold": rng.uniform(0, 0.5, d_sae)}
    arrays = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
    with torch.no_grad():
        for k, v in arrays.items():
            getattr(theirs, k).copy_(v)
    return JumpReLUSAE.from_tensors(arrays, source="test"), theirs


@pytest.mark.parametrize("site", [Site("res", 1), Site("att", 2), Site("mlp", 0)], ids=str)
def test_spliced_reconstruction_changes_logits_as_transformers_does(pair, site):
    ref, ours = pair
    x = ids(seed=8)
    sae, theirs = saelens_sae(site_width(ours, site), seed=9)
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, 0] = True  # position 0 keeps its clean activation (as BOS does in evaluation)

    def their_splice(act):
        return torch.cat([act[:, :1], theirs(act[:, 1:])], dim=1)

    expected, _ = hf_run(ref, x, [(site, their_splice)])
    clean, _ = hf_run(ref, x)
    with torch.no_grad(), splice(ours, site, sae, keep=keep):
        got = ours(x)
    assert (expected.logits - clean.logits).abs().max() > 0.1  # the splice matters
    torch.testing.assert_close(got, expected.logits, atol=ATOL, rtol=0)


def test_steering_strength_zero_changes_nothing(pair):
    _, ours = pair
    x = ids(batch=1, seq=6, seed=10)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    zero = Steer(Site("res", 1), direction, 0.0)
    with torch.no_grad():
        clean = ours(x)
        with steer(ours, zero):
            steered = ours(x)
    assert torch.equal(steered, clean)
    plain = generate_ids(ours, x, max_new_tokens=8, stop_token_ids=[])
    assert generate_ids(ours, x, max_new_tokens=8, stop_token_ids=[], steer=zero) == plain


def test_steering_equals_a_forward_with_the_edited_residual(pair):
    ref, ours = pair
    sae, _ = saelens_sae(64, seed=11)
    feature, strength = 5, 4.0
    s = Steer.from_sae(sae, feature, strength, site="res:1")
    x = ids(batch=1, seq=6, seed=12)
    direction = torch.from_numpy(sae.W_dec[feature].detach().numpy().copy())
    edits = [(Site("res", 1), lambda act: act + strength * direction)]
    expected, _ = hf_run(ref, x, edits)
    clean, _ = hf_run(ref, x)
    with torch.no_grad(), steer(ours, s):
        got = ours(x)
    assert (expected.logits - clean.logits).abs().max() > 0.1
    torch.testing.assert_close(got, expected.logits, atol=ATOL, rtol=0)

    # generation with the steer (prefill + cached decode steps) vs greedy by definition on transformers
    new = generate_ids(ours, x, max_new_tokens=8, stop_token_ids=[], steer=s)[0]
    seq = x[0].tolist()
    for _ in range(8):
        out, _ = hf_run(ref, torch.tensor([seq]), edits)
        seq.append(int(out.logits[0, -1].argmax()))
    assert new == seq[6:]


def test_bad_sites_and_edits_are_clear_errors(pair):
    _, ours = pair
    with pytest.raises(HookError, match="the model has 4 decoder layers"):
        with record(ours, "res:9"):
            pass
    with pytest.raises(HookError, match="site kind must be one of"):
        Site("resid", 1)
    with pytest.raises(HookError, match="cannot read a site"):
        Site.parse("layer six")
    assert Site.parse("blocks.6.attn.hook_z") == Site("att", 6) == Site.parse("model.layers.6.self_attn.o_proj.input")
    with pytest.raises(HookError, match=r"must return a tensor of shape \(2, 11, 64\)"):
        with torch.no_grad(), edit(ours, "res:0", lambda a: a[:, :3]):
            ours(ids())
    with pytest.raises(HookError, match=r"steering direction at res:0 must have shape \(64,\)"):
        with steer(ours, Steer(Site("res", 0), torch.ones(63))):
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in ours.modules())
