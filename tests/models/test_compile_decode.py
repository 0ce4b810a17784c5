"""``GemmaLM.compile_decode``: the one-token step compiled by TorchInductor against the eager step.

Tolerance: Inductor evaluates fused elementwise chains without rounding between operations (and may
reorder reductions), so the compiled hidden states differ from the eager ones by float32 rounding:
1e-4 absolute on logits of order 1-10, the model's bound against transformers. The models are int8, and
their LM head's logits outside the exactly rescored candidates come out of the int4 kernel in bf16,
where such a difference can flip one rounding: hence also 2^-7 relative (one bf16 step). Generation must give the same greedy tokens. One compilation of an int8-quantised tiny
model (about 30-60 s on two cores) is shared by the module's tests.
"""

from __future__ import annotations

import pytest
import torch

from models import GemmaConfig, GemmaLM, generate_ids
from models.gemma import CompileUnavailableError
from models.hooks import Site, Steer, steer
from models.quantize import quantize_model

CONFIG = GemmaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8)


def _random_model(seed: int = 2) -> GemmaLM:
    model = GemmaLM(CONFIG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "norm" in name else 0.1))
    return model


@pytest.fixture(scope="module")
def models():
    """Two copies of one int8-quantised model (its fused projections call torch's packed int8 and int4
    kernels, which the compiled graph must call as they are), one of them compiled."""
    eager, compiled = quantize_model(_random_model(), "int8"), quantize_model(_random_model(), "int8")
    compiled.compile_decode()
    return eager, compiled


def test_compiled_step_matches_the_eager_step_across_positions_and_windows(models):
    eager, compiled = models
    ids = torch.randint(0, 211, (2, 5), generator=torch.Generator().manual_seed(0))
    steps = []
    with torch.inference_mode():
        for model in (eager, compiled):
            model.setup_cache(2, 40)
            model.hidden_states(ids, input_pos=0)
            token = ids[:, -1:]
            out = []
            for pos in range(5, 25):  # past the sliding window of 8: the local layers' mask moves
                logits = model.decode_step(token, pos)
                out.append(logits)
                token = logits.argmax(-1, keepdim=True)
            steps.append(torch.stack(out))
    assert compiled._compiled_decode is not None
    torch.testing.assert_close(steps[1], steps[0], atol=1e-4, rtol=2 ** -7)
    assert torch.equal(steps[1].argmax(-1), steps[0].argmax(-1))


def test_a_larger_cache_compiles_afresh_and_stays_right(models):
    """The cache's sizes are static in the traced code (and module guards are skipped): a new cache
    size must give a new compiled step, not the old one run on the wrong shapes."""
    eager, compiled = models
    ids = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(3))
    before = compiled._compiled_signature
    outs = []
    with torch.inference_mode():
        for model in (eager, compiled):
            model.clear_cache()
            model.setup_cache(1, 300)
            model.hidden_states(ids, input_pos=0)
            outs.append(torch.stack([model.decode_step(ids[:, -1:], pos) for pos in range(5, 290, 41)]))
    assert compiled.cache_len == 512  # rounded up to a multiple of 256 while compiled
    assert compiled._compiled_signature != before
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=2 ** -7)
    assert torch.equal(outs[1].argmax(-1), outs[0].argmax(-1))


def test_generation_with_the_compiled_step_gives_the_eager_tokens(models):
    eager, compiled = models
    prompts = [[5, 17, 42, 9], [8, 3]]  # rows of different lengths: per-row positions
    with torch.inference_mode():
        assert generate_ids(compiled, prompts, max_new_tokens=12) == generate_ids(eager, prompts, max_new_tokens=12)


def test_a_hooked_model_decodes_eagerly_with_its_hooks(models):
    eager, compiled = models
    direction = torch.randn(CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    site = Site("res", 1)
    with torch.inference_mode():
        plain = generate_ids(compiled, [[5, 17, 42, 9]], max_new_tokens=8)
        with steer(compiled, Steer(site, direction, 8.0)):
            steered = generate_ids(compiled, [[5, 17, 42, 9]], max_new_tokens=8)
        with steer(eager, Steer(site, direction, 8.0)):
            expected = generate_ids(eager, [[5, 17, 42, 9]], max_new_tokens=8)
    assert steered == expected
    assert steered != plain  # the steering reached the decode steps


def test_compile_decode_can_be_turned_off(models):
    eager, compiled = models
    compiled.compile_decode(False)
    try:
        assert compiled._compiled_decode is None
        eager.setup_cache(1, 8), compiled.setup_cache(1, 8)
        with torch.inference_mode():
            for model in (eager, compiled):
                model.hidden_states(torch.tensor([[3, 4]]), input_pos=0)
            assert torch.equal(compiled.decode_step(torch.tensor([[5]]), 2), eager.decode_step(torch.tensor([[5]]), 2))
    finally:
        compiled.compile_decode()


def test_what_the_traced_code_depends_on_is_checked_at_every_step():
    """Module guards are skipped in the compiled step; a change of structure must compile afresh."""
    from models.gemma import _compiled_step

    model = _random_model()
    before = model._decode_signature()
    model.attention_backend = "torch"
    assert model._decode_signature() != before
    before = model._decode_signature()
    quantize_model(model, "int8")
    assert model._decode_signature() != before
    # each compiled step has a code object of its own, hence its own Dynamo cache
    first, second = _compiled_step(model), _compiled_step(model)
    assert first._torchdynamo_orig_callable.__code__ is not second._torchdynamo_orig_callable.__code__


def test_a_missing_cxx_compiler_is_a_clear_error(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(CompileUnavailableError, match="C\\+\\+ compiler"):
        _random_model().compile_decode()
