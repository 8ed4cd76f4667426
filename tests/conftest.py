"""Shared fixtures: the built-in tiny LLaVA-1.5 checkpoint, its exports at several K, real photos."""

from __future__ import annotations

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
def tiny_export(tmp_path_factory, tiny_checkpoint):
    """keep -> export directory of the tiny checkpoint (each K exported once per session)."""
    from export.api import Progress, run
    from export.spec import ExportOptions

    made = {}
    root = tmp_path_factory.mktemp("exports")

    def get(keep: int):
        if keep not in made:
            options = ExportOptions("llava15", keep, model=str(tiny_checkpoint), out=root / f"k{keep}")
            made[keep] = run(options, Progress(stream=open("/dev/null", "w")))
        return made[keep]

    return get


@pytest.fixture(scope="session")
def tiny_export_fp16(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint exported at K=32 with --dtype float16 (fp16 graphs, fp32 islands and inputs/outputs)."""
    from export.api import Progress, run
    from export.spec import ExportOptions

    out = tmp_path_factory.mktemp("exports-fp16") / "k32"
    options = ExportOptions("llava15", 32, model=str(tiny_checkpoint), out=out, dtype="float16")
    return run(options, Progress(stream=open("/dev/null", "w")))


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
