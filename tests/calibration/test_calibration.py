"""`python -m calibration` on the tiny export: Q/DQ graphs, what stays float, accuracy on held-out photos,
a reproducible calibration set, and bad input refused with one line and nothing left behind.

The tiny model has random weights (attention sharpened so the [CLS] ranking is not flat): the agreement
bar checks that quantization leaves FasterVLM's selection alone, not a trained model's accuracy.
Quantizing tests skip when NVIDIA ModelOpt cannot be imported; scripts/setup.sh installs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from skimage import data as photos_data

from calibration import data
from contract.manifest import Manifest
from tests.helpers import assert_refused, cli, snapshot

KEEP = 32
AGREEMENT = 0.90  # the target at K=32 on real photos
HELD_OUT = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")

needs_modelopt = pytest.mark.skipif(
    importlib.util.find_spec("modelopt") is None,
    reason="NVIDIA ModelOpt is not installed (bash scripts/setup.sh installs nvidia-modelopt==0.47.0)",
)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """Calibration photos, none of them held out: colour JPEGs and grayscale PNGs, as users have them."""
    directory = tmp_path_factory.mktemp("photos")
    left, right, _ = photos_data.stereo_motorcycle()
    Image.fromarray(left).save(directory / "motorcycle_left.jpg", quality=95)
    Image.fromarray(right).save(directory / "motorcycle_right.jpg", quality=95)
    for name in ("camera", "coins", "moon", "clock"):
        Image.fromarray(getattr(photos_data, name)()).save(directory / f"{name}.png")
    return directory


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory) -> Path:
    """A private copy of the shared K=32 export: calibration writes into its export directory."""
    target = tmp_path_factory.mktemp("calibrated") / "k32"
    shutil.copytree(tiny_export(KEEP), target)
    return target


def calibrate(*args: object) -> tuple[int, str]:
    """The CLI in this process (ModelOpt imports once per session): exit code and stdout."""
    from calibration.__main__ import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(a) for a in args])
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def int8(export, photo_dir) -> dict:
    code, table = calibrate(export, "--images", photo_dir, "--precision", "int8", "--graphs", "vision,projector,llm")
    assert code == 0
    return {"table": table, "record": json.loads((export / "calibration.json").read_text())}


def dequantized(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}


def score_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes the top-k values are computed by: walk back from each TopK to the score layer's layer norm
    (Shape nodes carry no values and are not followed)."""
    producers = {o: n for n in graph.node for o in n.output}
    seen: dict[str, onnx.NodeProto] = {}
    stack = [n.input[0] for n in graph.node if n.op_type == "TopK"]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in seen or node.op_type in ("LayerNormalization", "Shape"):
            continue
        seen[node.name] = node
        stack.extend(node.input)
    return list(seen.values())


@needs_modelopt
def test_qdq_graphs_are_written_next_to_the_fp32_ones(int8, export, tiny_export):
    for graph in ("vision", "projector", "llm"):
        path = export / f"{graph}.int8.onnx"
        assert path.is_file() and (export / f"{graph}.int8.onnx.data").is_file(), path
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        entry = int8["record"]["int8"]["graphs"][graph]
        quantized = {q["node"] for q in entry["quantized"]}
        inside = dequantized(model)
        for node in model.graph.node:
            if node.name in quantized:  # activation and weight both arrive through Q/DQ
                assert all(t in inside for t in node.input[:2]), f"{graph}: {node.name} is not quantized"
        assert quantized and entry["qdq_nodes"]["QuantizeLinear"] > 0
    for name in ("vision.onnx", "vision.onnx.data", "llm.onnx"):  # ModelOpt never saw the originals
        assert (export / name).read_bytes() == (tiny_export(KEEP) / name).read_bytes(), f"{name} was modified"
    assert not list(export.glob(".calibration.partial-*"))


