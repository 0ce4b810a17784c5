"""Images in, SigLIP pixel values out: loading with Pillow, mode conversion, resizing, normalising.

The arithmetic follows transformers' PIL-based SigLIP image processor step for step, so pixel values
are identical to it: convert to RGB (transparency composited onto white), resize the uint8 RGB image
with Pillow to the model's square size (the checkpoint's resampling filter, bicubic by default),
rescale in float64 and cast to float32, then ``(x - mean) / std`` in float32 (mean = std = 0.5 for
SigLIP, so values lie in [-1, 1]).

Two deliberate differences from reading an image with ``PIL.Image.open`` and passing it on:
:func:`load_image` applies the EXIF orientation (a photo taken sideways is seen upright), and
16-bit / 32-bit grey images (``I;16``, ``I``, ``F`` modes) are scaled down to 8 bits instead of
being clipped at 255 (which turns most of such an image white).

Loading is guarded: images larger than :data:`MAX_IMAGE_PIXELS` are refused before they are decoded
(decompression bombs), and every unreadable input raises :class:`ImageError` naming the file and why.
:func:`load_image` reads one image (or one frame of a multi-page TIFF), :func:`load_frames` every frame;
both convert exactly alike, so page ingestion and the models see the same pixels.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ImageError", "ImageProcessing", "MAX_IMAGE_PIXELS", "load_image", "load_frames", "to_rgb",
           "preprocess", "load_images", "ImageSource"]

# Decoded images above this many pixels are refused unless a caller passes a larger max_pixels.
# The value is Pillow's own default warning threshold (about 89.5 megapixels: a 9459 x 9459 image,
# ~268 MB as RGB), written out so the limit does not depend on a global another library may change.
MAX_IMAGE_PIXELS = 89_478_485

ImageSource = str | os.PathLike | bytes | Image.Image

# Pillow's filter codes as written in preprocessor_config.json ("resample": 3 is bicubic).
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class ImageError(ValueError):
    """An image that cannot be used: names the file (or input) and says why."""


class ImageProcessing(BaseModel):
    """How a model wants its images (the fields of a Hugging Face ``preprocessor_config.json``)."""

    model_config = ConfigDict(extra="ignore")

    height: int = Field(224, ge=1)
    width: int = Field(224, ge=1)
    resample: int = 3  # Pillow filter code: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])

    @field_validator("resample")
    @classmethod
    def _known_filter(cls, value: int) -> int:
        if value not in _RESAMPLE_NAMES:
            raise ValueError(f"resample must be a Pillow filter code {sorted(_RESAMPLE_NAMES)}, got {value}")
        return value

    @field_validator("image_mean", "image_std", mode="before")
    @classmethod
    def _per_channel(cls, value):
        if isinstance(value, (int, float)):
            value = [float(value)] * 3
        if len(value) != 3:
            raise ValueError(f"need one value per RGB channel (3), got {value}")
        return value

    @field_validator("image_std")
    @classmethod
    def _nonzero(cls, value: list[float]) -> list[float]:
        if any(v == 0 for v in value):
            raise ValueError(f"image_std must not contain 0, got {value}")
        return value

    @classmethod
    def square(cls, size: int, **overrides) -> ImageProcessing:
        return cls(height=size, width=size, **overrides)

    @classmethod
    def from_preprocessor_config(cls, raw: dict, *, default_size: int | None = None) -> ImageProcessing:
        """From a parsed ``preprocessor_config.json`` (``size`` as ``{"height", "width"}``, an int or
        ``shortest_edge``; ``null`` flags mean the processor's defaults)."""
        fields = {k: v for k, v in raw.items() if v is not None and k in cls.model_fields}
        size = raw.get("size")
        if isinstance(size, dict) and "height" in size and "width" in size:
            fields.update(height=size["height"], width=size["width"])
        elif isinstance(size, dict) and "shortest_edge" in size:
            fields.update(height=size["shortest_edge"], width=size["shortest_edge"])
        elif isinstance(size, int):
            fields.update(height=size, width=size)
        elif default_size is not None:
            fields.update(height=default_size, width=default_size)
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, default_size: int | None = None) -> ImageProcessing:
        """From ``preprocessor_config.json`` in a checkpoint directory; SigLIP defaults at
        ``default_size`` when the directory has none."""
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            return cls.square(default_size) if default_size else cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_preprocessor_config(raw, default_size=default_size)
        except (json.JSONDecodeError, ValidationError, TypeError) as e:
            raise ValueError(f"{path}: not a usable image preprocessor config ({e})") from None


def _name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return "<image>"


def load_image(source: ImageSource, *, max_pixels: int | None = MAX_IMAGE_PIXELS, frame: int = 0) -> Image.Image:
    """Open and fully decode an image (path, bytes or PIL image) as RGB with its EXIF orientation applied;
    ``frame`` picks a page of a multi-page file (TIFF).

    Raises :class:`ImageError` naming the file for a missing or empty file, data that is not an image,
    a truncated or corrupt image, a frame the file does not have, or one with more than ``max_pixels``
    pixels (``None``: no limit of ours; Pillow still refuses images over twice its own limit).
    """
    name = _name(source)
    image = source if isinstance(source, Image.Image) else _open(source, name)
    if frame:
        _seek(image, frame, name)
    # Only encoded data can be a bomb; an image already in memory has been paid for.
    return _decoded(image, name, None if isinstance(source, Image.Image) else max_pixels)


