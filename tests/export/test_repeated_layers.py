"""An LLM graph is traced with one decoder layer and the others are copies of it (`export.llm.repeat_layer`).

Every export already validates the whole graph against the whole PyTorch module (a copy reading the traced
layer's weights or cache instead of its own would fail that: the tiny model's layers have different random
weights); these tests pin what validation does not show: the copies are really made (the export is not
silently tracing every layer), and a decoder whose layers are not all alike is traced whole instead.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from export import llm, onnx_io
from export.families import llava15


@pytest.fixture(scope="module")
def decoder(tiny):
    model, _ = tiny
    return llava15.decoder(model)


@pytest.fixture
def copies(monkeypatch):
    """What each `repeat_layer` call of the exports below did: "copied", or why it gave up (then traced whole)."""
    calls = []
    original = onnx_io.repeat_layer

    def spy(*args):
        try:
            original(*args)
        except llm.NotRepeatable as error:
            calls.append(str(error))
            raise
        calls.append("copied")

    monkeypatch.setattr(onnx_io, "repeat_layer", spy)
    return calls


def _export(decoder, head, directory, kv_cache="concat"):
    spec, _ = llm.llm_spec(decoder, head, "llm.onnx", kv_cache=kv_cache)
    graph = llm.graph_export(decoder, head, spec, kv_cache=kv_cache, max_positions=64)
    spec = onnx_io.export_graph(graph, directory, opset=18)
    checks = onnx_io.validate(graph, directory, spec)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    return onnx.load(str(directory / spec.file), load_external_data=False)


@pytest.mark.parametrize("kv_cache", ["concat", "buffer"])
def test_one_layer_traced_the_others_copied(decoder, kv_cache, copies, tmp_path):
    model = _export(*decoder, tmp_path, kv_cache)
    layers = len(decoder[0].layers)
    assert copies == ["copied"]
    copied = {i for i in range(layers - 1) if any(n.name.endswith(f".layer{i}") for n in model.graph.node)}
    assert copied == set(range(layers - 1))  # every layer but the traced last one is a copy
    cache = [i.name for i in model.graph.input][3:]
    assert cache == [p.format(i) for i in range(layers) for p in ("past_key_values.{}.key", "past_key_values.{}.value")]


@pytest.mark.parametrize("rope", [False, True], ids=["feather", "fastv"])
def test_block_before_a_prune_point(decoder, rope, copies, tmp_path):
    """A block of two layers that ends at a prune point: its prune_logits read the traced (last) layer's
    submodules on the hidden states the copy of the first layer makes (validated against the module)."""
    decoder_model, head = decoder
    first, _ = llm.block_exports(decoder_model, head, (0, 2, len(decoder_model.layers)), rope)
    spec = onnx_io.export_graph(first, tmp_path, opset=18)
    checks = onnx_io.validate(first, tmp_path, spec)
    assert {c.output for c in checks} >= {"hidden_states", "prune_logits"}
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert copies == ["copied"]


def test_layers_that_differ_are_traced_whole(decoder, copies, tmp_path):
    decoder_model, head = decoder
    changed = copy.deepcopy(decoder_model)
    mlp = changed.layers[0].mlp  # a narrower MLP in the first layer only: the layers are no longer alike
    width = mlp.gate_proj.out_features // 2
    with torch.no_grad():
        mlp.gate_proj = torch.nn.Linear(mlp.gate_proj.in_features, width, bias=False)
        mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, width, bias=False)
        mlp.down_proj = torch.nn.Linear(width, mlp.down_proj.out_features, bias=False)
    model = _export(changed, head, tmp_path)  # validated against the changed module
    assert copies == []  # not even tried
    assert not any(".layer" in n.name for n in model.graph.node)
