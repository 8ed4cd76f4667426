"""Calibration inputs: the user's photos preprocessed exactly as the runtime does, saved reproducibly.

The vision graph is calibrated on `pixel_values` that come from the runtime's own code path (the image
modality's layout: `runtime.preprocess.load_image` + `preprocess` with the manifest's spec, tiles for
anyres layouts), so the activation ranges ModelOpt measures are the ranges the deployed graph will see.
The projector and LLM graphs are calibrated on what the fp32 graphs upstream produce from those pixels.

The set is saved as an `.npz` whose bytes depend only on its contents (fixed zip timestamps, sorted file
names), so the same photos give the same file and the same sha256, which calibration.json records.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.options import CalibrationError
from contract import names
from contract.errors import UserError
from contract.layouts import layout_to_dict
from contract.manifest import Manifest
from contract.positions import prefill_position_ids
from runtime.layout import make_layout
from runtime.preprocess import ALLOWED_FORMATS

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry: no clock in the file
_KEYS = {names.PIXEL_VALUES, "names", "tiles", "sizes", "spec"}


@dataclass(frozen=True)
class CalibrationSet:
    pixel_values: np.ndarray  # [S, 3, H, W] float32: every image's sub-images, in image order
    names: tuple[str, ...]  # one per image (file names, sorted)
    tiles: np.ndarray  # [M] int64: sub-images per image (1 for the single layout)
    sizes: np.ndarray  # [M, 2] int64: each image's (height, width) before preprocessing (layouts need it)
    spec: str  # JSON of the preprocessing spec and layout these pixels were made with

    def arrays(self) -> dict[str, np.ndarray]:
        return {names.PIXEL_VALUES: self.pixel_values, "names": np.asarray(self.names, dtype=str),
                "tiles": self.tiles, "sizes": self.sizes, "spec": np.asarray([self.spec])}  # 1-d: npz has no 0-d str


def image_spec(manifest: Manifest) -> str:
    """What the pixels depend on besides the photos: the image modality's preprocessing and layout."""
    modality = manifest.modalities[names.IMAGE]
    return json.dumps({"preprocess": modality.preprocess, "layout": layout_to_dict(modality.layout)}, sort_keys=True)


def list_images(directory: Path, what: str = "--images") -> list[Path]:
    """Every regular, non-hidden file in `directory` (not recursive), sorted by name. Each one must be an
    image: a stray file is refused when it is read rather than skipped, so the set is what the user meant."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise CalibrationError(f"{what} {str(directory)!r} {problem}")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CalibrationError(f"{what} {str(directory)!r} has no image files ({', '.join(ALLOWED_FORMATS)})")
    return files


def from_images(paths: list[Path], manifest: Manifest, export_dir: Path) -> CalibrationSet:
    """Preprocess photos through the runtime's layout for images. A bad file raises InputError naming it.
    Files are opened by `runtime.preprocess.load_image`, so only its ALLOWED_FORMATS decoders ever read them."""
    layout = make_layout(manifest.modalities[names.IMAGE], manifest, Path(export_dir))
    pixels, sizes = [], []
    for path in paths:
        tiles, size = layout.tiles(path)  # [S, 3, H, W], (height, width)
        pixels.append(tiles)
        sizes.append(size)
    return CalibrationSet(
        pixel_values=np.concatenate(pixels).astype(np.float32, copy=False),
        names=tuple(p.name for p in paths),
        tiles=np.asarray([len(t) for t in pixels], dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        spec=image_spec(manifest),
    )


def from_arrays(images: dict[str, np.ndarray], manifest: Manifest, export_dir: Path) -> CalibrationSet:
    """Same as `from_images` for in-memory HxWx3 uint8 photos (the held-out evaluation set)."""
    layout = make_layout(manifest.modalities[names.IMAGE], manifest, Path(export_dir))
    cut = [layout.tiles(array) for array in images.values()]
    return CalibrationSet(
        pixel_values=np.concatenate([t for t, _ in cut]).astype(np.float32, copy=False),
        names=tuple(images),
        tiles=np.asarray([len(t) for t, _ in cut], dtype=np.int64),
        sizes=np.asarray([s for _, s in cut], dtype=np.int64).reshape(-1, 2),
        spec=image_spec(manifest),
    )


def write_npz(data: CalibrationSet, path: Path) -> str:
    """Write `data` as an uncompressed .npz (np.load reads it) with no timestamps; returns its sha256."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in sorted(data.arrays().items()):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3  # Unix, whatever machine writes it: the bytes must not depend on the host
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())
    return sha256_file(path)


