"""PaliGemma prompts and outputs: captioning, OCR, visual question answering, detection.

A prompt is ``<image>`` x N (one per SigLIP patch) + ``<bos>`` + task prefix + ``\\n``; everything in it
is the bidirectional prefix (token type 0). A training target (suffix) follows with ``<eos>`` and is
causal (token type 1). Task prefixes: ``caption en``, ``ocr``, ``answer en {question}``,
``question en``, ``detect {a} ; {b}``, ``segment {x}``.

Locations are the tokenizer's ``<loc0000>`` .. ``<loc1023>``: bins of 1/1024 of the image side, four per
box in the order y0, x0, y1, x1. A detection output is ``<locY0><locX0><locY1><locX1> label``, boxes
separated by `` ; ``. Convention used both ways here: bin ``b`` maps to ``b / 1024 * side`` pixels,
and a pixel coordinate ``c`` to ``floor(c / side * 1024)`` clamped to 0..1023, so a string survives
parse -> format unchanged. Segmentation outputs add 16 ``<segNNN>`` codes after the box (codes of
PaliGemma's mask VQ-VAE); they are parsed and kept, not decoded into masks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field

from .image import ImageProcessing, ImageSource, load_images

__all__ = ["IMAGE_TOKEN", "NUM_LOC_BINS", "NUM_SEG_CODES", "loc_token", "seg_token", "PaliGemmaPrompt",
           "build_prompt", "caption_prefix", "ocr_prefix", "answer_prefix", "detect_prefix", "segment_prefix",
           "Detection", "DetectionOutput", "parse_detections", "format_detections", "pixel_to_bin", "bin_to_pixel",
           "generate_text", "caption", "ocr", "answer", "detect", "prompt_tensors"]

IMAGE_TOKEN = "<image>"
NUM_LOC_BINS = 1024  # <loc0000> .. <loc1023>
NUM_SEG_CODES = 128  # <seg000> .. <seg127>
SEG_CODES_PER_MASK = 16


def loc_token(bin_index: int) -> str:
    if not 0 <= bin_index < NUM_LOC_BINS:
        raise ValueError(f"location bin must be in 0..{NUM_LOC_BINS - 1}, got {bin_index}")
    return f"<loc{bin_index:04d}>"


def seg_token(code: int) -> str:
    if not 0 <= code < NUM_SEG_CODES:
        raise ValueError(f"segmentation code must be in 0..{NUM_SEG_CODES - 1}, got {code}")
    return f"<seg{code:03d}>"


def pixel_to_bin(coordinate: float, side: float) -> int:
    """The location bin of a pixel coordinate along a side of ``side`` pixels."""
    if side <= 0:
        raise ValueError(f"image side must be > 0, got {side}")
    # The small epsilon keeps bin_to_pixel's float products (b / 1024 * side) from landing a hair
    # below their own bin.
    return min(NUM_LOC_BINS - 1, max(0, math.floor(coordinate / side * NUM_LOC_BINS + 1e-6)))


def bin_to_pixel(bin_index: int, side: float) -> float:
    return bin_index / NUM_LOC_BINS * side


# -- prompts -----------------------------------------------------------------------------------------------
def caption_prefix(lang: str = "en") -> str:
    return f"caption {lang}"


def ocr_prefix() -> str:
    return "ocr"


def answer_prefix(question: str, lang: str = "en") -> str:
    question = " ".join(question.split())
    if not question:
        raise ValueError("the question is empty")
    return f"answer {lang} {question}"


def _labels(labels: str | Sequence[str]) -> list[str]:
    items = labels.split(";") if isinstance(labels, str) else list(labels)
    items = [" ".join(x.split()) for x in items]
    items = [x for x in items if x]
    if not items:
        raise ValueError("no object names given to detect")
    for x in items:
        if "<" in x or ";" in x:
            raise ValueError(f"object name {x!r} may not contain '<' or ';'")
    return items


def detect_prefix(labels: str | Sequence[str]) -> str:
    """``detect cat ; dog`` for ``["cat", "dog"]`` or ``"cat; dog"``."""
    return "detect " + " ; ".join(_labels(labels))


def segment_prefix(label: str) -> str:
    return "segment " + _labels(label)[0]


class PaliGemmaPrompt(BaseModel):
    """Token ids of one prompt and their PaliGemma token types (0 = bidirectional prefix, 1 = suffix)."""

    input_ids: list[int]
    token_type_ids: list[int]

    @property
    def prefix_len(self) -> int:
        return self.token_type_ids.count(0)


def build_prompt(tokenizer, prefix: str, *, num_image_tokens: int, image_token_id: int, suffix: str | None = None,
                 num_images: int = 1) -> PaliGemmaPrompt:
    """``<image>`` x (num_image_tokens * num_images) + ``<bos>`` + prefix + ``\\n`` [+ suffix + ``<eos>``]."""
    if "\n" in prefix:
        raise ValueError("the prefix may not contain a newline: PaliGemma ends the prefix with one")
    prefix_ids = ([image_token_id] * (num_image_tokens * num_images) + [tokenizer.bos_id]
                  + list(tokenizer.encode(prefix + "\n", add_bos=False)))
    suffix_ids = []
    if suffix is not None:
        suffix_ids = list(tokenizer.encode(suffix, add_bos=False)) + [tokenizer.eos_id]
    return PaliGemmaPrompt(input_ids=prefix_ids + suffix_ids,
                           token_type_ids=[0] * len(prefix_ids) + [1] * len(suffix_ids))


# -- detection outputs ----------------------------------------------------------------------------------------
class Detection(BaseModel):
    """One labelled box in pixels of the original image (x to the right, y down)."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    loc: tuple[int, int, int, int] = Field(description="the model's bins, in its order y0, x0, y1, x1")
    segment_codes: list[int] | None = Field(None, description="the 16 <seg> codes of a segmentation output")


