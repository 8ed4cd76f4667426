"""Image loading and CLIP-style preprocessing, with numpy and Pillow only.

`preprocess` reproduces transformers' `CLIPImageProcessorPil` (the PIL backend: PIL resize, center crop,
rescale, normalize) from the plain-JSON spec that `export.processor.preprocess_spec` writes into the
manifest, so the runtime feeds the vision graph exactly what the exported model saw in transformers.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from contract.errors import InputError, ManifestError

MAX_PIXELS = 8192 * 8192
"""Largest accepted width * height. Below PIL's own decompression-bomb limit, so this check fires first."""

MAX_RESIZED_PIXELS = 4096 * 4096
"""Largest accepted width * height after the spec's resize, computed before resizing. The shortest-edge resize
scales the long side by the aspect ratio, so a 98-byte 1x3000 PNG would become 336x1008000 (3.4 GB of work).
With shortest_edge 336 this allows aspect ratios up to 148:1 (224: 334:1); any photo, panorama or tall
screenshot passes, and the largest resized image is 48 MiB of RGB."""

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF", "PPM")
"""The only Pillow decoders an image file is opened with, whatever its name (animated GIF, WebP and PNG and
multi-page TIFF: the first frame). Pillow's other plugins are never tried: EPS would hand the file to
Ghostscript, and rarely used decoders are attack surface a camera or a user never needs."""

