"""Similarity maps against a direct computation, and the saved PNG showing the planted match."""

import numpy as np
import pytest
import torch
from PIL import Image

from vision_rag.simmap import SimilarityMapError, colorize, save_similarity_maps, similarity_maps


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_maps_equal_direct_dot_products():
    rng = np.random.default_rng(0)
    query = unit(rng.standard_normal((3, 8))).astype(np.float32)
    page = unit(rng.standard_normal((2 + 4 * 6 + 5, 8))).astype(np.float32)  # 2 leading, 5 trailing tokens
    maps = similarity_maps(torch.from_numpy(query), torch.from_numpy(page), grid=(4, 6), patch_offset=2)
    assert maps.shape == (3, 4, 6)
    for t in range(3):
        for r in range(4):
            for c in range(6):
                assert maps[t, r, c] == pytest.approx(float(query[t] @ page[2 + r * 6 + c]), abs=1e-6)


def test_grid_larger_than_page_is_refused():
    with pytest.raises(SimilarityMapError, match="pool_factor=1"):
        similarity_maps(np.ones((2, 4)), np.ones((10, 4)), grid=(4, 4))


def test_colour_map_brightness_grows_with_value():
    colours = colorize(np.linspace(0, 1, 50), 0.0, 1.0).astype(float)
    brightness = colours.sum(1)
    assert np.all(np.diff(brightness) >= 0) and brightness[0] == 0 and brightness[-1] == 3 * 255


def test_png_shows_each_token_at_its_planted_patch(tmp_path):
    rng = np.random.default_rng(1)
    grid = (8, 8)
    page = unit(rng.standard_normal((64 + 6, 16))).astype(np.float32) * 0.3
    page = unit(page)
    planted = {0: (1, 6), 1: (5, 2), 2: (7, 7)}  # query token -> patch (row, col) that equals it
    query = unit(rng.standard_normal((3, 16))).astype(np.float32)
    for token, (r, c) in planted.items():
        page[r * 8 + c] = query[token]
    image = Image.new("RGB", (160, 240), (128, 128, 128))
    out = save_similarity_maps(image, query, page, tmp_path / "maps" / "why.png", grid=grid, columns=2,
                               tile_width=160, query_tokens=["invoice", "total", "date"])
    sheet = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    label = 18
    assert sheet.shape == (2 * (240 + label), 2 * 160, 3)
    for token, (r, c) in planted.items():
        x0, y0 = (token % 2) * 160, (token // 2) * (240 + label) + label
        tile = sheet[y0 : y0 + 240, x0 : x0 + 160].sum(2)
        # Mean brightness of each of the 8x8 patch blocks (each 20x30 px); the planted one is brightest.
        blocks = tile.reshape(8, 30, 8, 20).mean(axis=(1, 3))
        assert np.unravel_index(blocks.argmax(), blocks.shape) == (r, c), token
