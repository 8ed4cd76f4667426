"""`python -m engines check` without TensorRT: Polygraphy's Comparator, the per-output tolerances, top-k as
sets and the table, exercised with ONNX Runtime on both sides (the fp16 export against the fp32 one, on real
photos preprocessed as the runtime does). The TensorRT side is in test_tensorrt.py."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("polygraphy", reason="polygraphy is the engines extra (pip install prunevlm[engines])")

from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: E402
from polygraphy.comparator import IterationResult  # noqa: E402

from contract.manifest import Manifest  # noqa: E402
from engines import check  # noqa: E402
from engines.__main__ import main  # noqa: E402

KEEP = 32


def ort_pairs(candidate: Path, reference: Path, precision: str):
    """runners(key) for engines.check.check: the candidate export's graph against the reference's."""
    graphs = Manifest.read(reference).graphs

    def runners(key: str):
        file = graphs[check.graph_of(key)[0]].file
        return [OnnxrtRunner(SessionFromOnnx(str(candidate / file), providers=["cpu"]), name=f"candidate-{key}"),
                OnnxrtRunner(SessionFromOnnx(str(reference / file), providers=["cpu"]), name=f"reference-{key}")], precision

    return runners


@pytest.fixture(scope="module")
def two_photos(photos):
    return {name: photos[name] for name in ("chelsea", "portrait")}


def test_feeds_are_the_runtimes(tiny_export, two_photos, pipeline):
    feeds = check.feeds(tiny_export(KEEP), two_photos)
    assert set(feeds) == {"vision", "projector", "llm.prefill", "llm.decode"}
    assert all(len(v) == 2 for v in feeds.values())
    pipe = pipeline(KEEP)
    pixels = pipe.layouts["image"].tiles(two_photos["chelsea"])[0]
    np.testing.assert_array_equal(feeds["vision"][0]["pixel_values"], pixels)
    prefill, decode = feeds["llm.prefill"][0], feeds["llm.decode"][0]
    assert prefill["past_key_values.0.key"].shape[2] == 0
    length = prefill["inputs_embeds"].shape[1]  # the runtime's spliced prompt: text + K image tokens
    assert decode["past_key_values.0.key"].shape[2] == length and decode["attention_mask"].shape[1] == length + 1
    assert decode["position_ids"].tolist() == [[length]]


def test_fp16_graphs_against_fp32_within_fp16_tolerances(tiny_export, tiny_export_fp16, two_photos):
    rows = check.check(tiny_export(KEEP), two_photos, ort_pairs(tiny_export_fp16, tiny_export(KEEP), "fp16"))
    table = check.format_rows(rows)
    print(table)
    assert all(r.ok for r in rows), table
    assert {(r.graph, r.output) for r in rows} >= {("vision", "keep_indices"), ("llm.decode", "logits"),
                                                  ("llm.prefill", "present.1.value"), ("projector", "image_embeds")}
    top_k = next(r for r in rows if r.output == "keep_indices")
    assert top_k.agreement == 1.0, table
    logits = next(r for r in rows if r.graph == "llm.prefill" and r.output == "logits")
    assert 0 < logits.max_abs < 5e-2 and logits.mean_abs <= logits.max_abs, table
    assert "check: " in table.splitlines()[-1] and "present.* (6)" in table  # 3 layers x (key, value)


def test_in_llm_pruned_export_checks_every_block_and_select_graph(export_dir, two_photos):
    """FEATHER: each block is checked at prefill and decode on the feeds the runtime's own run gives it (the
    previous block's hidden states, pruned after a prune point), each select graph on its window."""
    directory = export_dir("llava15", None, method="feather")
    manifest = Manifest.read(directory)
    blocks = [key for key, _ in manifest.blocks()]
    feeds = check.feeds(directory, two_photos)
    selects = {key: feeds[key] for keys in manifest.llm_pruning.select.values() for key in keys}
    assert set(feeds) == {"vision", "projector", *selects, *(f"{b}.{p}" for b in blocks for p in ("prefill", "decode"))}
    assert all(len(v) == 2 for v in feeds.values())
    for photo in range(2):
        lengths = [feeds[f"{b}.prefill"][photo]["inputs_embeds"].shape[1] for b in blocks]
        assert lengths[0] > lengths[1] > lengths[2], lengths  # each prune point drops image tokens
        windows = [s[photo]["window_logits"].shape[2] for s in selects.values()]
        assert windows[0] == manifest.method.num_patches and windows[1] < windows[0], windows
        for (block, layers), length in zip(manifest.blocks(), lengths):
            decode = feeds[f"{block}.decode"][photo]
            assert decode[f"past_key_values.{layers[0]}.key"].shape[2] == length, block  # its own cache
            assert decode["attention_mask"].shape[1] == length + 1 and decode["inputs_embeds"].shape[1] == 1
    rows = check.check(directory, two_photos, ort_pairs(directory, directory, "fp32"))
    table = check.format_rows(rows)
    print(table)
    assert all(r.ok for r in rows) and {r.graph for r in rows} == set(feeds), table
    assert {(r.graph, r.output) for r in rows} >= {("llm.0.prefill", "hidden_states"), ("llm.0.decode", "prune_logits"),
                                                  ("llm.2.decode", "logits"), ("select.image.1", "keep_slots"),
                                                  ("select.image.2", "keep_valid")}, table
    assert next(r for r in rows if r.graph == "select.image.2" and r.output == "keep_slots").agreement == 1.0, table
    caches = {b: {r.output for r in rows if r.graph == f"{b}.decode" and r.output.startswith("present.")} for b in blocks}
    assert caches["llm.1"] == {"present.1.key", "present.1.value"} and len(caches["llm.2"]) == 2, caches  # its layers


def test_tight_tolerances_fail_and_say_so(tiny_export, tiny_export_fp16, two_photos):
    """The fp16 graphs against fp32 tolerances: the comparison must be able to fail."""
    rows = check.check(tiny_export(KEEP), two_photos, ort_pairs(tiny_export_fp16, tiny_export(KEEP), "fp32"))
    failed = {(r.graph, r.output) for r in rows if not r.ok}
    assert ("vision", "image_features") in failed, check.format_rows(rows)
    assert "FAIL" in check.format_rows(rows)


def test_top_k_compared_as_sets():
    compare = check.SetAwareCompare({"x": 1e-3}, {"x": 1e-3})
    k = np.arange(32)[None]

    def result(indices, x, name):
        return IterationResult(OrderedDict(keep_indices=indices, x=x), runner_name=name)

    x = np.ones((1, 4), np.float32)
    same = compare(result(k, x, "a"), result(k[:, ::-1].copy(), x, "b"))  # order does not matter
    assert bool(same["keep_indices"]) and bool(same["x"])
    one_off = k.copy()
    one_off[0, 0] = 99  # 31 of 32 shared: above the 0.9 agreement
    assert bool(compare(result(k, x, "a"), result(one_off, x, "b"))["keep_indices"])
    half = k + 16
    verdict = compare(result(k, x + 1, "a"), result(half, x, "b"))
    assert not bool(verdict["keep_indices"]) and not bool(verdict["x"])


def test_cli_without_engines_is_one_line(tiny_export, tmp_path, capsys):
    assert main(["check", str(tiny_export(KEEP))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no TensorRT engine" in err and "python -m engines build" in err, err
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tiny_export(KEEP)), "--images", str(tmp_path / "empty")]) == 2
    assert "no .jpg/.png" in capsys.readouterr().err
