"""TensorRT engine metadata: what an engine was built from and for, and the checks that refuse a stale or
foreign engine. Shared by `python -m engines build` (writes it) and the runtime's TensorRT backend (checks
it); plain JSON and no TensorRT import, so the checks run and are tested anywhere.

    EXPORT_DIR/engines/vision.engine        the serialized engine (one per graph)
    EXPORT_DIR/engines/vision.engine.json   EngineMeta: the ONNX files' sha256, TensorRT version, GPU name and
                                            compute capability, build options, optimization profiles

An engine is *stale* when an ONNX file it was built from (graph and external data) or the engine file itself
has changed since the build, and *foreign* when the TensorRT version or the GPU's compute capability differs
from the one it was built with (TensorRT engines are specific to both). Either way it is refused with one
line that says how to rebuild.

Hashing a 7B model's 14 GB of weights at every start would take tens of seconds, so each recorded digest
also keeps the file's size and modification time: a file whose size and mtime (ns) are unchanged is taken
to still have the recorded sha256; any other file is hashed again and compared. A rewrite that keeps both
the size and the nanosecond mtime (a deliberate `touch -d`) is the one change this does not see.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.errors import ManifestError

ENGINES_DIR = "engines"
META_VERSION = 1
_CHUNK = 16 << 20


def rebuild_hint(export_dir: str | Path) -> str:
    return f"rebuild with `python -m engines build {export_dir}`"


def engine_path(export_dir: str | Path, graph: str) -> Path:
    return Path(export_dir) / ENGINES_DIR / f"{graph}.engine"


def meta_path(export_dir: str | Path, graph: str) -> Path:
    return Path(export_dir) / ENGINES_DIR / f"{graph}.engine.json"


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int
    mtime_ns: int


def digest(path: Path) -> FileDigest:
    """sha256 of a file, read in 16 MB chunks, with its size and mtime."""
    sha = hashlib.sha256()
    stat = path.stat()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return FileDigest(sha.hexdigest(), stat.st_size, stat.st_mtime_ns)


def changed(path: Path, recorded: FileDigest) -> str | None:
    """Why `path` no longer matches `recorded`, or None (see the module doc for the size/mtime fast path)."""
    if not path.is_file():
        return f"{path.name} is missing"
    stat = path.stat()
    if stat.st_size != recorded.size:
        return f"{path.name} has {stat.st_size} bytes, {recorded.size} when the engine was built"
    if stat.st_mtime_ns == recorded.mtime_ns:
        return None
    if digest(path).sha256 != recorded.sha256:
        return f"{path.name} changed since the engine was built (sha256 differs)"
    return None


@dataclass(frozen=True)
class EngineMeta:
    graph: str  # the manifest's graph name
    engine: FileDigest  # of engines/<graph>.engine
    onnx: dict[str, FileDigest]  # ONNX files it was built from (graph and .data), names relative to the export
    tensorrt: str  # tensorrt.__version__ at build time
    gpu_name: str
    compute_capability: str  # "8.7"
    options: dict  # build options that shape the engine (precision, sizes, workspace, TensorRT major)
    precision: dict  # what the graph actually got: network typing, builder flags, layers pinned to FP32
    profiles: list  # [{"name": "prefill", "shapes": {tensor: [min, opt, max]}}, ...] in profile order
    built: dict = field(default_factory=dict)  # when, how long, prunevlm version
    format_version: int = META_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> "EngineMeta":
        try:
            data = json.loads(text)
            if data.get("format_version") != META_VERSION:
                raise ValueError(f"format_version {data.get('format_version')!r}, this runtime reads {META_VERSION}")
            data["engine"] = FileDigest(**data["engine"])
            data["onnx"] = {name: FileDigest(**d) for name, d in data["onnx"].items()}
            return cls(**data)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is not valid engine metadata ({type(exc).__name__}: {exc})") from None


def read_meta(export_dir: str | Path, graph: str) -> EngineMeta:
    """The metadata of `graph`'s engine; ManifestError (with the rebuild command) when there is none."""
    path = meta_path(export_dir, graph)
    if not engine_path(export_dir, graph).is_file() or not path.is_file():
        raise ManifestError(f"no TensorRT engine for the {graph!r} graph in {Path(export_dir) / ENGINES_DIR}: "
                            f"build them with `python -m engines build {export_dir}`")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} cannot be read ({exc}); {rebuild_hint(export_dir)}") from None
    meta = EngineMeta.from_json(text, str(path))
    if meta.graph != graph:
        raise ManifestError(f"{path} describes the {meta.graph!r} graph, not {graph!r}; {rebuild_hint(export_dir)}")
    return meta


def stale_reason(export_dir: str | Path, meta: EngineMeta) -> str | None:
    """Why the engine no longer matches its ONNX files or its own recorded digest, or None."""
    directory = Path(export_dir)
    for name, recorded in meta.onnx.items():
        why = changed(directory / name, recorded)
        if why:
            return why
    return changed(engine_path(directory, meta.graph), meta.engine)


def foreign_reason(meta: EngineMeta, tensorrt_version: str, compute_capability: str) -> str | None:
    """Why this TensorRT or GPU cannot run the engine, or None. Engines are tied to the exact TensorRT
    version and to the GPU architecture they were built for."""
    if meta.tensorrt != tensorrt_version:
        return f"it was built with TensorRT {meta.tensorrt}, this is TensorRT {tensorrt_version}"
    if meta.compute_capability != compute_capability:
        return (f"it was built for a GPU of compute capability {meta.compute_capability} ({meta.gpu_name}), "
                f"this GPU has {compute_capability}")
    return None


def check_engine(export_dir: str | Path, graph: str, tensorrt_version: str | None = None,
                 compute_capability: str | None = None) -> EngineMeta:
    """The engine's metadata after refusing a missing, stale or (when the versions are given) foreign engine."""
    meta = read_meta(export_dir, graph)
    why = stale_reason(export_dir, meta)
    if why:
        raise ManifestError(f"the TensorRT engine for {graph!r} is stale: {why}; {rebuild_hint(export_dir)}")
    if tensorrt_version is not None and compute_capability is not None:
        why = foreign_reason(meta, tensorrt_version, compute_capability)
        if why:
            raise ManifestError(f"the TensorRT engine for {graph!r} cannot run here: {why}; "
                                f"{rebuild_hint(export_dir)} on this machine")
    return meta
