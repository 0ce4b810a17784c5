"""``gemma-ground caption|ocr|answer|detect --model SOURCE IMAGE [QUESTION | OBJECTS]``: PaliGemma tasks.

Thin: parses arguments and calls :mod:`models.vlm_tasks`. ``detect`` prints its boxes as JSON
(a :class:`~models.vlm_tasks.DetectionOutput`); the others print text.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["register"]


def _common(parser) -> None:
    parser.add_argument("--model", required=True, help="PaliGemma checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer source if not in the model directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("image", help="image file (PNG, JPEG, WebP, GIF, TIFF, BMP ...)")


def register(sub) -> None:
    p = sub.add_parser("caption", help="describe an image with PaliGemma")
    _common(p)
    p.add_argument("--lang", default="en", help="caption language code (default en)")
    p.set_defaults(func=_cmd_caption)

    p = sub.add_parser("ocr", help="read the text in an image with PaliGemma")
    _common(p)
    p.set_defaults(func=_cmd_ocr)

    p = sub.add_parser("answer", help="answer a question about an image with PaliGemma")
    _common(p)
    p.add_argument("question", help="the question")
    p.add_argument("--lang", default="en", help="answer language code (default en)")
    p.set_defaults(func=_cmd_answer)

    p = sub.add_parser("detect", help="find objects in an image with PaliGemma; prints boxes as JSON")
    _common(p)
    p.add_argument("objects", nargs="+", help="object names, e.g. cat dog, or 'red car ; person'")
    p.set_defaults(func=_cmd_detect)


def _load(args):
    from .image import ImageProcessing
    from .loading import load_model
    from .paligemma import PaliGemma
    from .tokenizer import load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if not isinstance(model, PaliGemma):
        raise ValueError(f"{args.model}: this is a {type(model).__name__}, not a PaliGemma checkpoint")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    source = Path(args.model)
    size = model.config.image_size
    processing = ImageProcessing.from_pretrained(source, default_size=size) if source.is_dir() else \
        ImageProcessing.square(size)
    return model, tokenizer, dict(processing=processing, max_new_tokens=args.max_new_tokens)


def _print(text: str) -> int:
    sys.stdout.write(text + "\n")
    return 0


def _cmd_caption(args) -> int:
    from .vlm_tasks import caption

    model, tokenizer, settings = _load(args)
    return _print(caption(model, tokenizer, args.image, lang=args.lang, **settings))


def _cmd_ocr(args) -> int:
    from .vlm_tasks import ocr

    model, tokenizer, settings = _load(args)
    return _print(ocr(model, tokenizer, args.image, **settings))


def _cmd_answer(args) -> int:
    from .vlm_tasks import answer

    model, tokenizer, settings = _load(args)
    return _print(answer(model, tokenizer, args.image, args.question, lang=args.lang, **settings))


def _cmd_detect(args) -> int:
    from .vlm_tasks import detect

    labels = [part for arg in args.objects for part in arg.split(";")]
    model, tokenizer, settings = _load(args)
    return _print(detect(model, tokenizer, args.image, labels, **settings).model_dump_json(indent=2))
