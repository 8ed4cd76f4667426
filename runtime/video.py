"""Videos for the `frames` layout: a file decoded with PyAV, a list of frames or a [T, H, W, 3] array,
sampled to the export's frame count, each frame preprocessed like an image.

Sampling is Video-LLaVA's (`LanguageBindVideoProcessor`): `np.linspace(0, T - 1, num_frames, dtype=int)`,
first and last frame included. A video with fewer than `num_frames` frames is refused, as transformers'
sampler (`default_sample_indices_fn`) refuses it: linspace would repeat frames, which the model never saw
in training, and a short "video" is more often a mistake (a still image, a wrong file) than a clip.

Files are decoded with PyAV (the optional dependency `prunevlm[video]`), frame by frame in decode order,
converted with `to_ndarray(format="rgb24")` as transformers' `read_video_pyav` does; only the sampled
frames are converted and kept. Only the container formats in CONTAINERS are demuxed and only local files
are read (FFmpeg's `format_whitelist` and `protocol_whitelist`): a playlist (HLS `.m3u8`, `.m3u`, `.pls`,
DASH `.mpd`, `ffconcat`) names other files or URLs and is refused before FFmpeg sees it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from contract.errors import InputError
from contract.manifest import Manifest, ModalitySpec
from runtime.preprocess import ALLOWED_FORMATS, ImageSource, describe_path, load_image, preprocess

VideoSource = str | Path | np.ndarray | Sequence[ImageSource]

CONTAINERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "asf",
              "ogg", "gif", "h264", "hevc", "m4v")
"""FFmpeg demuxers a video file may be read with (MP4/MOV, MKV/WebM, AVI, MPEG-TS/PS, FLV, WMV, Ogg, animated
GIF, raw H.264/HEVC/MPEG-4). Demuxers that open other files (hls, concat, dash, image2, ...) are not among them."""
_AV_OPTIONS = {"format_whitelist": ",".join(CONTAINERS), "protocol_whitelist": "file"}

_PLAYLIST_EXTENSIONS = frozenset({".m3u8", ".m3u", ".pls", ".mpd", ".ffconcat", ".xspf", ".asx", ".smil"})
_PLAYLIST_STARTS = {b"#EXTM3U": "M3U/HLS", b"#EXT-X-": "HLS", b"ffconcat": "ffconcat", b"[playlist]": "PLS",
                    b"<": "XML (DASH, XSPF, ASX or SMIL)"}


def sample_indices(total: int, num_frames: int, what: str) -> np.ndarray:
    """Video-LLaVA's uniform sampling of `num_frames` of `total` frames (see the module doc)."""
    if total < num_frames:
        raise InputError(f"{what} has {total} frame{'s' * (total != 1)}; this export samples {num_frames} frames "
                         f"per video: give a video with at least {num_frames} frames")
    return np.linspace(0, total - 1, num_frames, dtype=int)


def load_frames(source: VideoSource, num_frames: int) -> list[Image.Image]:
    """The `num_frames` sampled frames of a video, as RGB PIL images (see the module doc).

    source: a video file, a list/tuple of frames (paths, PIL images or HxWx3 uint8 arrays; only the sampled
    ones are loaded), or a [T, H, W, 3] uint8 array. A single image is refused with a line that says so.
    """
    if isinstance(source, (str, Path)):
        return _decode_file(Path(source), num_frames)
    if isinstance(source, (list, tuple)):
        indices = sample_indices(len(source), num_frames, f"the list of {len(source)} frames")
        return [load_image(source[i]) for i in indices]
    if isinstance(source, np.ndarray) and source.ndim == 4:
        if source.dtype != np.uint8 or source.shape[-1] != 3:
            raise InputError(f"a video array must be [T, H, W, 3] uint8, got shape {source.shape} "
                             f"and dtype {source.dtype}")
        indices = sample_indices(len(source), num_frames, f"the video array of shape {source.shape}")
        return [load_image(source[i]) for i in indices]
    if isinstance(source, (np.ndarray, Image.Image)):
        what = (f"array of shape {source.shape}" if isinstance(source, np.ndarray)
                else f"PIL image {source.width}x{source.height}")
        raise InputError(f"got a single image ({what}) where a video is expected: give a video file, a list of "
                         "frames or a [T, H, W, 3] array, or pass the image as an image")
    raise InputError(f"video source must be a file path, a list of frames or a [T, H, W, 3] array, "
                     f"got {type(source).__name__}")


