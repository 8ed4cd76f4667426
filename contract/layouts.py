"""Token layouts: a closed set of typed specs, one per way an item becomes sub-images and LLM tokens.

A layout says how an image (or video) is cut into sub-images for the vision graph, and in which order the
sub-images' kept tokens reach the LLM. The manifest stores one per modality (`{"name": ..., fields}`);
`sub_images` is what the engine builder and the calibrator size batches by, and what the runtime cuts.
The runtime's implementation of each is in runtime/layout.py, keyed by the same `name`.

    single             one sub-image; its K kept tokens in raster order                       (LLaVA-1.5)
    anyres_fastervlm   base image + a fixed grid of tiles, K kept per sub-image; base tokens first, then the
                       tiles' tokens in raster order over the stitched grid (FasterVLM's LLaVA-NeXT protocol)
    anyres_hf          the released LLaVA-NeXT layout, unpruned: grid chosen by aspect ratio among the
                       pinpoints, padding removed, a newline embedding after every row
    frames             a video: num_frames frames sampled uniformly, each a sub-image, in frame order
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Union

from contract.errors import ManifestError

MAX_SUB_IMAGES = 64  # a bound on untrusted manifests; LLaVA-NeXT's largest pinpoint grid has 1 + 9


@dataclass(frozen=True)
class SingleLayout:
    name: ClassVar[str] = "single"
    unpruned_only: ClassVar[bool] = False

    @property
    def sub_images(self) -> int:
        return 1


@dataclass(frozen=True)
class AnyresFasterVLMLayout:
    resolution: tuple[int, int]  # (height, width) the image is fitted into (672x672 for FasterVLM)
    tile: int  # tile side in pixels (the vision tower's input size)
    name: ClassVar[str] = "anyres_fastervlm"
    unpruned_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", _pair(self.resolution, "resolution"))
        _positive(self.tile, "tile")
        if self.resolution[0] % self.tile or self.resolution[1] % self.tile:
            raise ManifestError(f"layout {self.name}: resolution {self.resolution} is not a multiple of tile {self.tile}")
        _bounded(self.sub_images, self.name)

    @property
    def grid(self) -> tuple[int, int]:
        return self.resolution[0] // self.tile, self.resolution[1] // self.tile

    @property
    def sub_images(self) -> int:
        return self.grid[0] * self.grid[1] + 1  # the tiles and the base image


@dataclass(frozen=True)
class AnyresHFLayout:
    grid_pinpoints: tuple[tuple[int, int], ...]  # candidate (height, width) resolutions
    tile: int
    newline: str  # .npy file in the export directory with the newline embedding [D]
    name: ClassVar[str] = "anyres_hf"
    unpruned_only: ClassVar[bool] = True  # it places every patch (keep == num_patches)

    def __post_init__(self) -> None:
        if not isinstance(self.grid_pinpoints, (list, tuple)) or not self.grid_pinpoints:
            raise ManifestError(f"layout {self.name}: grid_pinpoints {self.grid_pinpoints!r} is not a non-empty list")
        object.__setattr__(self, "grid_pinpoints", tuple(_pair(p, "grid_pinpoints") for p in self.grid_pinpoints))
        _positive(self.tile, "tile")
        if not isinstance(self.newline, str) or not self.newline:
            raise ManifestError(f"layout {self.name}: newline {self.newline!r} is not a file name")
        _bounded(self.sub_images, self.name)

    @property
    def sub_images(self) -> int:
        """The most sub-images any image can give (the largest pinpoint grid + the base image)."""
        return max((h // self.tile) * (w // self.tile) for h, w in self.grid_pinpoints) + 1


@dataclass(frozen=True)
class FramesLayout:
    num_frames: int  # frames sampled per video
    name: ClassVar[str] = "frames"
    unpruned_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _positive(self.num_frames, "num_frames")
        _bounded(self.num_frames, self.name)

    @property
    def sub_images(self) -> int:
        return self.num_frames


Layout = Union[SingleLayout, AnyresFasterVLMLayout, AnyresHFLayout, FramesLayout]
LAYOUTS: dict[str, type] = {cls.name: cls for cls in (SingleLayout, AnyresFasterVLMLayout, AnyresHFLayout, FramesLayout)}


def token_sources(layout: Layout, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """(sub-image, patch index) of each visual token of an unpruned item, in LLM order; `grid` is one
    sub-image's patch grid (rows, cols). In-LLM pruning indexes its window with this list (the uniform grid
    of each sub-image is found through it), and `--positions original` gives each kept token its index here.

        single             (0, p) for p in raster order
        frames             (f, p): frame after frame, each in raster order
        anyres_fastervlm   the base image (0, p), then the tiles' patches in raster order over the stitched grid
        anyres_hf          none: its token count depends on the image and its newline tokens are no patch
    """
    rows, cols = grid
    per = rows * cols
    if isinstance(layout, SingleLayout):
        return [(0, p) for p in range(per)]
    if isinstance(layout, FramesLayout):
        return [(f, p) for f in range(layout.num_frames) for p in range(per)]
    if isinstance(layout, AnyresFasterVLMLayout):
        tiles_y, tiles_x = layout.grid
        stitched = [(1 + (y // rows) * tiles_x + x // cols, (y % rows) * cols + x % cols)
                    for y in range(tiles_y * rows) for x in range(tiles_x * cols)]
        return [(0, p) for p in range(per)] + stitched
    raise ValueError(f"layout {layout.name} places a data-dependent number of tokens (unpadding, newline tokens); "
                     "it has no fixed token window")


def uniform_grid(layout: Layout, grid: tuple[int, int], stride: int) -> list[int]:
    """Window indices of grid[::stride, ::stride] of every sub-image (FEATHER's stage-1 uniform sample)."""
    cols = grid[1]
    return [w for w, (_, p) in enumerate(token_sources(layout, grid)) if (p // cols) % stride == 0 and (p % cols) % stride == 0]


def layout_from_dict(data) -> Layout:
    if not isinstance(data, dict) or data.get("name") not in LAYOUTS:
        name = data.get("name") if isinstance(data, dict) else data
        raise ManifestError(f"layout {name!r} is unknown; known layouts: {', '.join(sorted(LAYOUTS))}")
    fields = {k: v for k, v in data.items() if k != "name"}
    try:
        return LAYOUTS[data["name"]](**fields)
    except TypeError as exc:
        raise ManifestError(f"layout {data['name']!r} has fields {sorted(fields)}: {exc}") from None


def layout_to_dict(layout: Layout) -> dict:
    return {"name": layout.name, **asdict(layout)}


def _positive(value, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ManifestError(f"layout field {field}={value!r} must be a positive integer")


def _pair(value, field: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ManifestError(f"layout field {field}={value!r} must be a (height, width) pair")
    for v in value:
        _positive(v, field)
    return int(value[0]), int(value[1])


def _bounded(count: int, name: str) -> None:
    if count > MAX_SUB_IMAGES:
        raise ManifestError(f"layout {name} gives {count} sub-images per item; at most {MAX_SUB_IMAGES} are supported")