SPEC_KEYS = frozenset(
    {
        "do_convert_rgb",
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
    }
)
"""The keys of a preprocessing spec, exactly (see `export.processor.preprocess_spec`)."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_RESAMPLE_CODES = frozenset(int(code) for code in Image.Resampling)

ImageSource = str | Path | Image.Image | np.ndarray


def load_image(source: ImageSource) -> Image.Image:
    """Load an image from a path, a PIL image or a numpy array and return it fully decoded, in RGB.

    Paths and PIL images are turned upright by their EXIF orientation, as transformers' `load_image` does.
    Numpy arrays must be HxWx3 or HxW (grayscale) uint8. Mode by mode (see `_to_rgb`):

    - L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: `Image.convert("RGB")`, as transformers' processor does.
    - RGBA, LA, PA and any image with a `transparency` entry (P, L or RGB with tRNS): composited onto white,
      as transformers' `convert_to_rgb` does (its `load_image` drops alpha instead, but a user who passes
      `Image.open(path)` to the processor gets white, which is what the model saw in transformers).
    - 16-bit (I;16, I;16B, I;16L, I;16N) and mode I with values in 0..65535 (Pillow decodes 16-bit PGM
      files to I, scaled to that range): scaled to 8 bits by the high byte (v >> 8), the same rule Pillow
      uses when it decodes a 16-bit RGB PNG. transformers (and a plain `convert`) clip at 255 instead, which turns a
      16-bit photo white; we deliberately differ. Mode I with values outside 0..65535 is refused.
    - F (32-bit float): refused. Its range (0..1 or 0..255) is not defined, and converting clips silently.

    Files are opened only with the decoders in ALLOWED_FORMATS (checked by content, not by name). The result
    carries what it was loaded from in `info["source"]`, so later errors (see `resize_and_crop`) name it.

    Raises InputError (one line, naming the path or the value) for a missing file, a file that is not an
    image in one of ALLOWED_FORMATS or is corrupt or truncated, an empty image, more than MAX_PIXELS pixels
    (also when PIL's own decompression-bomb check fires, warning included), and an unsupported array or mode.
    A PIL image given here is decoded as it was opened: the caller chose its decoder.
    """
    if isinstance(source, (str, Path)):
        what = f"image file {describe_path(source)}"
        return _named(_to_rgb(_open_file(Path(source)), what), what)
    if isinstance(source, Image.Image):
        what = f"PIL image (mode {source.mode}, {source.width}x{source.height})"
        _check_size(source.width, source.height, what)
        try:
            upright = ImageOps.exif_transpose(source)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{what} cannot be decoded: {exc}") from exc
        return _named(_to_rgb(upright, what), what)
    if isinstance(source, np.ndarray):
        what = f"numpy image of shape {source.shape}"
        return _named(_to_rgb(_from_array(source), what), what)
    raise InputError(f"image source must be a path, a PIL image or a numpy array, got {type(source).__name__}")


def preprocess(images: list[Image.Image], spec: dict[str, Any]) -> np.ndarray:
    """Turn PIL images into the vision graph's pixel values, float32 [B, 3, H, W].

    Reproduces transformers 5.23 `PilBackend._preprocess` (as used by `CLIPImageProcessorPil`) for the
    options in `spec`: convert to RGB, PIL resize, center crop, rescale, normalize. The spec comes from the
    manifest; a malformed one raises ManifestError. Images that resize to different shapes (no center crop)
    cannot form one batch and raise InputError.
    """
    check_spec(spec)
    if not images:
        raise InputError("preprocess needs at least one image, got an empty list")
    crops = [resize_and_crop(image, spec, f"image {index}") for index, image in enumerate(images)]
    shapes = sorted({crop.shape[:2] for crop in crops})
    if len(shapes) > 1:
        raise InputError(f"images resize to different shapes {shapes} and the spec has no center crop to unify them")
    return rescale_and_normalize(np.stack(crops), spec)


def describe_path(path: str | Path) -> str:
    """A path quoted for a one-line message: repr escapes newlines and undecodable bytes (surrogates)."""
    return repr(str(path))


def _named(image: Image.Image, what: str) -> Image.Image:
    image.info["source"] = what
    return image


def rescale_and_normalize(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """uint8 [B, H, W, 3] (after resize and crop) -> the vision graph's float32 [B, 3, H, W]."""
    table = _value_table(spec)  # [3, 256] float32
    return table[np.arange(3)[:, None, None], pixels.transpose(0, 3, 1, 2)]


def load_image_bytes(data: bytes, what: str = "image data") -> Image.Image:
    """Decode an encoded image held in memory (an HTTP upload, a data URL) exactly as `load_image` decodes a
    file: the ALLOWED_FORMATS decoders only, the same size bounds, EXIF orientation, conversion to RGB.
    `what` names the image in error messages (one line)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(f"{what} must be bytes, got {type(data).__name__}")
    if not len(data):
        raise InputError(f"{what} is empty (0 bytes)")
    return _named(_to_rgb(_decode(io.BytesIO(data), what), what), what)


def _open_file(path: Path) -> Image.Image:
    """Open and fully decode an image file (see `_decode`)."""
    name = describe_path(path)
    if not path.exists():
        raise InputError(f"image file not found: {name}")
    if not path.is_file():
        raise InputError(f"image path is not a file: {name}")
    return _decode(path, f"image file {name}")


def _decode(source: Path | BinaryIO, what: str) -> Image.Image:
    """Open and fully decode a file or file object; `.load()` inside the try is what catches truncated files.

    PIL's decompression-bomb warning is turned into an error here, so it can never pass silently. Only the
    decoders in ALLOWED_FORMATS are tried (PIL's `formats=`), so no other plugin ever sees the bytes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source, formats=ALLOWED_FORMATS) as opened:
                _check_size(opened.width, opened.height, what)
                opened.load()
                return ImageOps.exif_transpose(opened)
        except UnidentifiedImageError:
            raise InputError(f"cannot read {what}: not an image in one of the formats this runtime "
                             f"opens ({', '.join(ALLOWED_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{what} is too large to open safely (limit {MAX_PIXELS} pixels)") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read {what}: not an image, or corrupt or truncated "
                             f"({' '.join(str(exc).split())})") from exc


def _from_array(array: np.ndarray) -> Image.Image:
    """Wrap an HxWx3 (RGB) or HxW (grayscale) uint8 array; other layouts have no unambiguous meaning."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InputError(
            f"numpy image must be HxWx3 or HxW uint8, got shape {array.shape} and dtype {array.dtype}"
        )
    _check_size(array.shape[1], array.shape[0], f"numpy image of shape {array.shape}")
    return Image.fromarray(array)


def _check_size(width: int, height: int, what: str) -> None:
    if width == 0 or height == 0:
        raise InputError(f"{what} is empty ({width}x{height} pixels); an image needs at least 1x1")
    if width * height > MAX_PIXELS:
        raise InputError(f"{what} has {width}x{height} pixels, over the limit of {MAX_PIXELS} pixels")


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    """Convert to RGB like transformers' `convert_to_rgb`, except 16-bit and float modes (see `load_image`)."""
    if image.mode == "F":
        raise InputError(
            f"{what} is a 32-bit float image (mode F) with no defined pixel range; save it as 8-bit RGB"
        )
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        image = _sixteen_to_eight_bit(image, what)
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise InputError(f"{what} has mode {image.mode}, which cannot be converted to RGB ({exc})") from exc


def _sixteen_to_eight_bit(image: Image.Image, what: str) -> Image.Image:
    """Map 0..65535 to 0..255 by the high byte, keeping a tRNS transparent value as an alpha channel."""
    values = np.asarray(image)  # [H, W] uint16 (either byte order) or int32 for mode I
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise InputError(
            f"{what} is a 32-bit integer image (mode {image.mode}) with values {low}..{high}, "
            "outside the 16-bit range 0..65535; save it as 8-bit RGB"
        )
    gray = Image.fromarray((values >> 8).astype(np.uint8))
    transparent = image.info.get("transparency")
    if transparent is None:
        return gray
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.merge("LA", (gray, Image.fromarray(alpha)))


def resize_and_crop(image: Image.Image, spec: dict[str, Any], what: str) -> np.ndarray:
    """One image through convert, resize and crop; returns [H, W, 3] uint8, as transformers has it then.

    The size after resizing is computed first and refused beyond MAX_RESIZED_PIXELS, so an extreme aspect ratio
    costs nothing. `what` names the image in errors unless `load_image` recorded a better name in its info.
    """
    what = image.info.get("source", what)
    _check_size(image.width, image.height, what)
    if spec["do_convert_rgb"]:
        image = _to_rgb(image, what)
    elif image.mode != "RGB":
        raise InputError(f"{what} has mode {image.mode}, but this spec (do_convert_rgb false) needs RGB images")
    if spec["do_resize"]:
        height, width = _resize_shape(image.height, image.width, spec["size"])
        _check_resized(image, width, height, spec["size"], what)
        image = image.resize((width, height), resample=spec["resample"])
    pixels = np.asarray(image)  # [H, W, 3] uint8
    if spec["do_center_crop"]:
        pixels = _center_crop(pixels, spec["crop_size"]["height"], spec["crop_size"]["width"])
    return pixels


def _check_resized(image: Image.Image, width: int, height: int, size: dict[str, int], what: str) -> None:
    if width * height <= MAX_RESIZED_PIXELS:
        return
    ratio = max(image.width, image.height) / min(image.width, image.height)
    limit = MAX_RESIZED_PIXELS // size["shortest_edge"] ** 2 if "shortest_edge" in size else None
    raise InputError(
        f"{what} is {image.width}x{image.height} pixels (aspect ratio {ratio:.0f}:1) and would be resized to "
        f"{width}x{height}, over the limit of {MAX_RESIZED_PIXELS} pixels after resizing"
        + (f"; crop it to an aspect ratio of at most {limit}:1" if limit else "")
    )


def _resize_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """Output (height, width) as transformers' `get_resize_output_image_size(default_to_square=False)`.

    The short side becomes `shortest_edge` and the long side `int(shortest_edge * long / short)`: truncated,
    not rounded, and computed in Python floats; a tie (square) counts the width as the short side.
    """
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    edge = size["shortest_edge"]
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Center crop [H, W, 3] like transformers' `center_crop`, zero-padding a side smaller than the crop.

    On each axis: a larger side starts at (size - crop) // 2; a smaller one is placed at ceil((crop - size) / 2),
    which is where transformers' pad-then-crop ends up putting it.
    """
    out = np.zeros((crop_height, crop_width, 3), dtype=pixels.dtype)
    (src_rows, dst_rows), (src_cols, dst_cols) = (
        _crop_window(pixels.shape[0], crop_height),
        _crop_window(pixels.shape[1], crop_width),
    )
    out[dst_rows, dst_cols] = pixels[src_rows, src_cols]
    return out


def _crop_window(size: int, crop: int) -> tuple[slice, slice]:
    """(source slice, destination slice) of one axis of a center crop."""
    if size >= crop:
        start = (size - crop) // 2
        return slice(start, start + crop), slice(0, crop)
    start = (crop - size + 1) // 2
    return slice(0, size), slice(start, start + size)


def _value_table(spec: dict[str, Any]) -> np.ndarray:
    """Output value for every (channel, uint8 value), in transformers' operation order and dtypes. [3, 256]

    After the crop the pixels are uint8, so rescale + normalize is a function of (channel, value). Computing
    it once for the 256 values and gathering is exact (rescale in float64 then cast to float32, normalize in
    float32 with float32 mean and std, as `rescale` and `normalize` do) and cheaper than per-pixel arithmetic.
    """
    values = np.arange(256, dtype=np.uint8)
    if spec["do_rescale"]:
        values = (values.astype(np.float64) * spec["rescale_factor"]).astype(np.float32)
    table = np.broadcast_to(values.astype(np.float32), (3, 256))
    if spec["do_normalize"]:
        mean = np.asarray(spec["image_mean"], dtype=np.float32)[:, None]
        std = np.asarray(spec["image_std"], dtype=np.float32)[:, None]
        table = (table - mean) / std
    return np.ascontiguousarray(table)


def check_spec(spec: dict[str, Any]) -> None:
    """Refuse a spec this module would misread; options that are switched off are not checked."""
    if set(spec) != SPEC_KEYS:
        missing, unknown = sorted(SPEC_KEYS - set(spec)), sorted(set(spec) - SPEC_KEYS)
        raise ManifestError(f"preprocessing spec has missing keys {missing} and unknown keys {unknown}")
    if spec["do_resize"]:
        if _keys(spec["size"]) not in ({"shortest_edge"}, {"height", "width"}):
            raise ManifestError(f"preprocessing size {spec['size']} must be {{shortest_edge}} or {{height, width}}")
        if spec["resample"] not in _RESAMPLE_CODES:
            raise ManifestError(f"preprocessing resample {spec['resample']} is not one of {sorted(_RESAMPLE_CODES)}")
    if spec["do_center_crop"] and _keys(spec["crop_size"]) != {"height", "width"}:
        raise ManifestError(f"preprocessing crop_size {spec['crop_size']} must be {{height, width}}")
    if spec["do_normalize"] and not all(
        isinstance(values, (list, tuple)) and len(values) == 3 for values in (spec["image_mean"], spec["image_std"])
    ):
        raise ManifestError(
            f"preprocessing image_mean {spec['image_mean']} and image_std {spec['image_std']} need 3 values each"
        )


def _keys(value: object) -> set[str]:
    return set(value) if isinstance(value, dict) else set()