@needs_modelopt
def test_score_path_layernorm_and_softmax_stay_float(int8, export):
    model = onnx.load(str(export / "vision.int8.onnx"), load_external_data=False)
    inside = dequantized(model)
    score = score_nodes(model.graph)
    reads_dq = [n.name for n in score if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                and any(t in inside for t in n.input)]
    assert not reads_dq, f"[CLS]-score path reads dequantized tensors: {reads_dq}"
    constants = {i.name for i in model.graph.initializer}
    projections = [n for n in score if n.op_type == "MatMul" and n.input[1] in constants]
    assert len(projections) == 2, "expected the score layer's [CLS] q and k projections on the score path"
    excluded = int8["record"]["int8"]["graphs"]["vision"]["excluded"]
    assert sorted(e["node"] for e in excluded) == sorted(n.name for n in projections)
    assert sorted(e["module"].rsplit(".", 1)[-1] for e in excluded) == ["k_proj", "q_proj"]
    assert all("top-k" in e["reason"] for e in excluded)
    for graph in ("vision", "llm"):
        model = onnx.load(str(export / f"{graph}.int8.onnx"), load_external_data=False)
        inside = dequantized(model)
        sensitive = [n.name for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax", "TopK")
                     and any(t in inside for t in n.input)]
        assert not sensitive, f"{graph}: {sensitive} read dequantized tensors"
    llm = onnx.load(str(export / "llm.int8.onnx"), load_external_data=False)
    lm_head = [e for e in int8["record"]["int8"]["graphs"]["llm"]["excluded"] if "vocabulary" in e["reason"]]
    assert [e["module"] for e in lm_head] == ["lm_head"]
    node = next(n for n in llm.graph.node if n.name == lm_head[0]["node"])
    assert not any(t in dequantized(llm) for t in node.input), "lm_head is quantized"


