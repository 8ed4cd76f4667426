"""LLaVA-NeXT's "anyres" tiling, reproducing transformers 5.23 `LlavaNextImageProcessorPil`.

An image is resized (aspect kept) to the best of a list of resolutions, zero-padded to it, cut into
square tiles of the vision encoder's input size in raster order, and preceded by the whole image squashed
to one tile (the "base" image). Each tile then goes through the ordinary CLIP-style spec.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from runtime.preprocess import check_spec, rescale_and_normalize, resize_and_crop


def select_best_resolution(size: tuple[int, int], resolutions: list[list[int]]) -> tuple[int, int]:
    """(height, width) among `resolutions` that keeps the most of the image and wastes the least."""
    height, width = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for res_h, res_w in resolutions:
        scale = min(res_w / width, res_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = res_w * res_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (res_h, res_w), effective, wasted
    return best


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into `target` with its aspect ratio kept."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(size: tuple[int, int], resolutions: list[list[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles an image of `size` (height, width) is cut into."""
    res_h, res_w = select_best_resolution(size, resolutions)
    return res_h // tile, res_w // tile


def tiles(image: Image.Image, spec: dict[str, Any], resolutions: list[list[int]], tile: int) -> np.ndarray:
    """RGB image -> float32 [1 + rows*cols, 3, tile, tile]: the base image, then the tiles in raster order."""
    check_spec(spec)
    size = (image.height, image.width)
    target = select_best_resolution(size, resolutions)
    new_h, new_w = fit_size(size, target)
    resized = np.asarray(image.resize((new_w, new_h), resample=spec["resample"]))  # [h, w, 3] uint8
    pad_y, pad_x = (target[0] - new_h) // 2, (target[1] - new_w) // 2
    canvas = np.zeros((target[0], target[1], 3), np.uint8)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    base = image.resize((tile, tile), resample=spec["resample"])
    pieces = [resize_and_crop(base, spec, "base image")]
    for top in range(0, target[0], tile):
        for left in range(0, target[1], tile):
            piece = Image.fromarray(canvas[top:top + tile, left:left + tile])
            pieces.append(resize_and_crop(piece, spec, "tile"))
    return rescale_and_normalize(np.stack(pieces), spec)
