"""PaliGemma prompts, location tokens, detection strings, task helpers and the CLI.

The model here is a tiny random PaliGemma (its numerics are checked against transformers in
test_paligemma.py); these tests check the layout of prompts, the box conventions (expected values
worked out by hand from the documented convention: bin b <-> b / 1024 * side), and that the task
helpers and the CLI produce what the documented pipeline produces.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.image import ImageProcessing, preprocess
from models.paligemma import PaliGemma, PaliGemmaConfig
from models.tokenizer import GemmaTokenizer, tokenizer_from_vocabulary
from models.vlm_tasks import (
    Detection,
    answer,
    answer_prefix,
    bin_to_pixel,
    build_prompt,
    caption,
    detect,
    detect_prefix,
    format_detections,
    generate_text,
    loc_token,
    parse_detections,
    pixel_to_bin,
    prompt_tensors,
    seg_token,
)

CONTROL, USER, NORMAL, BYTE = 3, 4, 1, 6
WORDS = ["caption", "en", "ocr", "answer", "detect", "cat", "dog", "what", "is", "this", "red", "car"]


def paligemma_tokenizer() -> GemmaTokenizer:
    """A small vocabulary laid out like PaliGemma's: specials, text pieces, byte pieces, 1024 <loc>,
    128 <seg>, then <image>."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [CONTROL, CONTROL, CONTROL, 2]
    pieces += ["\n"]
    types += [USER]
    text = ["▁", *"abcdefghijklmnopqrstuvwxyz0123456789;?.,"] + ["▁" + w for w in WORDS]
    pieces += text
    types += [NORMAL] * len(text)
    pieces += [f"<0x{i:02X}>" for i in range(256)]
    types += [BYTE] * 256
    pieces += [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
    types += [USER] * (1024 + 128)
    pieces += ["<image>"]
    types += [CONTROL]
    return GemmaTokenizer(tokenizer_from_vocabulary(pieces, types, bos_id=2))


@pytest.fixture(scope="module")
def tokenizer():
    return paligemma_tokenizer()


def hf_style_config(vocab: int, image_token: int) -> dict:
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "image_token_index": image_token, "projection_dim": 32, "hidden_size": 32,
        "text_config": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": vocab},
        "vision_config": {"hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "num_hidden_layers": 1,
                          "image_size": 28, "patch_size": 14, "model_type": "siglip_vision_model"},
    }


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-paligemma")
    config = hf_style_config(tokenizer.vocab_size, tokenizer.token_to_id("<image>"))
    model = PaliGemma(PaliGemmaConfig.from_hf(config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "norm" in name else 0.3))
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    from models import load_model

    return load_model(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (33, 71)]):
        path = directory / f"picture{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# -- prompts ------------------------------------------------------------------------------------------------
def test_prompt_layout(tokenizer):
    image_id = tokenizer.token_to_id("<image>")
    prompt = build_prompt(tokenizer, "caption en", num_image_tokens=4, image_token_id=image_id)
    text_ids = tokenizer.encode("caption en\n", add_bos=False)
    assert prompt.input_ids == [image_id] * 4 + [tokenizer.bos_id] + text_ids
    assert tokenizer.decode(text_ids) == "caption en\n" and text_ids[-1] == tokenizer.token_to_id("\n")
    assert prompt.token_type_ids == [0] * len(prompt.input_ids) and prompt.prefix_len == len(prompt.input_ids)
    trained = build_prompt(tokenizer, "caption en", num_image_tokens=4, image_token_id=image_id, suffix="red car")
    suffix_ids = tokenizer.encode("red car", add_bos=False)
    assert trained.input_ids == prompt.input_ids + suffix_ids + [tokenizer.eos_id]
    assert trained.token_type_ids == [0] * len(prompt.input_ids) + [1] * (len(suffix_ids) + 1)
    batch = prompt_tensors([trained, prompt])
    assert batch["attention_mask"].sum(1).tolist() == [len(trained.input_ids), len(prompt.input_ids)]
    with pytest.raises(ValueError, match="newline"):
        build_prompt(tokenizer, "two\nlines", num_image_tokens=4, image_token_id=image_id)


def test_task_prefixes():
    assert detect_prefix("cat; dog") == "detect cat ; dog"
    assert detect_prefix(["red  car", "person"]) == "detect red car ; person"
    assert answer_prefix("what is  this?") == "answer en what is this?"
    assert answer_prefix("qu'est-ce ?", lang="fr") == "answer fr qu'est-ce ?"
    with pytest.raises(ValueError, match="no object"):
        detect_prefix(" ; ")
    with pytest.raises(ValueError, match="empty"):
        answer_prefix("  ")
    assert loc_token(7) == "<loc0007>" and seg_token(99) == "<seg099>"
    with pytest.raises(ValueError):
        loc_token(1024)


