"""export/feather.py's static-shape selection: ONNX Runtime == PyTorch == the reference rule in plain Python.

The rule (METHODS.md, FEATHER / FastV), written here without torch: per row, softmax of each head's logits
over the valid window slots, mean over heads; keep the top int(n_valid (1-R)^s) by score, union the valid
grid tokens, ascending. The graph must return exactly that set in its first slots (marked valid), then
invalid slots, whatever the overlap of top-k and grid or the padding of the window. Indices and masks are
compared exactly (no tolerance: they are integers); the graph must lint clean for TensorRT 10.3 and 11.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engines.lint import ERROR, lint_model
from export.feather import StageSelect

HEADS = 4
N = 576  # LLaVA-1.5: 24 x 24 image tokens
GRID = [r * 24 + c for r in range(0, 24, 3) for c in range(0, 24, 3)]  # 64 tokens
N1_MAX = int(N * 0.3) + len(GRID)  # 172 + 64 = 236 stage-1 slots

STAGES = {  # name -> (window, reduction, stage, grid)
    "feather1": (N, 0.7, 1, GRID),
    "feather2": (N1_MAX, 0.7, 2, []),
    "fastv": (N, 0.75, 1, []),
}


def rule(logits: np.ndarray, valid: np.ndarray, reduction: float, stage: int, grid: list[int]) -> list[list[int]]:
    """The reference selection per row, in plain Python floats."""
    kept = []
    for row_logits, row_valid in zip(logits.tolist(), valid.tolist()):
        alive = [j for j, v in enumerate(row_valid) if v]
        score = dict.fromkeys(alive, 0.0)
        for head in row_logits:
            top = max(head[j] for j in alive) if alive else 0.0
            weights = {j: math.exp(head[j] - top) for j in alive}
            total = sum(weights.values())
            for j in alive:
                score[j] += weights[j] / total / len(row_logits)
        count = int(len(alive) * (1 - reduction) ** stage)
        best = sorted(alive, key=lambda j: -score[j])[:count]
        kept.append(sorted(set(best) | (set(grid) & set(alive))))
    return kept


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (module, ONNX Runtime session, lint findings); each stage exported once, dynamic batch."""
    import onnx

    directory = tmp_path_factory.mktemp("feather_select")
    made = {}
    for name, (window, reduction, stage, grid) in STAGES.items():
        module = StageSelect(window, reduction, stage, grid).eval()
        example = (torch.randn(2, HEADS, window), torch.ones(2, window, dtype=torch.bool))
        batch = torch.export.Dim("batch", min=1, max=64)
        path = directory / f"{name}.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # exporter chatter (deprecations, axis renaming), not findings
            torch.onnx.export(module, example, str(path), input_names=["logits", "valid"],
                              output_names=["keep", "keep_valid"], dynamic_shapes=({0: batch}, {0: batch}),
                              opset_version=18, dynamo=True, verbose=False)
        model = onnx.load(str(path))
        made[name] = (module, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                      lint_model(model, name, ("10.3", "11")), model)
    return made


