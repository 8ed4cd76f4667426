"""Frame sources for the perception loop (runtime/watch.py): cameras and streams, video files, folders of
images, Python iterables. Each is an iterator of frames (HxWx3 uint8 RGB arrays, PIL images or paths) that
the loop's capture thread drains; `close()` releases what the source holds (device, file, decoder).

    open_source(source, realtime) -> Source
      int                      camera index           OpenCV VideoCapture (live)
      str URL / pipeline       rtsp://, http://, GStreamer string: OpenCV VideoCapture (live)
      existing video file      PyAV, the containers of runtime/video.py; as fast as the loop takes frames, or at
                               the file's own frame rate with realtime=True (live)
      existing directory       its images in name order (extensions in IMAGE_EXTENSIONS)
      any other iterable       its items, as they come (live)

Live sources run at their own pace: the loop keeps only their newest frame. The others wait for the loop,
so every frame is answered. OpenCV (`prunevlm[camera]`) is imported only when a camera or a stream is opened.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from contract.errors import InputError
from runtime.preprocess import describe_path
from runtime.video import import_av, open_container, refuse_playlist, refuse_still_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm",
                              ".pbm"})
"""Files of a folder source that are read (by name; runtime.preprocess still checks each file's content)."""
MAX_RECONNECTS = 1000  # bound on Camera(reconnects=...)


class Source:
    """An iterator of frames with `live` (runs at its own pace), `corrupt` (frames it could not decode and
    skipped) and `close()`."""

    live = False
    corrupt = 0
    reconnects = 0

    def __iter__(self) -> Iterator:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Camera(Source):
    """A camera index, URL or GStreamer pipeline string opened with OpenCV's VideoCapture. A failed read
    reopens the capture up to `reconnects` times in a row (`delay_s` apart), then raises InputError."""

    live = True

    def __init__(self, target: int | str, reconnects: int = 3, delay_s: float = 0.5):
        if isinstance(reconnects, bool) or not isinstance(reconnects, int) or not 0 <= reconnects <= MAX_RECONNECTS:
            raise InputError(f"reconnects={reconnects!r} must be an integer in 0..{MAX_RECONNECTS}")
        self.target, self.reconnects_allowed, self.delay_s = target, reconnects, delay_s
        self.name = f"camera {target}" if isinstance(target, int) else f"video stream {target!r}"
        self.cv2 = _import_cv2()
        self.capture = self._open()
        if self.capture is None:
            raise InputError(f"{self.name} cannot be opened (OpenCV VideoCapture failed): check the index, URL or "
                             "pipeline and that nothing else holds the device")

    def _open(self):
        capture = self.cv2.VideoCapture(self.target)
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def __iter__(self) -> Iterator[np.ndarray]:
        failures = 0
        while True:
            ok, frame = (False, None) if self.capture is None else self.capture.read()
            if ok and frame is not None and frame.ndim == 3 and frame.shape[2] == 3:
                failures = 0
                yield frame[:, :, ::-1]  # BGR -> RGB (a view: load_image copies it)
                continue
            if ok:  # a frame OpenCV decoded to something that is not a colour image
                self.corrupt += 1
                continue
            failures += 1
            if failures > self.reconnects_allowed:
                raise InputError(f"{self.name} disconnected: no frame after {self.reconnects_allowed} reconnect "
                                 "attempts (raise --reconnects to wait longer)")
            self.reconnects += 1
            self.close()
            time.sleep(self.delay_s)
            self.capture = self._open()

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


def _import_cv2():
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")  # its warnings would break the one-line error contract
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    try:
        import cv2
    except ImportError:
        raise InputError("cameras and video streams need OpenCV: pip install 'prunevlm[camera]' "
                         "(or pass a video file, a folder of images or an iterable of frames)") from None
    return cv2


class VideoFile(Source):
    """A local video file decoded with PyAV (same containers and checks as runtime/video.py). Packets that
    do not decode are skipped and counted. realtime=True: frames come at the file's own rate (live)."""

    def __init__(self, path: Path, realtime: bool = False):
        self.path, self.live = path, realtime
        self.name = f"video file {describe_path(path)}"
        refuse_playlist(path, self.name)
        refuse_still_image(path, self.name)
        self.av = import_av()
        try:
            self.container = open_container(self.av, path)
        except self.av.FFmpegError as exc:
            raise InputError(f"cannot decode {self.name}: {exc.strerror or exc}") from None
        if not self.container.streams.video:
            self.close()
            raise InputError(f"{self.name} has no video stream")

    def __iter__(self) -> Iterator[np.ndarray]:
        stream = self.container.streams.video[0]
        start = time.perf_counter()
        for packet in self.container.demux(stream):
            try:
                frames = packet.decode()
            except self.av.FFmpegError:
                self.corrupt += 1
                continue
            for frame in frames:
                if self.live and frame.time is not None:  # play at the file's own rate
                    time.sleep(max(0.0, start + frame.time - time.perf_counter()))
                yield frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        self.container.close()


class Folder(Source):
    """The images of a directory in name order; a file that does not load is skipped and counted (by the loop)."""

    def __init__(self, path: Path):
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.name.startswith(".") and p.is_file())
        if not self.files:
            raise InputError(f"folder {describe_path(path)} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")

    def __iter__(self) -> Iterator[Path]:
        return iter(self.files)


class Frames(Source):
    """Any iterable of frames (arrays, PIL images, paths): live, it is drained as fast as it yields."""

    live = True

    def __init__(self, frames: Iterable, live: bool = True):
        self.frames, self.live = frames, live

    def __iter__(self) -> Iterator:
        self.iterator = iter(self.frames)
        return self.iterator

    def close(self) -> None:
        """Close a generator (runs its `finally`); called from the thread that iterated it."""
        close = getattr(getattr(self, "iterator", None), "close", None)
        if close is not None:
            close()


def open_source(source, realtime: bool = False, reconnects: int = 3) -> Source:
    """A Source for `source` (see the module doc). A str that names no existing file or folder is a stream."""
    if isinstance(source, Source):
        return source
    if isinstance(source, bool):
        raise InputError(f"source {source!r} is not a camera index, a URL, a file, a folder or an iterable of frames")
    if isinstance(source, int):
        if source < 0:
            raise InputError(f"camera index {source} must be >= 0")
        return Camera(source, reconnects)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return Folder(path)
        if path.is_file():
            return VideoFile(path, realtime)
        if isinstance(source, Path) or "://" not in source and "!" not in source:
            raise InputError(f"{describe_path(source)} is not a file, a folder, a URL (scheme://...) or a GStreamer "
                             "pipeline (with '!')")
        return Camera(source, reconnects)
    if isinstance(source, (np.ndarray, bytes)) or not hasattr(source, "__iter__"):
        raise InputError(f"source of type {type(source).__name__} is not a camera index, a URL, a file, a folder "
                         "or an iterable of frames")
    return Frames(source)