class DetectionOutput(BaseModel):
    """Parsed boxes, plus the fragments of the text that were not a box (nothing is dropped silently)."""

    width: int
    height: int
    detections: list[Detection]
    unparsed: list[str] = Field(default_factory=list)
    text: str = ""


_BOX = re.compile(r"^((?:<loc\d{4}>){4})((?:<seg\d{3}>)*)\s*(.*)$", re.DOTALL)
_NUMBER = re.compile(r"\d+")


def parse_detections(text: str, width: int, height: int) -> DetectionOutput:
    """Parse ``<loc..>x4 [<seg..>x16] label ; ...`` into boxes on an image of ``width`` x ``height`` pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    detections, unparsed = [], []
    for chunk in text.split(";"):
        chunk = chunk.strip()
        if not chunk:
            continue
        match = _BOX.match(chunk)
        segs = [int(n) for n in _NUMBER.findall(match.group(2))] if match else []
        if match is None or (segs and len(segs) != SEG_CODES_PER_MASK):
            unparsed.append(chunk)
            continue
        y0, x0, y1, x1 = (int(n) for n in _NUMBER.findall(match.group(1)))
        if any(b >= NUM_LOC_BINS for b in (y0, x0, y1, x1)) or any(s >= NUM_SEG_CODES for s in segs):
            unparsed.append(chunk)
            continue
        detections.append(Detection(label=match.group(3).strip(), x0=bin_to_pixel(x0, width),
                                    y0=bin_to_pixel(y0, height), x1=bin_to_pixel(x1, width),
                                    y1=bin_to_pixel(y1, height), loc=(y0, x0, y1, x1),
                                    segment_codes=segs or None))
    return DetectionOutput(width=width, height=height, detections=detections, unparsed=unparsed, text=text)


def format_detections(detections: Sequence[Detection], width: int, height: int) -> str:
    """The model's output string for boxes: locations recomputed from the pixel coordinates."""
    parts = []
    for d in detections:
        bins = (pixel_to_bin(d.y0, height), pixel_to_bin(d.x0, width), pixel_to_bin(d.y1, height),
                pixel_to_bin(d.x1, width))
        segs = "".join(seg_token(c) for c in d.segment_codes or [])
        parts.append("".join(loc_token(b) for b in bins) + segs + " " + d.label)
    return " ; ".join(parts)