def import_av():
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV: pip install 'prunevlm[video]' "
                         "(or pass the frames as a list of images)") from None
    return av


def _decode_file(path: Path, num_frames: int) -> list[Image.Image]:
    """Decode once, keeping only the sampled frames. The frame count comes from the container (trusted, as
    transformers' `read_video_pyav` trusts it); when it is missing (0) or too high (the stream ends before
    the last sampled frame), a counting pass is run and the file decoded again."""
    name = describe_path(path)
    if not path.exists():
        raise InputError(f"video file not found: {name}")
    if not path.is_file():
        raise InputError(f"video path is not a file: {name}")
    refuse_playlist(path, name)
    refuse_still_image(path, name)
    av = import_av()
    try:
        with open_container(av, path) as container:
            if not container.streams.video:
                raise InputError(f"{name} has no video stream (streams: {[s.type for s in container.streams]})")
            total = container.streams.video[0].frames
        if total >= num_frames:
            frames = _pick(av, path, sample_indices(total, num_frames, f"video file {name}"), name)
            if frames is not None:
                return frames
        total = _count(av, path)
        frames = _pick(av, path, sample_indices(total, num_frames, f"video file {name}"), name)
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode video file {name}: {exc.strerror or exc}; the runtime reads the "
                         f"containers {', '.join(CONTAINERS)}") from None
    if frames is None:  # pragma: no cover - the second pass decodes the same frames it just counted
        raise InputError(f"cannot decode video file {name}: the number of decoded frames changed between passes")
    return frames


def open_container(av, path: Path):
    """A container restricted to CONTAINERS and to local files (FFmpeg refuses anything else when opening)."""
    return av.open(os.fspath(path), container_options=_AV_OPTIONS)


def refuse_playlist(path: Path, name: str) -> None:
    """A playlist names other files (or URLs) for FFmpeg to read: refused by its name or its first bytes."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as exc:
        raise InputError(f"video file {name} cannot be read ({exc.strerror or exc})") from None
    kind = next((kind for magic, kind in _PLAYLIST_STARTS.items() if start.startswith(magic)), None)
    if kind is None and path.suffix.lower() in _PLAYLIST_EXTENSIONS:
        kind = path.suffix.lower()
    if kind is not None:
        raise InputError(f"video file {name} is a playlist ({kind}) that names other files; give the video "
                         "file itself")


def _pick(av, path: Path, indices: np.ndarray, name: str) -> list[Image.Image] | None:
    """The frames at `indices` (sorted, distinct) in decode order; None when the stream ends first."""
    wanted = {int(i) for i in indices}
    found: dict[int, Image.Image] = {}
    with open_container(av, path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                found[position] = Image.fromarray(frame.to_ndarray(format="rgb24"))
                found[position].info["source"] = f"frame {position} of video file {name}"
                if len(found) == len(wanted):
                    break
    if len(found) < len(wanted):
        return None
    return [found[int(i)] for i in indices]


def _count(av, path: Path) -> int:
    with open_container(av, path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def refuse_still_image(path: Path, name: str) -> None:
    """A still image file (which FFmpeg would read as a 1-frame video) gets a line that names the mix-up.
    Only the image decoders the runtime allows are tried (never EPS, which would run Ghostscript)."""
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as image:
            frames, kind = getattr(image, "n_frames", 1), image.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return  # not an image PIL knows: a video, or garbage that PyAV will refuse
    if frames == 1:
        raise InputError(f"{name} is a still image ({kind}), not a video: pass it as an image (--image)")


class Frames:
    """Layout `frames`: a video is `num_frames` sub-images; its tokens are each frame's in frame order
    (within a frame: whatever the projector returns, kept patches in raster order, after [CLS] if kept)."""

    def __init__(self, modality: ModalitySpec, manifest: Manifest, directory: Path):
        self.spec = modality.preprocess
        self.num_frames = modality.layout.num_frames

    def tiles(self, source: VideoSource) -> tuple[np.ndarray, tuple[int, int]]:
        frames = load_frames(source, self.num_frames)
        return preprocess(frames, self.spec), (frames[0].height, frames[0].width)  # [F, 3, H, W]

    def assemble(self, embeds: np.ndarray, kept: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return embeds.reshape(-1, embeds.shape[-1])  # [F, T, D] -> [F*T, D], frame-major