def cases(name: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(case, logits [B, H, n] float32, valid [B, n] bool): random rows, forced overlap, no overlap, padding."""
    window, _, _, grid = STAGES[name]
    rng = np.random.default_rng(len(name))
    logits = (3 * rng.standard_normal((4, HEADS, window))).astype(np.float32)
    full = np.ones((4, window), dtype=bool)
    out = [("random", logits, full)]
    if grid:
        overlap = logits.copy()
        overlap[:, :, grid[::2]] += 20  # half the grid among the highest scores
        disjoint = logits.copy()
        disjoint[:, :, grid] -= 40  # the grid the lowest: the union fills every slot
        out += [("overlap", overlap, full), ("disjoint", disjoint, full)]
    prefix = np.arange(window)[None, :] < np.array([[window], [window - 30], [window // 2], [3]])
    scattered = rng.random((4, window)) < np.array([[1.0], [0.8], [0.5], [0.1]])
    out += [("prefix-padding", logits, prefix), ("scattered-padding", logits, scattered)]
    return out


def check(name: str, case: str, keep: np.ndarray, keep_valid: np.ndarray, expected: list[list[int]]) -> None:
    module_slots = keep.shape[1]
    for row, want in enumerate(expected):
        got = keep[row][keep_valid[row]].tolist()
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        assert got == want, f"{name}/{case} row {row}: missing {missing[:5]}, extra {extra[:5]} (|want| {len(want)})"
        assert keep_valid[row].tolist() == [True] * len(want) + [False] * (module_slots - len(want)), \
            f"{name}/{case} row {row}: valid slots must come first"
        assert ((0 <= keep[row]) & (keep[row] < STAGES[name][0])).all(), "every slot's index must be in range"


@pytest.mark.parametrize("name", list(STAGES))
def test_graph_equals_module_equals_rule(name, exported):
    module, session, _, _ = exported[name]
    window, reduction, stage, grid = STAGES[name]
    assert module.slots == int(window * (1 - reduction) ** stage) + len(grid)
    for case, logits, valid in cases(name):
        with torch.no_grad():
            keep_pt, valid_pt = (t.numpy() for t in module(torch.from_numpy(logits), torch.from_numpy(valid)))
        keep_ort, valid_ort = session.run(None, {"logits": logits, "valid": valid})
        assert keep_ort.shape == keep_pt.shape == (len(logits), module.slots)
        np.testing.assert_array_equal(valid_ort, valid_pt, err_msg=f"{name}/{case}: validity, ORT vs PyTorch")
        np.testing.assert_array_equal(keep_ort, keep_pt, err_msg=f"{name}/{case}: indices, ORT vs PyTorch")
        expected = rule(logits, valid, reduction, stage, grid)
        check(name, case, keep_ort, valid_ort, expected)
        sizes = [len(e) for e in expected]
        if case == "overlap":
            assert max(sizes) < module.slots, "forced overlap must leave slots unused"
        if case in ("random", "disjoint") and name == "feather1":
            print(f"{name}/{case}: union sizes {sizes} of {module.slots} slots")
        if case == "disjoint":
            assert sizes == [module.slots] * len(sizes)


def test_feather_stages_chain(exported):
    """Stage 2 runs on stage 1's slots (valid = stage 1's keep_valid); original indices compose by gather."""
    first, first_session = exported["feather1"][:2]
    second_session = exported["feather2"][1]
    rng = np.random.default_rng(7)
    logits = (3 * rng.standard_normal((3, HEADS, N))).astype(np.float32)
    keep1, valid1 = first_session.run(None, {"logits": logits, "valid": np.ones((3, N), dtype=bool)})
    logits2 = (3 * rng.standard_normal((3, HEADS, N))).astype(np.float32)  # a later layer's logits
    window_logits = np.take_along_axis(logits2, keep1[:, None, :].repeat(HEADS, 1), axis=2)  # [B, H, 236]
    keep2, valid2 = second_session.run(None, {"logits": window_logits, "valid": valid1})
    for row in range(3):
        survivors = keep1[row][valid1[row]].tolist()
        stage2 = rule(logits2[row:row + 1, :, survivors], np.ones((1, len(survivors)), bool), 0.7, 2, [])[0]
        expected = [survivors[i] for i in stage2]
        got = keep1[row][keep2[row][valid2[row]]].tolist()
        assert got == expected and len(got) == int(len(survivors) * 0.09)


@pytest.mark.parametrize("name", list(STAGES))
def test_graph_lints_clean_for_tensorrt(name, exported):
    _, _, findings, model = exported[name]
    errors = [f for f in findings if f.severity == ERROR]
    assert not errors, "\n".join(f"{f.target} {f.op_type} {f.node}: {f.message}" for f in errors)
    ops = {node.op_type for node in model.graph.node}
    assert "NonZero" not in ops and "TopK" in ops, sorted(ops)