# -- generation ---------------------------------------------------------------------------------------------
def _processing_for(model, processing: ImageProcessing | None) -> ImageProcessing:
    if processing is not None:
        return processing
    return ImageProcessing.square(model.config.image_size)


def _generate(model, tokenizer, images: Sequence[ImageSource], prefixes: Sequence[str], *,
              processing: ImageProcessing | None, skip_special_tokens: bool, **settings):
    if len(images) == 1 and len(prefixes) > 1:
        images = list(images) * len(prefixes)
    if len(images) != len(prefixes):
        raise ValueError(f"{len(images)} images for {len(prefixes)} prompts: give one image per prompt (or one)")
    pixel_values, sizes = load_images(images, _processing_for(model, processing))
    config = model.config
    prompts = [build_prompt(tokenizer, p, num_image_tokens=config.num_image_tokens,
                            image_token_id=config.image_token_id).input_ids for p in prefixes]
    stops = settings.pop("stop_token_ids", None)
    if stops is None:
        stops = sorted({tokenizer.eos_id, *config.text.eos_token_ids})
    outputs = model.generate(prompts, pixel_values.to(model.dtype), stop_token_ids=stops, **settings)
    texts = [tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=skip_special_tokens)
             for ids in outputs]
    return texts, sizes


def generate_text(model, tokenizer, images: ImageSource | Sequence[ImageSource], prefixes: str | Sequence[str], *,
                  processing: ImageProcessing | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop_token_ids: Sequence[int] | None = None) -> str | list[str]:
    """Generate after ``prefix`` for each image (one prefix: returns a string; a list: a list).

    ``images``: paths, bytes or PIL images (one, or one per prefix). ``processing`` defaults to SigLIP's
    (bicubic, mean = std = 0.5) at the model's image size; pass the checkpoint's own with
    :meth:`ImageProcessing.from_pretrained`.
    """
    single = isinstance(prefixes, str)
    image_list = [images] if not isinstance(images, (list, tuple)) else list(images)
    texts, _ = _generate(model, tokenizer, image_list, [prefixes] if single else list(prefixes),
                         processing=processing, skip_special_tokens=True, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)
    return texts[0] if single else texts


def caption(model, tokenizer, image: ImageSource, *, lang: str = "en", **kwargs) -> str:
    """A caption of the image (``caption {lang}``)."""
    return generate_text(model, tokenizer, image, caption_prefix(lang), **kwargs).strip()


def ocr(model, tokenizer, image: ImageSource, **kwargs) -> str:
    """The text in the image (``ocr``)."""
    return generate_text(model, tokenizer, image, ocr_prefix(), **kwargs).strip()


def answer(model, tokenizer, image: ImageSource, question: str, *, lang: str = "en", **kwargs) -> str:
    """The answer to a question about the image (``answer {lang} {question}``)."""
    return generate_text(model, tokenizer, image, answer_prefix(question, lang), **kwargs).strip()


def detect(model, tokenizer, image: ImageSource, labels: str | Sequence[str], *,
           processing: ImageProcessing | None = None, max_new_tokens: int = 64, **kwargs) -> DetectionOutput:
    """Boxes of the named objects (``detect a ; b``) in pixels of the original (EXIF-oriented) image."""
    texts, sizes = _generate(model, tokenizer, [image], [detect_prefix(labels)], processing=processing,
                             skip_special_tokens=False, max_new_tokens=max_new_tokens, **kwargs)
    width, height = sizes[0]
    return parse_detections(texts[0], width, height)


def prompt_tensors(prompts: Sequence[PaliGemmaPrompt], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``token_type_ids`` and ``attention_mask`` for a batch of prompts."""
    longest = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    types = torch.ones((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, :n] = torch.tensor(p.input_ids)
        types[i, :n] = torch.tensor(p.token_type_ids)
        mask[i, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