def load_frames(source: str | os.PathLike | bytes, *, max_pixels: int | None = MAX_IMAGE_PIXELS
                ) -> Iterator[Image.Image]:
    """Every frame of an image file (one for PNG/JPEG, every page of a multi-page TIFF), each decoded and
    converted as :func:`load_image` does, one at a time (each frame is checked against ``max_pixels``)."""
    name = _name(source)
    image = _open(source, name)
    frames = getattr(image, "n_frames", 1)
    try:
        for number in range(frames):
            if number:
                _seek(image, number, name)
            frame = _decoded(image, name, max_pixels)
            # An RGB frame is the open image itself, which the next seek would change: hand out a copy.
            yield frame.copy() if frame is image and frames > 1 else frame
    finally:
        if frames > 1:  # (a single frame may be the image handed out: closing would free its pixels)
            image.close()


def _seek(image: Image.Image, frame: int, name: str) -> None:
    try:
        image.seek(frame)
    except (EOFError, ValueError, OSError) as e:
        frames = getattr(image, "n_frames", 1)
        raise ImageError(f"{name}: has {frames} frame(s), no frame {frame} ({e})") from None


def _decoded(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    pixels = image.width * image.height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageError(f"{name}: {image.width}x{image.height} = {pixels} pixels exceeds the limit of "
                         f"{max_pixels} (a possible decompression bomb); pass a larger max_pixels if the "
                         "image is trusted")
    try:
        with warnings.catch_warnings():
            # Our own limit above is the guard; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # decode now (Image.open only reads the header), so bad data fails here
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused by Pillow as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: truncated or corrupt {image.format or ''} image data ({e})") from None
    try:
        # exif_transpose copies the image even when nothing is to be turned: only call it when needed.
        if image.getexif().get(_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as e:
        raise ImageError(f"{name}: unreadable EXIF orientation ({e})") from None
    return to_rgb(image, name=name)


_ORIENTATION = 0x0112  # the EXIF tag


def _open(source, name: str) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty input (0 bytes), not an image")
        stream = io.BytesIO(source)
    else:
        path = Path(os.fspath(source))
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes), not an image")
        stream = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (Pillow recognises no image format in it)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: refused by Pillow as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: unreadable image ({e})") from None


def to_rgb(image: Image.Image, *, name: str = "<image>") -> Image.Image:
    """Any Pillow mode -> RGB, as transformers converts it: an alpha band or transparency is composited
    onto white; palette, grey, CMYK and YCbCr images use Pillow's conversion. High-bit-depth grey
    (``I;16*``, ``I``, ``F``) is scaled to 8 bits first rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _to_8bit_grey(image)
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert mode {image.mode} to RGB ({e})") from None


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255  # float images in [0, 1]
    elif image.mode.startswith("I;16") or (values.size and values.max() > 255):
        scaled = values / 257  # 16-bit range 0..65535 -> 0..255 (65535 / 257 = 255 exactly)
    else:
        scaled = values  # already within 0..255
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _pixel_array(image: Image.Image, processing: ImageProcessing) -> np.ndarray:
    if processing.do_resize and image.size != (processing.width, processing.height):
        image = image.resize((processing.width, processing.height), resample=processing.resample)
    array = np.asarray(image)  # (H, W, 3) uint8
    if processing.do_rescale:
        # float64 product then float32, as transformers rescales.
        array = (array.astype(np.float64) * processing.rescale_factor).astype(np.float32)
    else:
        array = array.astype(np.float32)
    if processing.do_normalize:
        mean = np.asarray(processing.image_mean, dtype=np.float32)
        std = np.asarray(processing.image_std, dtype=np.float32)
        array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, H, W)


def preprocess(images: ImageSource | Sequence[ImageSource], processing: ImageProcessing | None = None, *,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Pixel values ``(batch, 3, height, width)`` float32 for one image or a list (paths, bytes or
    PIL images; paths and bytes go through :func:`load_image`)."""
    processing = processing or ImageProcessing()
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    arrays = []
    for source in images:
        image = load_image(source, max_pixels=max_pixels)
        arrays.append(_pixel_array(image, processing))
    if not arrays:
        raise ImageError("no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ImageError(f"images of different sizes {sorted(shapes)} cannot be batched; enable do_resize")
    return torch.from_numpy(np.stack(arrays))


def load_images(sources: Sequence[ImageSource], processing: ImageProcessing | None = None, *,
                max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pixel values and each original image's ``(width, height)`` after EXIF orientation (to map model
    coordinates such as detection boxes back onto the image)."""
    loaded = [load_image(s, max_pixels=max_pixels) for s in sources]
    return preprocess(loaded, processing), [im.size for im in loaded]
