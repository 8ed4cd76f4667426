"""Reading an export directory's data files so that a running Pipeline survives them being replaced.

A memory map of a file that is truncated or overwritten in place (what `cp` over an export does) kills the
process with SIGBUS on the next access, or silently feeds it other numbers. So nothing here keeps a map:

    EmbeddingTable      rows of embed_tokens.npy read with os.pread from a descriptor opened at load time: a
                        file renamed over it leaves the old one readable, a file changed in place is noticed
                        (size or mtime) and refused with one line
    read_npy            a small .npy read whole (the LLaVA-NeXT newline embedding), dtype and shape checked
    external_data       the graphs' external data read into memory for ONNX Runtime, which copies it into
                        its own tensors; by default ORT 1.31 maps `.data` files and keeps using parts of the map
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from contract.errors import ManifestError

_NPY_MAGIC = b"\x93NUMPY"


def npy_header(file, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an open .npy file; anything else (an .npz, a pickle, text) is refused."""
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise ManifestError(f"{path} is not a .npy array file ({reason}): re-export") from None
    if fortran or dtype.hasobject:
        raise ManifestError(f"{path} holds a {'Fortran-ordered' if fortran else 'object'} array: re-export")
    return tuple(shape), dtype, file.tell()


def read_npy(path: Path, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A whole small .npy file with exactly `dtype` and `shape` (no pickles, no mmap)."""
    try:
        with open(path, "rb") as file:
            found_shape, found_dtype, _ = npy_header(file, path)
            _check_array(path, found_shape, found_dtype, dtype, shape)
            data = file.read(int(np.prod(shape)) * found_dtype.itemsize + 1)
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}): re-export") from None
    if len(data) != int(np.prod(shape)) * found_dtype.itemsize:
        raise ManifestError(f"{path} has {len(data)} data bytes for shape {shape}: truncated or padded, re-export")
    return np.frombuffer(data, found_dtype).reshape(shape).astype(dtype)


def _check_array(path: Path, found_shape, found_dtype: np.dtype, dtype: str, shape: tuple[int, ...]) -> None:
    if found_dtype != np.dtype(dtype).newbyteorder("<") and found_dtype != np.dtype(dtype):
        raise ManifestError(f"{path} has dtype {found_dtype}, expected {dtype}: re-export")
    if found_shape != tuple(shape):
        raise ManifestError(f"{path} has shape {found_shape}, expected {tuple(shape)}: re-export")


class EmbeddingTable:
    """The LLM's input embedding table [V, D] float32, read row by row with os.pread (see the module doc).

    Indexes like the array it stands for: `table[i]` -> [D], `table[ids]` -> [len(ids), D].
    """

    def __init__(self, path: Path, vocab_size: int, hidden_size: int):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ManifestError(f"{self.path} cannot be read ({exc.strerror or exc}): re-export") from None
        try:
            with os.fdopen(os.dup(self._fd), "rb") as file:
                shape, dtype, self._offset = npy_header(file, self.path)
            _check_array(self.path, shape, dtype, "float32", (vocab_size, hidden_size))
            self._dtype = dtype
            self.shape = (vocab_size, hidden_size)
            self.dtype = np.dtype(np.float32)
            self._row_bytes = hidden_size * dtype.itemsize
            self._stamp = self._status()
            expected = self._offset + vocab_size * self._row_bytes
            if self._stamp[0] != expected:
                raise ManifestError(f"{self.path} has {self._stamp[0]} bytes, a {vocab_size}x{hidden_size} float32 "
                                    f"table needs {expected}: truncated or padded, re-export")
        except BaseException:
            self.close()
            raise

    def _status(self) -> tuple[int, int]:
        status = os.fstat(self._fd)
        return status.st_size, status.st_mtime_ns

    def __getitem__(self, ids) -> np.ndarray:
        single = isinstance(ids, (int, np.integer))
        rows = np.asarray([ids] if single else ids, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise ManifestError(f"token id {int(rows.max() if rows.max() >= self.shape[0] else rows.min())} is outside "
                                f"the {self.shape[0]}-row embedding table {self.path}: the tokenizer does not match "
                                "the export, re-export")
        if self._status() != self._stamp:
            raise ManifestError(f"{self.path} was changed while this pipeline used it (overwritten in place?): load "
                                "the export again; deploy new exports beside the old one and rename, never copy over it")
        if rows.size == 0:  # an empty slice (no text before the image): memoryview cannot cast an empty array
            return np.empty(np.shape(ids) + (self.shape[1],), np.float32)
        if rows.size > 16:  # a prompt repeats tokens: read each once
            unique, inverse = np.unique(rows, return_inverse=True)
        else:  # a decode step (one token per row): np.unique would cost more than it saves
            unique, inverse = rows, np.arange(rows.size)
        found = np.empty((unique.size, self.shape[1]), np.float32)  # native float32, as _check_array requires
        view, size, offset = memoryview(found).cast("B"), self._row_bytes, self._offset
        for i, row in enumerate(unique.tolist()):  # straight into the array: no bytes objects
            if os.preadv(self._fd, [view[i * size:(i + 1) * size]], offset + row * size) != size:
                raise ManifestError(f"{self.path} was truncated while this pipeline used it: load the export again")
        out = found[inverse.reshape(-1)]
        return out[0] if single else out.reshape(np.shape(ids) + (self.shape[1],))

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


# Larger weight files are left to ONNX Runtime, which maps them: copying them first would need their size
# twice in host memory while the session loads (a 7B fp16 LLM: 13 GB more on a Jetson that shares it).
MAX_COPIED_DATA_BYTES = 2 << 30


def external_data(directory: Path, graph_file: str, names) -> tuple[list[str], list[np.ndarray], list[int]]:
    """(names, buffers, lengths) for `SessionOptions.add_external_initializers_from_files_in_memory`: every
    file in `names` but the graph itself, up to MAX_COPIED_DATA_BYTES each, read whole. ORT copies
    initializers out of these buffers, so they may be dropped once the session exists; measured with ORT
    1.31: no map of the `.data` file stays, and a truncated or overwritten `.data` no longer changes or kills
    the running session. Larger files stay mapped by ORT: replace them only by renaming a new export in."""
    files, buffers = [], []
    for name in names:
        if name == graph_file:
            continue
        path = Path(directory) / name
        try:
            if path.stat().st_size > MAX_COPIED_DATA_BYTES:
                continue
        except OSError as exc:
            raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}): re-export") from None
        try:
            with open(path, "rb") as file:
                buffer = np.empty(os.fstat(file.fileno()).st_size, np.uint8)
                read = file.readinto(memoryview(buffer))
        except OSError as exc:
            raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}): re-export") from None
        if read != buffer.size:
            raise ManifestError(f"{path} changed while it was read: load the export again")
        files.append(name)
        buffers.append(buffer)
    return files, buffers, [b.size for b in buffers]


MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json of a 256k-token vocabulary is ~20 MB


def read_tokenizer(path: Path):
    """The export's tokenizers.Tokenizer; a file that is too large or not a tokenizer is one ManifestError."""
    from tokenizers import Tokenizer

    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise ManifestError(f"{path} cannot be read ({exc.strerror or exc}): re-export") from None
    if size > MAX_TOKENIZER_BYTES:
        raise ManifestError(f"{path} has {size} bytes, more than the {MAX_TOKENIZER_BYTES} a tokenizer may have: re-export")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises its own exception types
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ManifestError(f"{path} cannot be read as a tokenizer ({reason}): re-export") from None
