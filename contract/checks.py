"""Checks of untrusted manifest values: types, ranges and paths, each failing with one ManifestError line.

An export directory may come from another machine. Every value the runtime sizes memory or loops by is
bounded here, when the manifest is read, so a hand-edited `manifest.json` is refused before anything is
allocated: `num_layers=100000000` or `shortest_edge=1000000` never reach the code that would use them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath

from contract.errors import ManifestError

MAX_LAYERS = 1024  # decoder layers (the largest public LLMs have ~130)
MAX_HEADS = 1024
MAX_WIDTH = 1 << 17  # hidden sizes, head dims, feature widths
MAX_VOCAB = 1 << 24
MAX_SEQ_LEN = 1 << 22  # prompt + answer tokens (4M; Qwen's longest context is 1M)
MAX_TENSOR_DIM = 1 << 24  # a static size in a tensor shape
MAX_RANK = 8
MAX_IMAGE_SIDE = 4096  # preprocess sizes (CLIP towers use 224..448; LLaVA-NeXT tiles 336)
MAX_LAYOUT_SIDE = 4 * MAX_IMAGE_SIDE  # anyres resolutions and pinpoints
MAX_NAME = 256  # tensor names, patterns, file names, placeholders
MAX_TEMPLATE = 1 << 20  # chat template characters (real ones are 1-30 KB)
MAX_ENTRIES = 4096  # entries in a manifest dict or list (graph inputs: 2 per layer + 3)
_PATTERN = re.compile(r"[^{}]*\{\}[^{}]*")  # a tensor-name pattern: exactly one plain `{}`, no other braces
_SHA256 = re.compile(r"[0-9a-f]{64}")


def integer(value, field: str, low: int, high: int) -> int:
    """An int (not a bool, not a float) in low..high."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"manifest field {field}={_short(value)} must be an integer in {low}..{high}: re-export")
    return value


def number(value, field: str, positive: bool = False) -> float:
    """A finite real number (not a bool), > 0 when `positive`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        wanted = "a finite number > 0" if positive else "a finite number"
        raise ManifestError(f"manifest field {field}={_short(value)} must be {wanted}: re-export")
    return float(value)


def boolean(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"manifest field {field}={_short(value)} must be true or false: re-export")
    return value


def choice(value, field: str, allowed: tuple[str, ...]) -> str:
    """One of the strings `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise ManifestError(f"manifest field {field}={_short(value)} must be one of {', '.join(allowed)}: re-export")
    return value


def text(value, field: str, limit: int = MAX_NAME, empty: bool = False) -> str:
    """A str of at most `limit` characters without NUL; one line unless it is a template."""
    if not isinstance(value, str) or len(value) > limit or (not value and not empty) or "\0" in value:
        raise ManifestError(
            f"manifest field {field}={_short(value)} must be a{'' if empty else ' non-empty'} string of at most "
            f"{limit} characters: re-export"
        )
    if limit <= MAX_NAME and ("\n" in value or "\r" in value):
        raise ManifestError(f"manifest field {field}={_short(value)} must be one line: re-export")
    return value


def mapping(value, field: str, limit: int = MAX_ENTRIES) -> dict:
    if not isinstance(value, dict) or len(value) > limit:
        raise ManifestError(f"manifest field {field} must be an object with at most {limit} entries, got "
                            f"{type(value).__name__}: re-export")
    return value


def sequence(value, field: str, low: int = 0, high: int = MAX_ENTRIES) -> tuple:
    if not isinstance(value, (list, tuple)) or not low <= len(value) <= high:
        raise ManifestError(f"manifest field {field}={_short(value)} must be a list of {low}..{high} entries: re-export")
    return tuple(value)


def pattern(value, field: str) -> str:
    """A tensor-name pattern formatted with the layer index: exactly one plain `{}` and no other braces
    (so `str.format` can neither pad (`{:>900000000}`) nor look anything up)."""
    text(value, field)
    if not _PATTERN.fullmatch(value):
        raise ManifestError(f"manifest field {field}={_short(value)} must contain exactly one '{{}}' and no other "
                            "braces (e.g. 'past_key_values.{}.key'): re-export")
    return value


def relative_path(value, field: str) -> str:
    """A file name inside the export directory: relative, no `..`, no backslashes, one line."""
    text(value, field)
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value or value in (".", "") or value.startswith("~"):
        raise ManifestError(f"manifest field {field}={_short(value)} must be a relative path inside the export "
                            "directory: re-export")
    return value


def inside(root: Path, name: str, field: str) -> Path:
    """root / name, refused unless it resolves (symlinks followed) inside the resolved root."""
    top = root.resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ManifestError(f"{root / name} ({field}) cannot be resolved ({exc}): re-export") from None
    if target != top and top not in target.parents:
        raise ManifestError(f"{root / name} ({field}) resolves to {str(target)!r}, outside the export directory "
                            f"{str(top)!r}: refused, re-export")
    return root / name


def sha256(value, field: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ManifestError(f"manifest field {field}={_short(value)} must be 64 lowercase hex digits: re-export")
    return value


def _short(value) -> str:
    """repr of a value, cut to one short line (an attacker's value may be huge or multi-line)."""
    if isinstance(value, (dict, list, tuple)) and len(value) >= 20:
        return f"<{type(value).__name__} of {len(value)} entries>"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text[:80] + ("..." if len(text) > 80 else "")
