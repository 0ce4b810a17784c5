"""SigLIP vision tower against transformers' SiglipVisionModel (eager), with and without the MAP head,
and the sigmoid loss against a direct computation of its definition.

Tolerance: fp32 features within 1e-5 absolute (features are LayerNorm outputs of order 1; both sides
do the same fp32 arithmetic in a different order, differences observed ~1e-6). A wrong scale, mask,
bias or activation moves them by > 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from models.loading import CheckpointError, assign_weights, read_hf_config, read_safetensors
from models.siglip import (
    IGNORED_CHECKPOINT_KEYS,
    SiglipVisionConfig,
    SiglipVisionModel,
    build_from_config,
    normalize_checkpoint_keys,
    sigmoid_loss,
)


def hf_vision(use_head: bool, seed: int = 0, **overrides):
    # hidden 144 over 2 heads: head_dim 72, So400m's (not a power of two); 42 px / 14 -> 9 patches.
    kw = dict(hidden_size=144, intermediate_size=100, num_hidden_layers=2, num_attention_heads=2, image_size=42,
              patch_size=14, vision_use_head=use_head)
    kw.update(overrides)
    config = transformers.SiglipVisionConfig(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every parameter, LayerNorm weights and biases included
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "norm" in name else 0.1))
    return model


def load_ours(directory) -> SiglipVisionModel:
    """What models.load_model does for a registered architecture, with this module's hooks."""
    raw = read_hf_config(directory)
    with torch.device("meta"):
        model = build_from_config(raw)
    state = normalize_checkpoint_keys(read_safetensors(directory))
    assign_weights(model, state, dtype=torch.float32, device="cpu", ignored=IGNORED_CHECKPOINT_KEYS,
                   source=str(directory))
    return model.eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("use_head", [False, True], ids=["no-head", "map-head"])
def test_tower_matches_transformers(use_head, backend, tmp_path):
    """``triton``: the Triton kernels (compiled on CUDA, interpreted here) with head_dim 72."""
    ref = hf_vision(use_head)
    ref.save_pretrained(tmp_path)
    ours = load_ours(tmp_path)
    ours.attention_backend = backend
    assert ours.config.use_head is use_head and ours.config.head_dim == 72
    pixels = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(pixel_values=pixels)
        features = ours(pixels)
    torch.testing.assert_close(features, expected.last_hidden_state, atol=1e-5, rtol=0)
    if use_head:
        with torch.no_grad():
            pooled = ours.pool(features)
        torch.testing.assert_close(pooled, expected.pooler_output, atol=1e-5, rtol=0)
    else:
        with pytest.raises(ValueError, match="no pooling head"):
            ours.pool(features)


def test_full_siglip_checkpoint_loads_its_vision_tower(tmp_path):
    """A SiglipModel checkpoint (model_type "siglip"): vision_model.* keys are loaded, the text tower
    and the loss parameters are knowingly left out."""
    vision = dict(hidden_size=64, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    text = dict(vocab_size=50, hidden_size=64, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=8)
    config = transformers.SiglipConfig(vision_config=vision, text_config=text)
    config._attn_implementation = "eager"
    ref = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path)
    ours = load_ours(tmp_path)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.vision_model(pixel_values=pixels)
        torch.testing.assert_close(ours(pixels), expected.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.image_embeds(pixels), expected.pooler_output, atol=1e-5, rtol=0)


def test_checkpoint_missing_a_key_names_it(tmp_path):
    from safetensors.torch import save_file

    ref = hf_vision(False)
    ref.save_pretrained(tmp_path)
    state = read_safetensors(tmp_path)
    del state["encoder.layers.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_ours(tmp_path)


def test_wrong_image_size_is_rejected():
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14))
    with pytest.raises(ValueError, match="28x28"):
        model(torch.zeros(1, 3, 56, 56))


def test_config_reads_every_size_and_rejects_bad_ones():
    c = SiglipVisionConfig.from_hf({"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                                    "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14})
    assert (c.num_patches, c.head_dim, c.use_head) == (729, 72, False)  # default here: PaliGemma-like
    with pytest.raises(ValueError, match="divisible"):
        SiglipVisionConfig(hidden_size=10, num_attention_heads=3)
    standalone = build_from_config({"model_type": "siglip", "vision_config": {"hidden_size": 48,
                                    "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 8}})
    assert standalone.config.use_head and standalone.config.patch_size == 16  # transformers' documented defaults


def test_sigmoid_loss_matches_its_definition():
    gen = torch.Generator().manual_seed(3)
    n, d = 5, 7
    img, txt = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    t_prime, b = math.log(10.0), -10.0 + 3.0
    # Definition: z L2-normalised, logits t * <z_img_i, z_txt_j> + b, label +1 iff i == j, loss
    # -sum over all n^2 pairs of log sigmoid(label * logit), divided by n; in float64 scalars.
    zi = [[float(v) for v in row / row.norm()] for row in img.double()]
    zt = [[float(v) for v in row / row.norm()] for row in txt.double()]
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = math.exp(t_prime) * sum(a * c for a, c in zip(zi[i], zt[j], strict=True)) + b
            label = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    expected = total / n
    got = sigmoid_loss(img, txt, t_prime, b)
    assert abs(float(got) - expected) < 1e-5 * max(1.0, abs(expected))
    # Already-normalised embeddings with normalize=False give the same loss.
    pre = sigmoid_loss(torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1),
                       torch.tensor(t_prime), torch.tensor(b), normalize=False)
    assert abs(float(pre) - expected) < 1e-5 * max(1.0, abs(expected))
    with pytest.raises(ValueError, match="both be"):
        sigmoid_loss(img, txt[:3], t_prime, b)
