"""torch.onnx.export (dynamo) wrapper, and the self-check of every exported graph against PyTorch."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from contract.compare import Comparison, compare
from contract.errors import ExportError
from contract.manifest import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, GraphSpec
from export.graph import GraphExport
from export.llm import ONNX_TRANSLATIONS, DecoderGraph, NotRepeatable, repeat_layer
from runtime.backends.onnxruntime import OrtRunner


def export_graph(graph: GraphExport, directory: Path, opset: int) -> GraphSpec:
    """Export `graph.module` to `directory/graph.spec.file` (+ `.data`); returns the spec with file sizes.

    Every named axis of the spec is exported dynamic (torch.export infers the relations between them,
    e.g. total = past + sequence) and then renamed in the ONNX graph to the spec's axis name.
    """
    import onnx

    spec = graph.spec
    feeds = graph.example(0)
    path = directory / spec.file
    with torch.no_grad(), _quiet():
        program = None
        # A decoder is traced with one layer, the others are copies of it (`llm.repeat_layer`)
        one_layer = graph.module.single_layer() if isinstance(graph.module, DecoderGraph) else None
        if one_layer is not None:
            program = _trace(one_layer, _one_layer_spec(spec, graph.module, one_layer), feeds, opset)
            try:
                repeat_layer(program.model, graph.module, spec)
            except NotRepeatable:
                program = None
        if program is None:
            program = _trace(graph.module, spec, feeds, opset)
        _simplify(program.model, opset)
        program.save(os.fspath(path), external_data=True)
    model = onnx.load(os.fspath(path), load_external_data=False)
    _name_axes(model, spec)
    onnx.save(model, os.fspath(path))
    files = [spec.file] + ([spec.file + ".data"] if (directory / (spec.file + ".data")).exists() else [])
    return replace(spec, sizes={f: (directory / f).stat().st_size for f in files})


def _trace(module, spec: GraphSpec, feeds: dict, opset: int):
    """torch.onnx's dynamo export of `module` (inputs and outputs named and ordered as `spec`'s), unoptimized."""
    from torch.onnx._internal.exporter import _core

    dynamic = [{i: torch.export.Dim.AUTO for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs]
    return _core.export(
        module,
        tuple(feeds[t.name] for t in spec.inputs),
        registry=_registry(opset),
        input_names=[t.name for t in spec.inputs],
        output_names=[t.name for t in spec.outputs],
        dynamic_shapes=_nest_like_forward(module, dynamic),
        opset_version=opset,
        optimize=False,
    )


def _one_layer_spec(spec: GraphSpec, module: DecoderGraph, one_layer: DecoderGraph) -> GraphSpec:
    """`spec` (of `module`) without the KV-cache inputs and outputs of the layers `one_layer` does not run."""
    dropped = {pattern.format(i) for i in module.layers if i not in one_layer.layers
               for pattern in (PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE)}
    keep = lambda t: t.name not in dropped  # noqa: E731
    return replace(spec, inputs=tuple(filter(keep, spec.inputs)), outputs=tuple(filter(keep, spec.outputs)))


@functools.cache
def _registry(opset: int):
    """The exporter's table of ATen -> ONNX translations (torchlib) plus ours (`ONNX_TRANSLATIONS`), built once per
    opset. `torch.onnx.export(dynamo=True, custom_translation_table=...)` builds it on every call, from the source
    code of ~500 torchlib functions: about a second per graph, half the export of a small graph. This is what
    that call does with the table (torch 2.13's `_compat.export_compat`, the version pyproject pins), minus the
    rebuild; `_core.export` is the exporter's own entry point behind it."""
    from torch.onnx._internal.exporter import _constants, _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, _constants.TORCHLIB_OPSET))
    for torch_op, onnx_op in ONNX_TRANSLATIONS.items():
        registry.register_op(torch_op, onnx_op, is_complex=False)
    return registry


def _simplify(model, opset: int) -> None:
    """The exporter's `optimize=True` without onnxscript's generic rewrite rules: constant folding, unused and
    duplicate nodes and initializers removed, and at opset 23+ the fusions into ONNX's RMSNormalization /
    RotaryEmbedding / Attention. The generic rules cost a third of the export time of a 30-layer decoder (their
    pattern matcher walks the graph per rule) and change nothing ONNX Runtime runs (SmolLM2's LLM graph: 1,571
    operators after ONNX Runtime's own optimizations, 1,568 with them)."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes import common
    from onnxscript.rewriter import onnx_fusions

    ir.passes.Sequential(common.InlinePass())(model)
    for _ in range(2):
        onnxscript.optimizer.fold_constants(model)
        onnxscript.optimizer.remove_unused_nodes(model)
    ir.passes.Sequential(
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
    )(model)
    if opset >= 23:
        onnx_fusions.fuse(model)


def _nest_like_forward(module, dynamic: list[dict]) -> tuple:
    """torch.export wants `*args` of forward given as one nested tuple."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        n = len(positional)
        return (*dynamic[:n], tuple(dynamic[n:]))
    return tuple(dynamic)


def _name_axes(model, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the spec's axis names; fail if an axis came out static."""
    values = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in list(spec.inputs) + list(spec.outputs):
        if t.name not in values:
            raise ExportError(f"exported {spec.file} has no tensor {t.name!r}")
        dims = values[t.name].type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise ExportError(f"exported {spec.file}: {t.name!r} has rank {len(dims)}, expected {len(t.shape)}")
        for dim, want in zip(dims, t.shape):
            if isinstance(want, str):
                if dim.HasField("dim_value") and t in spec.inputs:
                    raise ExportError(f"exported {spec.file}: axis {want!r} of {t.name!r} came out static ({dim.dim_value})")
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise ExportError(f"exported {spec.file}: {t.name!r} has size {dim.dim_value}, expected {want}")
            else:
                dim.dim_value = want


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings meant for its own developers; keep the user's console clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def paired_outputs(graph: GraphExport, directory: Path, spec: GraphSpec, seeds=(1, 2)):
    """Yields (input case, output name, ONNX Runtime value, PyTorch value) for every output of the graph on
    its validation inputs; elements the graph marks as not compared (graph.compared) are left out."""
    names = [t.name for t in spec.outputs]
    with OrtRunner(directory, spec, providers=["CPUExecutionProvider"]) as runner:
        for seed in seeds:
            feeds = graph.example(seed)
            case = "x".join(str(s) for s in feeds[spec.inputs[0].name].shape)
            with torch.no_grad():
                expected = graph.module(*(feeds[t.name] for t in spec.inputs))
            expected = (expected,) if isinstance(expected, torch.Tensor) else expected
            got = runner.infer({k: v.numpy() for k, v in feeds.items()})
            for name, ref in zip(names, (e.numpy() for e in expected)):
                value = got[name]
                where = graph.compared(feeds, name) if graph.compared else None
                if where is not None:
                    where = np.broadcast_to(np.asarray(where), ref.shape)
                    value, ref = value[where], ref[where]
                yield case, name, value, ref


def validate(graph: GraphExport, directory: Path, spec: GraphSpec, seeds=(1, 2)) -> list[Comparison]:
    """ONNX Runtime against PyTorch on fresh random inputs: output names, shapes, values within the
    graph's tolerances (exact where it gives none), selected index sets identical."""
    return [compare(graph.name, name, case, got, ref, tolerance=graph.tolerances.get(name),
                    is_set=name in graph.set_outputs)
            for case, name, got, ref in paired_outputs(graph, directory, spec, seeds)]
