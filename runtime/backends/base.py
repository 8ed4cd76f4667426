"""What every backend provides to the pipeline: runners (one per graph) and a splice step.

    Runner    one graph or engine: activate / infer / infer_bound / deactivate, also a context manager
              (Polygraphy's runner lifecycle). Feeds are checked against the graph's spec (`check_feeds`)
              before anything runs. `infer` returns numpy arrays; `infer_bound` returns values that stay in
              the backend's memory (ONNX Runtime OrtValues, TensorRT DeviceTensors), can be fed to the next
              call without a copy (a KV cache, the vision graph's output to the projector) and have `.numpy()`.
    Splicer   where the visual tokens live between the projector and the LLM. `HostSplicer` (ONNX Runtime)
              reads them back and orders them on the host; the TensorRT backend's splicer keeps them on the
              device and copies them into the LLM engine's input buffer.

The pipeline (runtime/pipeline.py) is written against these two protocols only and imports no backend
at module level.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from contract.errors import InputError
from contract.manifest import NUMPY_DTYPES, GraphSpec


@runtime_checkable
class Runner(Protocol):
    """Runs one graph of an export directory (an ONNX session, a TensorRT engine)."""

    spec: GraphSpec  # the graph's inputs and outputs as the manifest declares them

    def activate(self) -> Runner:
        """Load the graph (idempotent); returns self."""

    def deactivate(self) -> None:
        """Release what activate() acquired (idempotent)."""

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on checked feeds; numpy outputs by name."""

    def infer_bound(self, feeds: Mapping[str, Any], into: Mapping[str, np.ndarray] | None = None,
                    handles: dict | None = None) -> dict[str, Any]:
        """Run on checked feeds (numpy or this backend's values); outputs stay in the backend's memory.
        `into` (output name -> host array, which may also be a feed): write those outputs there in place, for
        an export whose KV cache is a buffer (`llm.kv_cache` "buffer", ONNX Runtime only); `handles`: a dict
        the caller keeps as long as those arrays, where the backend keeps its own views of them between calls."""


def activate_all(runners: Mapping[str, Runner]) -> dict[str, Runner]:
    """Activate every runner in order; if one fails, deactivate those already active and re-raise."""
    active: list[Runner] = []
    try:
        for runner in runners.values():
            active.append(runner.activate())
    except BaseException:
        for runner in active:
            runner.deactivate()
        raise
    return dict(runners)


def describe_array(value) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a numpy array or of anything with numpy-like `.shape` and `.dtype`."""
    return tuple(int(d) for d in value.shape), str(np.dtype(value.dtype))


def check_feeds(spec: GraphSpec, feeds: Mapping[str, Any],
                describe: Callable[[Any], tuple[tuple[int, ...], str]] = describe_array) -> None:
    """Names, dtypes and shapes of `feeds` against `spec`; a named axis must have one size across inputs.
    `describe(value) -> (shape, dtype name)` reads a backend's own values (numpy-like ones by default)."""
    expected = {t.name for t in spec.inputs}
    if set(feeds) != expected:
        missing, extra = sorted(expected - set(feeds)), sorted(set(feeds) - expected)
        raise InputError(f"{spec.file}: missing inputs {missing}, unexpected inputs {extra}")
    axes: dict[str, int] = {}
    for t in spec.inputs:
        value = feeds[t.name]
        if isinstance(value, np.ndarray) and value.dtype == _DTYPES[t.dtype]:  # the common case, without names
            shape = value.shape
        else:
            shape, dtype = describe(value)
            if dtype != NUMPY_DTYPES[t.dtype]:
                raise InputError(f"{spec.file}: input {t.name!r} has dtype {dtype}, expected {t.dtype}")
        if len(shape) != len(t.shape):
            raise InputError(f"{spec.file}: input {t.name!r} has shape {tuple(shape)}, expected {t.shape}")
        for size, dim in zip(shape, t.shape):
            if isinstance(dim, int) and size != dim:
                raise InputError(f"{spec.file}: input {t.name!r} has shape {tuple(shape)}, expected {t.shape}")
            if isinstance(dim, str) and axes.setdefault(dim, size) != size:
                raise InputError(f"{spec.file}: input {t.name!r} has {dim}={size}, other inputs have {axes[dim]}")


_DTYPES = {name: np.dtype(numpy_name) for name, numpy_name in NUMPY_DTYPES.items()}


def to_numpy(value) -> np.ndarray:
    """A bound output (OrtValue, DeviceTensor) or a numpy array, as a numpy array."""
    return value if isinstance(value, np.ndarray) else value.numpy()


class Splicer(Protocol):
    """The splice step: visual tokens from the projector's output, and the LLM's input embeddings from the
    text embeddings with those tokens written in. The pipeline computes every position; a splicer only
    decides in which memory the tokens stay and how they are copied."""

    def tokens(self, layout, embeds, kept: np.ndarray, items: Sequence[tuple[slice, tuple[int, int]]]) -> list:
        """Per item, its visual tokens in LLM order ([T, D] on the host, or a device view).

        embeds: the projector's bound output [sum S, K, D]; kept [sum S, K]; items: (rows of embeds and kept
        that are the item's sub-images, the item's original (height, width)), in order."""

    def fill(self, text: np.ndarray, visual: Sequence[tuple[int, int, Any]]):
        """text [B, S, D] float32: text embeddings, pad rows, and a gap per item; visual: (row, first position
        of the gap, the item's tokens) -> inputs_embeds [B, S, D], as the LLM runner takes it."""


class HostSplicer:
    """Visual tokens on the host: read back once, ordered by the layout, written into the text embeddings."""

    def tokens(self, layout, embeds, kept, items):
        host = to_numpy(embeds)  # [sum S, K, D]
        return [layout.assemble(host[part], kept[part], size) for part, size in items]

    def fill(self, text, visual):
        width = text.shape[2]
        for row, at, tokens in visual:
            tokens = to_numpy(tokens).reshape(-1, width)  # [T, D]
            text[row, at:at + len(tokens)] = tokens
        return text
