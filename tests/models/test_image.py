"""Image loading and SigLIP preprocessing.

Pixel values must be *identical* (``torch.equal``) to transformers' PIL-based SigLIP image processor
(``SiglipImageProcessorPil``) given the same decoded, EXIF-oriented image: same conversion, same
Pillow resize, same float64 rescale and float32 normalisation. No tolerance: any difference in the
order of float operations or in resampling shows up as a mismatch.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import SiglipImageProcessorPil

from models.image import ImageError, ImageProcessing, load_image, load_images, preprocess

RNG = np.random.default_rng(0)


def noise(width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def sample_images() -> dict[str, tuple[Image.Image, str]]:
    """Odd sizes, every common mode, written in the formats that carry them."""
    rgb = Image.fromarray(noise(37, 23))
    palette_transparent = Image.fromarray(noise(27, 33)).convert("P")
    palette_transparent.info["transparency"] = 5
    return {
        "rgb.png": (rgb, "PNG"),
        "rgb.jpg": (Image.fromarray(noise(61, 17)), "JPEG"),
        "rgba.png": (Image.fromarray(noise(41, 29, 4), mode="RGBA"), "PNG"),
        "rgba.webp": (Image.fromarray(noise(19, 43, 4), mode="RGBA"), "WEBP"),
        "grey.png": (Image.fromarray(noise(19, 53, 1)), "PNG"),
        "grey-alpha.png": (Image.fromarray(noise(31, 31, 2), mode="LA"), "PNG"),
        "palette.png": (Image.fromarray(noise(33, 17)).convert("P"), "PNG"),
        "palette-transparent.png": (palette_transparent, "PNG"),
        "palette-transparent.gif": (palette_transparent, "GIF"),
        "cmyk.jpg": (Image.fromarray(noise(29, 45)).convert("CMYK"), "JPEG"),
        "cmyk.tif": (Image.fromarray(noise(23, 11)).convert("CMYK"), "TIFF"),
        "bilevel.png": (Image.fromarray(noise(30, 21)).convert("1"), "PNG"),
        "bmp.bmp": (Image.fromarray(noise(57, 14)), "BMP"),
    }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (image, fmt) in sample_images().items():
        path = directory / name
        image.save(path, format=fmt)
        paths[name] = path
    return paths


def transformers_pixels(path, **processor_kwargs) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(path))
    processor = SiglipImageProcessorPil(**processor_kwargs)
    return processor(image, return_tensors="pt")["pixel_values"]


SETTINGS = [
    dict(size=28, resample=3, mean=0.5, std=0.5),  # SigLIP / PaliGemma: bicubic, [-1, 1]
    dict(size=56, resample=2, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    dict(size=42, resample=1, mean=0.5, std=0.5),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=["bicubic-28", "bilinear-56-imagenet", "lanczos-42"])
def test_pixels_identical_to_transformers(image_files, setting):
    processing = ImageProcessing.square(setting["size"], resample=setting["resample"], image_mean=setting["mean"],
                                        image_std=setting["std"])
    for name, path in image_files.items():
        expected = transformers_pixels(path, size={"height": setting["size"], "width": setting["size"]},
                                       resample=setting["resample"], image_mean=setting["mean"],
                                       image_std=setting["std"])
        got = preprocess(path, processing)
        assert got.dtype == expected.dtype == torch.float32, name
        assert got.shape == expected.shape == (1, 3, setting["size"], setting["size"]), name
        assert torch.equal(got, expected), f"{name}: max difference {(got - expected).abs().max()}"


def test_preprocessor_config_is_read_like_transformers(image_files, tmp_path):
    raw = {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.4, 0.5, 0.6], "image_processor_type": "SiglipImageProcessor", "image_seq_length": 16,
           "image_std": [0.2, 0.3, 0.25], "processor_class": "PaliGemmaProcessor", "resample": 2,
           "rescale_factor": 0.00392156862745098, "size": {"height": 56, "width": 56}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    processing = ImageProcessing.from_pretrained(tmp_path)
    assert (processing.height, processing.resample, processing.image_std) == (56, 2, [0.2, 0.3, 0.25])
    reference = SiglipImageProcessorPil(**{k: v for k, v in raw.items() if v is not None})
    for name in ("rgba.png", "cmyk.jpg", "grey.png"):
        expected = reference(ImageOps.exif_transpose(Image.open(image_files[name])), return_tensors="pt")
        assert torch.equal(preprocess(image_files[name], processing), expected["pixel_values"]), name
    # A directory without the file gets SigLIP's defaults at the model's size.
    default = ImageProcessing.from_pretrained(tmp_path / "elsewhere", default_size=448)
    assert (default.height, default.width, default.resample, default.image_mean) == (448, 448, 3, [0.5, 0.5, 0.5])


def test_exif_orientation_is_applied(tmp_path, image_files):
    image = Image.fromarray(noise(40, 20))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the upright image is 20 wide, 40 high
    path = tmp_path / "rotated.jpg"
    image.save(path, format="JPEG", exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270)))
    expected = transformers_pixels(path, size={"height": 28, "width": 28})
    assert torch.equal(preprocess(path, ImageProcessing.square(28)), expected)
    pixels, sizes = load_images([path, image_files["rgb.png"]], ImageProcessing.square(28))
    assert pixels.shape == (2, 3, 28, 28) and sizes == [(20, 40), (37, 23)]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 65280]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    expected = np.rint(values / 257).astype(np.uint8)  # 0..65535 -> 0..255
    assert rgb.shape == (2, 4, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], expected)


def test_batches_of_different_sizes(image_files):
    names = ["rgb.png", "cmyk.tif", "palette-transparent.gif"]
    pixels = preprocess([image_files[n] for n in names], ImageProcessing.square(28))
    assert pixels.shape == (3, 3, 28, 28)
    for i, n in enumerate(names):
        assert torch.equal(pixels[i:i + 1], preprocess(image_files[n], ImageProcessing.square(28)))
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0


def _png_with_header_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size (what a decompression bomb looks like to open())."""
    import io

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_images_raise_clear_errors(tmp_path, image_files):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(image_files["rgb.png"].read_bytes()[:200])
    truncated_jpg = tmp_path / "truncated.jpg"
    truncated_jpg.write_bytes(image_files["rgb.jpg"].read_bytes()[:400])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_header_size(60_000, 60_000))  # past twice Pillow's limit: Pillow refuses
    large = tmp_path / "large.png"
    large.write_bytes(_png_with_header_size(12_000, 12_000))  # 144 Mpx: over our limit, under Pillow's hard one
    cases = [
        (empty, "0 bytes"),
        (text, "not an image"),
        (truncated_png, "truncated"),
        (truncated_jpg, "truncated"),
        (bomb, "decompression bomb"),
        (large, "12000x12000 = 144000000 pixels exceeds the limit of 89478485"),
        (tmp_path / "missing.png", "no such file"),
        (tmp_path, "directory"),
    ]
    for path, reason in cases:
        with pytest.raises(ImageError, match=reason) as info:
            preprocess(path)
        assert str(path) in str(info.value)
    # The limit is an explicit setting: a small image above a small limit is refused, below it is read.
    with pytest.raises(ImageError, match=r"37x23 = 851 pixels exceeds the limit of 800"):
        load_image(image_files["rgb.png"], max_pixels=800)
    assert load_image(image_files["rgb.png"], max_pixels=851).size == (37, 23)
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")


def test_processing_settings_are_validated():
    with pytest.raises(ValueError, match="resample"):
        ImageProcessing(resample=9)
    with pytest.raises(ValueError, match="image_std"):
        ImageProcessing(image_std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="channel"):
        ImageProcessing(image_mean=[0.5, 0.5])
