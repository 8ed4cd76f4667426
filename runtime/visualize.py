"""Draw which patches were kept over the image the model saw (resized and center-cropped): FasterVLM's kept
patches outlined; for in-LLM pruning the first stage's outlined and the last stage's filled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from contract.errors import InputError
from runtime.preprocess import ALLOWED_FORMATS


def check_save_path(path: str | Path) -> str:
    """The image format `path` names by its extension, one of ALLOWED_FORMATS; checked before any work, so a
    bad --save-kept is refused before the answer is printed. The source image itself is read again through
    `runtime.preprocess.load_image` (the same allow-list), never opened here."""
    suffix = Path(path).suffix.lower()
    kind = Image.registered_extensions().get(suffix)
    if kind not in ALLOWED_FORMATS:
        extensions = sorted(e for e, f in Image.registered_extensions().items() if f in ALLOWED_FORMATS)
        raise InputError(f"--save-kept {str(path)!r}: the name must end in one of {', '.join(extensions)}")
    if not Path(path).parent.is_dir():
        raise InputError(f"--save-kept {str(path)!r}: the folder {str(Path(path).parent)!r} does not exist")
    return kind


def model_view(pixel_values: np.ndarray, spec: dict) -> Image.Image:
    """Undo normalisation and rescaling of one preprocessed image [3, H, W] -> RGB PIL image."""
    pixels = pixel_values.transpose(1, 2, 0).astype(np.float64)  # [H, W, 3]
    if spec.get("do_normalize"):
        pixels = pixels * np.array(spec["image_std"]) + np.array(spec["image_mean"])
    if spec.get("do_rescale"):
        pixels = pixels / spec["rescale_factor"]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def draw_kept(image: Image.Image, kept: np.ndarray, grid: tuple[int, int], filled: np.ndarray | None = None) -> Image.Image:
    """Dim the pruned patches and outline the kept ones; `filled` (a subset, e.g. FEATHER's stage 2) are also
    tinted. kept, filled: patch indices in raster order."""
    rows, cols = grid
    width, height = image.size
    cell_w, cell_h = width / cols, height / rows
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep_mask = np.zeros(rows * cols, bool)
    keep_mask[np.asarray(kept, dtype=np.int64)] = True
    fill_mask = np.zeros(rows * cols, bool)
    if filled is not None:
        fill_mask[np.asarray(filled, dtype=np.int64)] = True
    ys = np.minimum((np.arange(height) / cell_h).astype(int), rows - 1)
    xs = np.minimum((np.arange(width) / cell_w).astype(int), cols - 1)
    kept_pixels = keep_mask.reshape(rows, cols)[ys][:, xs]  # [H, W]
    fill_pixels = fill_mask.reshape(rows, cols)[ys][:, xs]
    out = np.where(kept_pixels[..., None], base, base * 0.25)
    out = np.where(fill_pixels[..., None], 0.5 * out + 0.5 * np.array([255.0, 80.0, 0.0]), out)
    picture = Image.fromarray(out.astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    for index in np.flatnonzero(keep_mask):
        r, c = divmod(int(index), cols)
        pen.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1], outline=(255, 200, 0))
    return picture


def save_kept(path: str | Path, pixel_values: np.ndarray, kept, spec: dict, grid: tuple[int, int],
              scale: int = 2, filled=None) -> None:
    """pixel_values [S, 3, H, W] and kept (per sub-image, patch indices; [S, K] or a list): each sub-image (tile,
    frame) drawn, side by side. filled: per sub-image, the patches to tint (None: none)."""
    filled = [None] * len(pixel_values) if filled is None else filled
    views = [draw_kept(model_view(pixels, spec), indices, grid, tint)
             for pixels, indices, tint in zip(pixel_values, kept, filled)]
    picture = Image.new("RGB", (sum(v.width for v in views), max(v.height for v in views)))
    left = 0
    for view in views:
        picture.paste(view, (left, 0))
        left += view.width
    scale = scale if len(views) == 1 else 1
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    try:
        picture.save(path, format=check_save_path(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot write --save-kept {str(path)!r}: {exc}") from None


def per_sub_image(window: np.ndarray, sources: list[tuple[int, int]], sub_images: int) -> list[np.ndarray]:
    """Window indices (contract.layouts.token_sources order) -> per sub-image, its patch indices."""
    out: list[list[int]] = [[] for _ in range(sub_images)]
    for w in np.asarray(window, dtype=np.int64):
        s, p = sources[int(w)]
        out[s].append(p)
    return [np.array(sorted(p), np.int64) for p in out]