@needs_modelopt
def test_topk_agreement_on_held_out_photos(int8, export):
    manifest = Manifest.read(export)
    held_out = data.from_arrays({n: getattr(photos_data, n)() for n in HELD_OUT}, manifest, export)
    fp32 = ort.InferenceSession(str(export / "vision.onnx"), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(str(export / "vision.int8.onnx"), providers=["CPUExecutionProvider"])
    agreement = {}
    for name, pixels in zip(HELD_OUT, held_out.pixel_values):
        a = fp32.run(["keep_indices"], {"pixel_values": pixels[None]})[0][0]
        b = quant.run(["keep_indices"], {"pixel_values": pixels[None]})[0][0]
        agreement[name] = len(set(a) & set(b)) / KEEP
    mean = float(np.mean(list(agreement.values())))
    assert mean >= AGREEMENT, f"top-{KEEP} agreement {mean:.3f} < {AGREEMENT}; per photo {agreement}"
    metrics = int8["record"]["int8"]["metrics"]
    assert metrics["images"] == list(HELD_OUT) and metrics["calibration_overlap"] == []
    assert abs(metrics["topk_agreement"]["mean"] - mean) < 1e-9, (metrics["topk_agreement"], agreement)
    assert metrics["embed_cosine_shared"]["min"] > 0.99, metrics["embed_cosine_shared"]
    assert metrics["llm"]["logits_cosine"]["min"] > 0.98, metrics["llm"]
    assert metrics["latency_ms"]["fp32"] > 0 and metrics["latency_ms"]["quantized"] > 0
    assert f"{mean:.4f}" in int8["table"] and "top-k agreement" in int8["table"]


@needs_modelopt
def test_record_says_what_was_calibrated(int8, export, photo_dir, tmp_path):
    record = int8["record"]
    entry = record["int8"]
    npz = export / entry["calibration_data"]["file"]
    assert entry["calibration_data"]["sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    assert entry["calibration_data"]["images"] == sorted(p.name for p in photo_dir.iterdir())
    again = data.from_images(data.list_images(photo_dir), Manifest.read(export), export)
    assert data.write_npz(again, tmp_path / "again.npz") == entry["calibration_data"]["sha256"]
    assert any("random weights" in note for note in record["notes"])
    vision = entry["graphs"]["vision"]
    assert vision["kept_float_by_op_type"]["LayerNormalization"]["count"] > 0
    assert vision["kept_float_by_op_type"]["Softmax"]["reason"]
    for name, digest in vision["files"].items():
        assert hashlib.sha256((export / name).read_bytes()).hexdigest() == digest, name


def test_calibration_set_is_reproducible(photo_dir, tiny_export, tmp_path):
    """Same photos -> same bytes (no timestamps in the .npz); one changed photo -> another hash."""
    export = tiny_export(KEEP)
    manifest = Manifest.read(export)
    paths = data.list_images(photo_dir)
    first = data.write_npz(data.from_images(paths, manifest, export), tmp_path / "a.npz")
    second = data.write_npz(data.from_images(paths, manifest, export), tmp_path / "b.npz")
    assert first == second
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:  # no clock in the file: same bytes tomorrow
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    changed = tmp_path / "changed"
    shutil.copytree(photo_dir, changed)
    Image.open(changed / "camera.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed / "camera.png")
    third = data.write_npz(data.from_images(data.list_images(changed), manifest, export), tmp_path / "c.npz")
    assert third != first
    loaded = data.read_npz(tmp_path / "a.npz", manifest, (1, 3, 336, 336))
    assert np.array_equal(loaded.pixel_values, data.from_images(paths, manifest, export).pixel_values)


@needs_modelopt
def test_reused_calibration_set_gives_fp8_for_hopper(int8, export):
    npz = export / int8["record"]["int8"]["calibration_data"]["file"]
    code, _ = calibrate(export, "--calibration-data", npz, "--precision", "fp8", "--target", "hopper",
                        "--graphs", "vision", "--latency-runs", "1")
    assert code == 0
    record = json.loads((export / "calibration.json").read_text())
    assert set(record) >= {"int8", "fp8"}, "the int8 entry must be kept"
    assert record["fp8"]["calibration_data"]["sha256"] == record["int8"]["calibration_data"]["sha256"]
    assert record["fp8"]["target_compute_capability"] == "9.0"
    model = onnx.load(str(export / "vision.fp8.onnx"), load_external_data=False)
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    types = {i.data_type for i in model.graph.initializer if i.name in zero_points}
    assert types == {fp8}, f"QuantizeLinear zero points have types {types}, expected FLOAT8E4M3FN"
    assert record["fp8"]["metrics"]["topk_agreement"]["mean"] >= 0.8, record["fp8"]["metrics"]["topk_agreement"]


def test_fp8_is_refused_for_jetson_orin(export, photo_dir):
    before = snapshot(export)
    result = cli("calibration", export, "--images", photo_dir, "--precision", "fp8", "--target", "jetson-orin")
    assert_refused(result, "jetson-orin", "fp8", "int8")
    assert snapshot(export) == before


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.fromarray(photos_data.camera()).save(tmp_path / "mixed" / "camera.png")
    (tmp_path / "mixed" / "notes.txt").write_text("not a photo\n")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    return tmp_path


@pytest.mark.parametrize("case, named", [
    ("no images", ["empty", "no image files"]),
    ("not an image", ["notes.txt"]),
    ("missing export", ["no-such-export", "does not exist"]),
    ("unknown graph", ["decoder"]),
    ("bad precision", ["int4"]),
    ("unknown target", ["orin-nano"]),
    ("broken npz", ["broken.npz"]),
])
def test_bad_input_is_refused_with_one_line(case, named, bad, export):
    before = snapshot(export)
    args = {
        "no images": [export, "--images", bad / "empty", "--precision", "int8"],
        "not an image": [export, "--images", bad / "mixed", "--precision", "int8"],
        "missing export": [bad / "no-such-export", "--images", bad / "mixed", "--precision", "int8"],
        "unknown graph": [export, "--images", bad / "mixed", "--precision", "int8", "--graphs", "vision,decoder"],
        "bad precision": [export, "--images", bad / "mixed", "--precision", "int4"],
        "unknown target": [export, "--images", bad / "mixed", "--precision", "int8", "--target", "orin-nano"],
        "broken npz": [export, "--calibration-data", bad / "broken.npz", "--precision", "int8"],
    }[case]
    assert_refused(cli("calibration", *args), *named)
    assert snapshot(export) == before
    assert not list(export.glob(".calibration.partial-*"))


@needs_modelopt
def test_failure_while_installing_leaves_the_directory_as_it_was(int8, export, photo_dir, monkeypatch):
    """The last rename (calibration.json) fails: the graphs already moved in are taken back out and the
    files they replaced restored, so the directory is exactly as before."""
    from calibration import api
    from calibration.options import CalibrationOptions

    before = snapshot(export)
    real_replace = api.os.replace

    def failing_replace(source, target):
        if Path(target).name == api.RECORD_FILE:
            raise OSError("disk full (simulated)")
        real_replace(source, target)

    monkeypatch.setattr(api.os, "replace", failing_replace)
    options = CalibrationOptions(export, "int8", images=photo_dir, graphs=("vision",), evaluate=False, method="max")
    with pytest.raises(OSError, match="simulated"):
        api.run(options, api.Log(stream=io.StringIO()))
    assert snapshot(export) == before, "files changed although the calibration failed"
    assert not list(export.glob(".calibration.partial-*"))