def read_npz(path: Path, manifest: Manifest, input_shape: tuple) -> CalibrationSet:
    """Load a calibration .npz written by `write_npz`, refusing one made for other preprocessing or shapes."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"--calibration-data {str(path)!r} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"--calibration-data {str(path)!r} is not a readable .npz ({exc})") from None
    if set(arrays) != _KEYS:
        raise CalibrationError(
            f"--calibration-data {str(path)!r} has arrays {sorted(arrays)}; a calibration set has {sorted(_KEYS)}"
        )
    pixels, spec = arrays[names.PIXEL_VALUES], str(arrays["spec"].reshape(-1)[0]) if arrays["spec"].size == 1 else ""
    if spec != image_spec(manifest):
        raise CalibrationError(
            f"--calibration-data {str(path)!r} was preprocessed for another model (its preprocessing spec or "
            "layout differs from this export's manifest): rebuild it with --images"
        )
    static = tuple(d for d in input_shape[1:])
    if pixels.dtype != np.float32 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != static or len(pixels) == 0:
        raise CalibrationError(
            f"--calibration-data {str(path)!r} holds pixel_values {pixels.dtype} {list(pixels.shape)}; this export "
            f"needs float32 [N, {', '.join(map(str, static))}] with N >= 1"
        )
    tiles = arrays["tiles"].astype(np.int64)
    if int(tiles.sum()) != len(pixels) or len(arrays["names"]) != len(tiles):
        raise CalibrationError(f"--calibration-data {str(path)!r} is inconsistent (names, tiles and pixels disagree)")
    return CalibrationSet(pixels, tuple(str(n) for n in arrays["names"]), tiles, arrays["sizes"].astype(np.int64), spec)


def build(images: Path | None, calibration_data: Path | None, manifest: Manifest, export_dir: Path,
          input_shape: tuple) -> CalibrationSet:
    """The calibration set from --images (preprocessed here) or --calibration-data (read back)."""
    if calibration_data is not None:
        return read_npz(calibration_data, manifest, input_shape)
    paths = list_images(images)
    try:
        return from_images(paths, manifest, export_dir)
    except CalibrationError:
        raise
    except UserError as exc:  # the runtime's one-line InputError, e.g. a file that is not an image
        raise CalibrationError(f"--images {str(images)!r}: {exc}") from None


def llm_feeds(pipe, visual: list[np.ndarray], prompt: str) -> dict[str, np.ndarray]:
    """Prefill inputs of the LLM graph for each image's visual tokens in `prompt`, built by the runtime's
    own prompt rendering and splicing; one prompt for all, so every row has the same length. The KV cache
    is empty (past length 0), as at prefill."""
    ids = pipe.prompt_ids(prompt)
    embeds, mask = pipe.splice([ids] * len(visual), visual)  # [B, S, D], [B, S]
    llm = pipe.manifest.llm
    feeds = {
        names.INPUTS_EMBEDS: embeds,
        names.ATTENTION_MASK: mask,
        names.POSITION_IDS: prefill_position_ids(mask),
    }
    empty = np.zeros((len(visual), llm.num_kv_heads, 0, llm.head_dim), np.float32)
    for layer in range(llm.num_layers):
        feeds[llm.past_key.format(layer)] = empty
        feeds[llm.past_value.format(layer)] = empty
    return feeds


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
