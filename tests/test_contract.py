"""The manifest is the one contract: for every registered family and layout, the engine builder's profiles,
calibration's graph roles and the runtime agree on each modality's graphs and on how many sub-images each
graph sees per item.

The runtime's side is observed, not assumed: each modality encodes a real photo (or a clip of frames) and
the batch every runner receives is recorded.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.api import graph_names
from contract import names
from contract.manifest import Manifest
from engines import plan as engine_plan
from engines.plan import BuildOptions
from export import checkpoints
from export.families import FAMILIES
from runtime.pipeline import Pipeline, Timings

MAX_BATCH = 2


def _cases() -> list[tuple[str, int, str]]:
    """(family, keep, layout) for every family and layout: pruned where the layout allows, and unpruned."""
    cases = []
    for name, family in FAMILIES.items():
        config = family.read_config(checkpoints.for_family(family, "tiny"))
        patches = family.method_spec(config, 1).num_patches
        for layout, spec in family.LAYOUTS.items():
            # 95 % pruned (the papers' setting), the K the families' parity tests export too (graphs shared)
            keeps = [patches] if spec.unpruned_only else [max(1, round(patches * 0.05)), patches]
            cases += [(name, keep, layout) for keep in keeps]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def clip(photos) -> list[np.ndarray]:
    """Twelve frames panning over a photo (more than any export's frame count)."""
    photo = photos["astronaut"]
    return [photo[:, i * 10:i * 10 + 400] for i in range(12)]


@pytest.mark.parametrize("family,keep,layout", CASES, ids=[f"{f}-k{k}-{lay}" for f, k, lay in CASES])
def test_engines_calibration_and_runtime_agree(family, keep, layout, export_dir, photos, clip):
    directory = export_dir(family, keep, layout=layout)
    manifest = Manifest.read(directory)
    pipe = Pipeline.load(directory)

    # The runtime: which graph each modality runs, and with how many sub-images per item.
    seen: dict[str, int] = {}
    for graph, runner in pipe.runners.items():
        for method in ("infer", "infer_bound"):
            def recording(feeds, _graph=graph, _call=getattr(runner, method)):
                first = next(iter(feeds.values()))
                seen[_graph] = max(seen.get(_graph, 0), int(first.shape()[0] if callable(first.shape) else first.shape[0]))
                return _call(feeds)

            setattr(runner, method, recording)
    for name, modality in manifest.modalities.items():
        item = clip if modality.content_type == names.VIDEO else photos["astronaut"]
        before = dict(seen)
        pipe.encode([item], name, Timings())
        used = {g for g in seen if seen[g] != before.get(g)}
        assert used == set(modality.graphs), f"modality {name!r} ran {sorted(used)}, the manifest says {modality.graphs}"
        assert seen[modality.vision] == seen[modality.projector] <= modality.layout.sub_images

    # The engines: every graph a modality uses gets a batch profile covering MAX_BATCH items of that layout.
    sizes = engine_plan.graph_sizes(manifest, BuildOptions(directory, max_batch=MAX_BATCH))
    for graph, batch in seen.items():
        profile = engine_plan.profiles(manifest.graphs[graph], sizes[graph])[0]
        low, _, high = profile.axes[names.BATCH]
        assert low <= batch and high >= MAX_BATCH * batch, (
            f"engine profile for {graph!r} covers batch {low}..{high}; the runtime sends {batch} per item")
    assert set(manifest.graphs) == {names.LLM} | {g for m in manifest.modalities.values() for g in m.graphs}

    # Calibration: its vision and projector roles are the image modality's graphs.
    if names.IMAGE in manifest.modalities:
        roles = graph_names(manifest)
        image = manifest.modalities[names.IMAGE]
        assert (roles[names.VISION], roles[names.PROJECTOR], roles[names.LLM]) == (*image.graphs, names.LLM)
