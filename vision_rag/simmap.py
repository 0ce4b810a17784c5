"""Similarity maps: which parts of a page matched which query token ("why did this page match").

A ColPali page embedding starts with one vector per image patch in row-major order (a 32x32 grid
for PaliGemma at 448 px: the first 1024 page tokens), followed by the prompt tokens. For each query
token, its similarity to every patch is a ``(32, 32)`` heat map; stretched over the page image (the
embedder stretched the page to a square the same way) and blended on top, it shows where the token
found its match. MaxSim takes, per query token, the hottest patch of its map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

DEFAULT_GRID = (32, 32)

# "hot" colour map anchors: black -> red -> yellow -> white, so brightness grows with similarity.
_HOT = np.array([[0, 0, 0], [200, 0, 0], [255, 210, 0], [255, 255, 255]], dtype=np.float32)


class SimilarityMapError(ValueError):
    """Inputs that cannot make a similarity map (grid larger than the page's tokens, wrong dims)."""


def similarity_maps(
    query_vectors: torch.Tensor | np.ndarray,
    page_vectors: torch.Tensor | np.ndarray,
    grid: tuple[int, int] = DEFAULT_GRID,
    patch_offset: int = 0,
) -> np.ndarray:
    """``(Lq, rows, cols)`` similarities of every query token to every image patch of the page.

    The patches are page tokens ``patch_offset : patch_offset + rows * cols`` in row-major order."""
    query = np.asarray(torch.as_tensor(query_vectors, dtype=torch.float32).cpu())
    page = np.asarray(torch.as_tensor(page_vectors, dtype=torch.float32).cpu())
    rows, cols = grid
    n_patches = rows * cols
    if query.ndim != 2 or page.ndim != 2 or query.shape[1] != page.shape[1]:
        raise SimilarityMapError(
            f"query vectors {tuple(query.shape)} and page vectors {tuple(page.shape)} must be (n, dim) with the same dim"
        )
    if page.shape[0] < patch_offset + n_patches:
        raise SimilarityMapError(
            f"the page has {page.shape[0]} token vectors but a {rows}x{cols} patch grid needs "
            f"{patch_offset + n_patches}; maps need the embedder's unpooled page vectors (pool_factor=1)"
        )
    patches = page[patch_offset : patch_offset + n_patches]
    return (query @ patches.T).reshape(len(query), rows, cols)


def colorize(heatmap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to ``(..., 3)`` uint8 colours of the hot colour map over ``[vmin, vmax]``."""
    scaled = np.clip((heatmap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0) * (len(_HOT) - 1)
    low = np.minimum(np.floor(scaled).astype(np.int64), len(_HOT) - 2)
    frac = (scaled - low)[..., None]
    return (_HOT[low] * (1 - frac) + _HOT[low + 1] * frac).round().astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, *, vmin: float, vmax: float, alpha: float = 0.55) -> Image.Image:
    """The page image with the colourised heat map stretched over it (each patch a solid block)."""
    page = image.convert("RGB")
    colours = Image.fromarray(colorize(heatmap, vmin, vmax), "RGB").resize(page.size, Image.NEAREST)
    return Image.blend(page, colours, alpha)


def save_similarity_maps(
    image: Image.Image,
    query_vectors: torch.Tensor | np.ndarray,
    page_vectors: torch.Tensor | np.ndarray,
    out_path: str | Path,
    *,
    query_tokens: Sequence[str] | None = None,
    grid: tuple[int, int] = DEFAULT_GRID,
    patch_offset: int = 0,
    token_indices: Sequence[int] | None = None,
    columns: int = 4,
    tile_width: int = 320,
    alpha: float = 0.55,
) -> Path:
    """Write one PNG with a tile per query token: the page with that token's heat map over it.

    ``query_tokens`` labels the tiles (e.g. the tokenizer's pieces); ``token_indices`` selects tokens
    (default: all). All tiles share one colour scale (the min and max over the shown maps), so tiles
    can be compared: a bright tile is a token that matched strongly."""
    maps = similarity_maps(query_vectors, page_vectors, grid, patch_offset)
    indices = list(range(len(maps))) if token_indices is None else [int(i) for i in token_indices]
    if not indices or any(not 0 <= i < len(maps) for i in indices):
        raise SimilarityMapError(f"token_indices {indices} must select among the {len(maps)} query tokens")
    shown = maps[indices]
    vmin, vmax = float(shown.min()), float(shown.max())
    tile_height = max(1, round(tile_width * image.height / image.width))
    label_height = 18 if query_tokens is not None else 0
    columns = min(columns, len(indices))
    rows = math.ceil(len(indices) / columns)
    sheet = Image.new("RGB", (columns * tile_width, rows * (tile_height + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    page = image.convert("RGB").resize((tile_width, tile_height), Image.BICUBIC)
    for slot, token in enumerate(indices):
        x = (slot % columns) * tile_width
        y = (slot // columns) * (tile_height + label_height)
        sheet.paste(overlay(page, maps[token], vmin=vmin, vmax=vmax, alpha=alpha), (x, y + label_height))
        if query_tokens is not None:
            label = f"{token}: {query_tokens[token]}  max {maps[token].max():.2f}"
            draw.text((x + 4, y + 3), label, fill="black")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return out_path
