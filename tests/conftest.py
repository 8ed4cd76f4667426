"""Shared fixtures: the built-in tiny LLaVA-1.5 checkpoint, its exports at several K, real photos."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (HxWx3 uint8), landscape and portrait."""
    import skimage.data

    return {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "portrait": skimage.data.astronaut()[:, 100:380],
    }


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from export import checkpoints
    from export.families import llava15

    return checkpoints.for_family(llava15, "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(model, processor) of the tiny checkpoint, loaded the way the exporter loads any checkpoint."""
    from export.families import llava15

    model, processor = llava15.load(tiny_checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="session")
def reuse_graphs(tmp_path_factory):
    """(family, options) -> a context in which `export.onnx_io.export_graph` copies the files of a graph that an
    earlier export of this session already produced, instead of exporting it again (the slowest step of every
    export). Equal keys, equal files: a graph's files depend on the family, its name and spec (the spec names K,
    the layers and the shapes) and the opset, and for LLM graphs the method (FastV's block scores with RoPE,
    FEATHER's without; the same spec) and max_seq_len (`options`: ExportOptions fields). Not on the dtype: a
    float16 export converts the fp32 graphs this step writes (export.precision), in the export's directory."""
    from export import onnx_io

    root = tmp_path_factory.mktemp("graphs")
    graphs: dict[tuple, tuple] = {}  # what identifies a graph's files -> (its spec, a copy of its files)
    export_graph = onnx_io.export_graph

    @contextlib.contextmanager
    def reuse(family: str, options: dict):
        common = (family, options.get("opset", 18))
        llm_only = (options.get("method", "fastervlm"), options.get("max_seq_len"))

        def cached_export_graph(graph, directory, opset):
            graph_key = (*common, graph.name, repr(graph.spec), *(llm_only if graph.name.startswith("llm") else ()))
            if graph_key not in graphs:
                spec = export_graph(graph, directory, opset)
                keep_dir = root / f"graph-{len(graphs)}"
                keep_dir.mkdir()
                for name in spec.sizes:
                    shutil.copy(directory / name, keep_dir / name)
                graphs[graph_key] = (spec, keep_dir)
                return spec
            spec, keep_dir = graphs[graph_key]
            for name in spec.sizes:
                shutil.copy(keep_dir / name, directory / name)
            return spec

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(onnx_io, "export_graph", cached_export_graph)
            yield

    return reuse


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, reuse_graphs):
    """(family, keep, **ExportOptions fields) -> directory of the family's built-in tiny checkpoint exported
    by `export.api.run`, once per session (every test module shares them). Graphs an earlier export produced
    are copied (`reuse_graphs`); each export still validates all its graphs against PyTorch."""
    from export import checkpoints
    from export.api import Progress, run
    from export.families import FAMILIES
    from export.spec import ExportOptions

    root = tmp_path_factory.mktemp("exports")
    made: dict[tuple, Path] = {}

    def get(family: str, keep: int | None, **options) -> Path:
        key = (family, keep, tuple(sorted(options.items())))
        if key not in made:
            checkpoint = checkpoints.for_family(FAMILIES[family], "tiny")
            out = root / f"{family}-k{keep}-{len(made)}"
            with reuse_graphs(family, options), open(os.devnull, "w") as quiet:
                made[key] = run(ExportOptions(family, keep, model=str(checkpoint), out=out, **options),
                                Progress(stream=quiet))
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_export(export_dir):
    """keep -> export directory of the tiny LLaVA-1.5 checkpoint."""
    return lambda keep: export_dir("llava15", keep)


@pytest.fixture(scope="session")
def tiny_export_fp16(export_dir):
    """The tiny checkpoint exported at K=32 with --dtype float16 (fp16 graphs, fp32 islands and inputs/outputs)."""
    return export_dir("llava15", 32, dtype="float16")


@pytest.fixture(scope="session")
def pipeline(tiny_export):
    """keep -> loaded Pipeline for that export."""
    from runtime.pipeline import Pipeline

    loaded = {}

    def get(keep: int):
        if keep not in loaded:
            loaded[keep] = Pipeline.load(tiny_export(keep))
        return loaded[keep]

    return get