# -- detection strings --------------------------------------------------------------------------------------
def test_detection_string_parses_to_pixel_boxes_and_back():
    text = "<loc0256><loc0128><loc0768><loc0896> cat ; <loc0000><loc0000><loc1023><loc1023> big dog"
    out = parse_detections(text, width=640, height=480)
    assert out.unparsed == [] and len(out.detections) == 2
    cat, dog = out.detections
    # By hand: y = bin / 1024 * 480, x = bin / 1024 * 640.
    assert (cat.label, cat.x0, cat.y0, cat.x1, cat.y1) == ("cat", 80.0, 120.0, 560.0, 360.0)
    assert (dog.label, dog.x0, dog.y0) == ("big dog", 0.0, 0.0)
    assert dog.x1 == pytest.approx(1023 / 1024 * 640) and dog.y1 == pytest.approx(1023 / 1024 * 480)
    assert cat.loc == (256, 128, 768, 896)
    assert format_detections(out.detections, 640, 480) == text


def test_pixel_boxes_format_to_location_tokens():
    box = Detection(label="car", x0=80.0, y0=120.0, x1=639.9, y1=480.0, loc=(0, 0, 0, 0))
    # x1 = 639.9 of 640 -> floor(1023.84) = 1023; y1 = 480 is the far edge -> clamped to 1023.
    assert format_detections([box], 640, 480) == "<loc0256><loc0128><loc1023><loc1023> car"


@pytest.mark.parametrize("side", [37, 480, 1023, 1024, 4001])
def test_every_bin_survives_a_round_trip(side):
    assert all(pixel_to_bin(bin_to_pixel(b, side), side) == b for b in range(1024))


def test_segmentation_and_malformed_outputs():
    segs = "".join(seg_token(i) for i in range(16))
    text = f"<loc0010><loc0020><loc0030><loc0040>{segs} cat ; garbage ; <loc0001><loc0002> half"
    out = parse_detections(text, width=100, height=100)
    assert len(out.detections) == 1 and out.detections[0].segment_codes == list(range(16))
    assert out.unparsed == ["garbage", "<loc0001><loc0002> half"]
    assert format_detections(out.detections, 100, 100) == f"<loc0010><loc0020><loc0030><loc0040>{segs} cat"
    with pytest.raises(ValueError, match="positive"):
        parse_detections(text, width=0, height=10)


# -- task helpers -------------------------------------------------------------------------------------------
def manual_generation(model, tokenizer, image, prefix, steps, skip_special_tokens=True):
    """The documented pipeline step by step: SigLIP pixels, <image> x N + <bos> + prefix + \\n, generate."""
    pixels = preprocess(image, ImageProcessing.square(28))
    ids = [model.config.image_token_id] * 4 + [tokenizer.bos_id] + tokenizer.encode(prefix + "\n", add_bos=False)
    new = model.generate([ids], pixels, max_new_tokens=steps, stop_token_ids=[tokenizer.eos_id])[0]
    return tokenizer.decode([t for t in new if t != tokenizer.eos_id], skip_special_tokens=skip_special_tokens)


def test_task_helpers_follow_the_documented_pipeline(model, tokenizer, images):
    expected = manual_generation(model, tokenizer, images[0], "caption en", 8)
    assert caption(model, tokenizer, images[0], max_new_tokens=8) == expected.strip()
    assert answer(model, tokenizer, images[1], "what is this?", max_new_tokens=8) == \
        manual_generation(model, tokenizer, images[1], "answer en what is this?", 8).strip()
    # A batch of two images gives what each gives alone.
    batch = generate_text(model, tokenizer, images, ["caption en", "ocr"], max_new_tokens=8)
    assert batch == [expected, manual_generation(model, tokenizer, images[1], "ocr", 8)]
    found = detect(model, tokenizer, images[1], ["cat", "dog"], max_new_tokens=8)
    assert (found.width, found.height) == (33, 71)
    assert found.text == manual_generation(model, tokenizer, images[1], "detect cat ; dog", 8,
                                           skip_special_tokens=False)


def test_cli_runs_the_tasks(model, model_dir, tokenizer, images, capsys):
    from models.vlm_cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["caption", "--model", str(model_dir), "--max-new-tokens", "6", str(images[0])])
    assert args.func(args) == 0
    assert capsys.readouterr().out == caption(model, tokenizer, images[0], max_new_tokens=6) + "\n"
    args = parser.parse_args(["detect", "--model", str(model_dir), "--max-new-tokens", "6", str(images[1]), "cat",
                              "red car"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = detect(model, tokenizer, images[1], ["cat", "red car"], max_new_tokens=6)
    assert printed == json.loads(expected.model_dump_json())
