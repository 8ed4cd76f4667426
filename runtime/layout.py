"""Layouts: how an image (or video) is cut into sub-images and how their kept tokens are ordered.

Each layout has `tiles(source) -> (pixel_values [S, 3, H, W], original (height, width))` and
`assemble(embeds [S, K, D], kept [S, K], size) -> [T, D]`, the item's tokens in LLM order.

The vision graph encodes sub-images and the projector graph maps each sub-image's kept tokens; a layout
decides what the sub-images are and the order in which their tokens reach the LLM. Selected by the
manifest's `modalities[...].layout` (a contract.layouts spec), never by model family.

    single             the image is one sub-image; its K kept tokens in raster order       (LLaVA-1.5)
    anyres_fastervlm   base image + a fixed grid of tiles, K kept per sub-image; base tokens first, then
                       the tiles' tokens in raster order over the stitched high-resolution grid
                       (FasterVLM's LLaVA-NeXT protocol: no unpadding, no newline tokens)
    anyres_hf          the released LLaVA-NeXT layout, unpruned: grid chosen by aspect ratio, padding
                       rows/columns removed, a newline embedding after every row of the tile grid
    frames             a video: num_frames frames sampled uniformly (runtime/video.py), each a sub-image;
                       each frame's tokens in frame order (Video-LLaVA)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.errors import ManifestError
from contract.manifest import Manifest, ModalitySpec
from runtime import anyres
from runtime.files import read_npy
from runtime.preprocess import ImageSource, load_image, preprocess
from runtime.video import Frames


class Single:
    def __init__(self, modality: ModalitySpec, manifest: Manifest, directory: Path):
        self.spec = modality.preprocess

    def tiles(self, source: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        image = load_image(source)
        return preprocess([image], self.spec), (image.height, image.width)  # [1, 3, H, W]

    def assemble(self, embeds: np.ndarray, kept: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return embeds[0]  # [K, D]


class AnyresFasterVLM:
    """A fixed grid (the authors use 672x672: 2x2 tiles of 336) plus the base image, K kept per sub-image."""

    def __init__(self, modality: ModalitySpec, manifest: Manifest, directory: Path):
        self.spec = modality.preprocess
        self.resolution = list(modality.layout.resolution)  # [height, width] of the tiled image
        self.tile = modality.layout.tile
        self.rows, self.cols = modality.layout.grid
        self.patch_rows, self.patch_cols = manifest.method.grid

    def tiles(self, source: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        image = load_image(source)
        return anyres.tiles(image, self.spec, [self.resolution], self.tile), (image.height, image.width)

    def order(self, kept: np.ndarray) -> np.ndarray:
        """Raster positions over the stitched grid of the tiles' kept patches, [rows*cols*K]. kept [S, K]."""
        tile_index = np.repeat(np.arange(self.rows * self.cols), kept.shape[1])  # which tile, per token
        patch = kept[1:].reshape(-1)
        y = (tile_index // self.cols) * self.patch_rows + patch // self.patch_cols
        x = (tile_index % self.cols) * self.patch_cols + patch % self.patch_cols
        return y * (self.cols * self.patch_cols) + x

    def assemble(self, embeds: np.ndarray, kept: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        crops = embeds[1:].reshape(-1, embeds.shape[-1])  # [rows*cols*K, D]
        return np.concatenate([embeds[0], crops[np.argsort(self.order(kept), kind="stable")]])


class AnyresHF:
    """The released model's own layout (transformers' `pack_image_features`), for unpruned exports."""

    def __init__(self, modality: ModalitySpec, manifest: Manifest, directory: Path):
        if manifest.method.keep != manifest.method.num_patches:  # the exporter refuses this; a hand-edited manifest
            raise ManifestError("layout anyres_hf needs every patch (keep == num_patches); re-export without pruning")
        self.spec = modality.preprocess
        self.resolutions = [list(r) for r in modality.layout.grid_pinpoints]
        self.tile = modality.layout.tile
        self.patch_rows, self.patch_cols = manifest.method.grid
        self.newline = read_npy(directory / modality.layout.newline, "float32", (manifest.llm.hidden_size,))  # [D]

    def tiles(self, source: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        image = load_image(source)
        return anyres.tiles(image, self.spec, self.resolutions, self.tile), (image.height, image.width)

    def assemble(self, embeds: np.ndarray, kept: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        rows, cols = anyres.grid_shape(size, self.resolutions, self.tile)
        d = embeds.shape[-1]
        grid = embeds[1:].reshape(rows, cols, self.patch_rows, self.patch_cols, d)
        grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * self.patch_rows, cols * self.patch_cols, d)
        grid = unpad(grid, size)
        with_newline = np.concatenate([grid, np.broadcast_to(self.newline, (grid.shape[0], 1, d))], axis=1)
        return np.concatenate([embeds[0], with_newline.reshape(-1, d)])


def unpad(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Drop the rows or columns of a [H, W, D] feature grid that cover padding, as transformers'
    `unpad_image` computes them from the original (height, width)."""
    height, width = size
    current_h, current_w = grid.shape[:2]
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        pad = (current_h - new_h) // 2
        return grid[pad:current_h - pad]
    new_w = int(round(width * (current_h / height), 7))
    pad = (current_w - new_w) // 2
    return grid[:, pad:current_w - pad]


# contract.layouts name -> the runtime's implementation; the contract's set is closed, so every name is here.
LAYOUTS = {"single": Single, "anyres_fastervlm": AnyresFasterVLM, "anyres_hf": AnyresHF, "frames": Frames}


def make_layout(modality: ModalitySpec, manifest: Manifest, directory: Path):
    return LAYOUTS[modality.layout.name](modality, manifest, directory)
