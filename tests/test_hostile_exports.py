"""Untrusted export directories: malformed but parseable ones are refused with one line, paths stay inside,
templates are bounded, file contents can be verified, and a running Pipeline survives its files being
overwritten in place (issue 8, items 7-10 and the export-directory items of "Smaller").

Each damage is applied to a copy of the tiny K=32 export; the Python API must raise ManifestError with one
line naming what is wrong, and a representative handful goes through `python -m runtime` (exit 2, one line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.errors import ManifestError
from runtime.pipeline import Pipeline
from tests.helpers import ROOT, assert_one_line, assert_refused, cli

KEEP = 32
PROMPT = "What is in the picture?"
PICTURE = np.full((48, 64, 3), 120, np.uint8)


def _edit(edit):
    """A damage that edits manifest.json as JSON."""

    def damage(directory: Path) -> None:
        path = directory / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return damage


def _llm(**changes):
    return _edit(lambda m: m["llm"].update(changes))


def _preprocess(**changes):
    return _edit(lambda m: m["modalities"]["image"]["preprocess"].update(changes))


def _template(text: str):
    return _edit(lambda m: m["prompt"].update(chat_template=text))


def _symlink_outside(name: str):
    """Replace `name` by a symlink to an identical copy outside the export (same size: the old checks pass)."""

    def damage(directory: Path) -> None:
        outside = directory.parent / f"outside-{name}"
        shutil.copyfile(directory / name, outside)
        (directory / name).unlink()
        (directory / name).symlink_to(outside)

    return damage


def _embeddings(table_of):
    def damage(directory: Path) -> None:
        table = np.load(directory / "embed_tokens.npy")
        with open(directory / "embed_tokens.npy", "wb") as file:  # np.save would append ".npy" to nothing here
            table_of(file, table)

    return damage


def _newline_layout(newline_bytes: bytes | None):
    """The image modality switched to LLaVA-NeXT's `hf` layout (unpruned), with or without its newline file."""

    def damage(directory: Path) -> None:
        def edit(m):
            m["method"].update(keep=576, name="none")
            m["modalities"]["image"]["layout"] = {"name": "anyres_hf", "grid_pinpoints": [[336, 672]], "tile": 336,
                                                  "newline": "image_newline.npy"}
        _edit(edit)(directory)
        if newline_bytes is not None:
            (directory / "image_newline.npy").write_bytes(newline_bytes)

    return damage


def _added_token(directory: Path) -> None:
    path = directory / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["added_tokens"].append({"id": 49153, "content": "<far>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(tokenizer))


def _npz_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, newline=np.zeros(128, np.float32))
    return buffer.getvalue()


def _other_outputs(directory: Path) -> None:
    """The projector graph file is unchanged, the manifest declares an output it does not have."""
    _edit(lambda m: m["graphs"]["projector"]["outputs"].append(
        {"name": "extra", "dtype": "float32", "shape": ["batch", 4]}))(directory)


# name -> (damage, strings the one-line error must contain, when it is refused: "load" or "generate").
CASES = {
    # --- structure and types -------------------------------------------------------------------------
    "graphs-empty": (_edit(lambda m: m.update(graphs={})), ["graphs"], "load"),
    "graph-file-number": (_edit(lambda m: m["graphs"]["vision"].update(file=5)), ["file=5"], "load"),
    "modalities-empty": (_edit(lambda m: m.update(modalities={})), ["modalities"], "load"),
    "chat-template-number": (_edit(lambda m: m["prompt"].update(chat_template=5)), ["chat_template=5"], "load"),
    "special-token-number": (_edit(lambda m: m["prompt"]["special_tokens"].update(bos_token=5)),
                             ["special_tokens['bos_token']"], "load"),
    "tensor-shape-bool": (_edit(lambda m: m["graphs"]["llm"]["inputs"][0].update(shape=["batch", "sequence", True])),
                          ["'inputs_embeds'=True"], "load"),
    "tensor-unknown-axis": (_edit(lambda m: m["graphs"]["llm"]["inputs"][0].update(shape=["batch", "tokens", 128])),
                            ["'tokens'"], "load"),
    "declared-outputs-renamed": (_edit(lambda m: m["graphs"]["llm"]["outputs"][0].update(name="scores")),
                                 ["llm.onnx", "'logits'"], "load"),
    "graph-has-other-outputs": (_other_outputs, ["projector.onnx", "outputs", "extra"], "load"),
    "files-bad-sha256": (_edit(lambda m: m["files"]["llm.onnx"].update(sha256="abc")), ["sha256", "64"], "load"),
    "manifest-deeply-nested": (lambda d: (d / "manifest.json").write_text("[" * 100_000), ["not valid JSON"], "load"),
    "manifest-3gib": (lambda d: os.truncate(d / "manifest.json", 3 << 30), ["larger than"], "load"),
    # --- llm ranges ----------------------------------------------------------------------------------
    "num-layers-huge": (_llm(num_layers=100_000_000), ["llm.num_layers=100000000", "1..1024"], "load"),
    "num-layers-bool": (_llm(num_layers=True), ["llm.num_layers=True"], "load"),
    "num-layers-float": (_llm(num_layers=2.0), ["llm.num_layers=2.0"], "load"),
    "num-layers-not-the-graphs": (_llm(num_layers=5), ["llm.onnx", "past_key_values.4.key"], "load"),
    "past-key-padded": (_llm(past_key="{:>900000000}"), ["llm.past_key", "'{}'"], "load"),
    "past-key-lookup": (_llm(past_key="{0.__class__}"), ["llm.past_key"], "load"),
    "kv-heads-not-dividing": (_llm(num_kv_heads=3), ["num_kv_heads=3"], "load"),
    "pad-token-out-of-range": (_llm(pad_token_id=10**6), ["llm.pad_token_id=1000000", "0..49152"], "load"),
    "eos-empty": (_llm(eos_token_ids=[]), ["llm.eos_token_ids"], "load"),
    "eos-string": (_llm(eos_token_ids=["2"]), ["llm.eos_token_ids[*]='2'"], "load"),
    "placeholder-out-of-range": (_edit(lambda m: m["modalities"]["image"].update(placeholder_id=50_000)),
                                 ["placeholder_id=50000"], "load"),
    "keep-beyond-patches": (_edit(lambda m: m["method"].update(keep=1000)), ["method.keep=1000"], "load"),
    # --- preprocessing -------------------------------------------------------------------------------
    "shortest-edge-huge": (_preprocess(size={"shortest_edge": 1_000_000}), ["shortest_edge=1000000", "1..4096"],
                           "load"),
    "crop-negative": (_preprocess(crop_size={"height": -3, "width": 336}), ["crop_size.height=-3"], "load"),
    "image-std-zero": (_preprocess(image_std=[0.0, 0.0, 0.0]), ["image_std", "> 0"], "load"),
    "image-mean-two": (_preprocess(image_mean=[0.5, 0.5]), ["image_mean"], "load"),
    "rescale-string": (_preprocess(rescale_factor="1/255"), ["rescale_factor"], "load"),
    # --- paths ---------------------------------------------------------------------------------------
    "graph-file-absolute": (_edit(lambda m: m["graphs"]["vision"].update(file="/etc/hostname")),
                            ["'/etc/hostname'", "relative path"], "load"),
    "graph-file-dotdot": (_edit(lambda m: m["graphs"]["vision"].update(file="../vision.onnx")),
                          ["'../vision.onnx'", "relative path"], "load"),
    "sizes-key-absolute": (_edit(lambda m: m["graphs"]["vision"]["sizes"].update({"/etc/hostname": 1})),
                           ["'/etc/hostname'"], "load"),
    "graph-symlink-outside": (_symlink_outside("vision.onnx"), ["vision.onnx", "outside the export directory"],
                              "load"),
    "data-symlink-outside": (_symlink_outside("llm.onnx.data"), ["llm.onnx.data", "outside the export directory"],
                             "load"),
    "embeddings-symlink-outside": (_symlink_outside("embed_tokens.npy"), ["embed_tokens.npy", "outside"], "load"),
    "tokenizer-absolute": (_edit(lambda m: m["prompt"].update(tokenizer="/etc/hostname")), ["prompt.tokenizer"],
                           "load"),
    # --- data files ----------------------------------------------------------------------------------
    "newline-missing": (_newline_layout(None), ["image_newline.npy", "missing"], "load"),
    "newline-is-npz": (_newline_layout(_npz_bytes()), ["image_newline.npy", "not a .npy"], "load"),
    "embeddings-are-npz": (_embeddings(lambda f, t: np.savez(f, table=t)), ["embed_tokens.npy", "not a .npy"],
                           "load"),
    "embeddings-float16": (_embeddings(lambda f, t: np.save(f, t.astype(np.float16))),
                           ["embed_tokens.npy", "dtype float16", "float32"], "load"),
    "embeddings-big-endian": (_embeddings(lambda f, t: np.save(f, t.astype(">f4"))),
                              ["embed_tokens.npy", "dtype >f4"], "load"),
    "tokenizer-ids-beyond-table": (_added_token, ["tokenizer.json", "token id 49153", "49153-row"], "load"),
    # --- chat templates (refused when a prompt is rendered) --------------------------------------------
    "template-include": (_template("{% include 'other.j2' %}"), ["include", "not supported"], "generate"),
    "template-import": (_template("{% import 'macros.j2' as m %}{{ m.x() }}"), ["import"], "generate"),
    "template-undefined-call": (_template("{{ nothing() }}"), ["chat template", "UndefinedError"], "generate"),
    "template-division-by-zero": (_template("{{ 1 / 0 }}"), ["chat template", "ZeroDivisionError"], "generate"),
    "template-sandbox-escape": (_template("{{ ''.__class__.__mro__ }}"), ["SecurityError"], "generate"),
    "template-2gb-string": (_template("{{ ('a' * 2000000000)|length }}<image>"), ["'*'", "2000000000"],
                            "generate"),
    "template-format-width": (_template("{{ '{:>900000000}'.format(1) }}"), ["format()"], "generate"),
    "template-nested-ranges": (_template("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}"
                                         "{% endfor %}"), ["more than 2.0 s"], "generate"),
    "template-doubling": (_template("{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                                    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"), ["characters"],
                          "generate"),
}

# A representative handful also goes through the command line (each call costs ~2 s of imports).
CLI_CASES = ["graph-file-absolute", "num-layers-huge", "embeddings-float16", "manifest-3gib", "template-include",
             "template-2gb-string", "graph-has-other-outputs"]


@pytest.fixture
def damaged(tmp_path: Path, tiny_export):
    def make(case: str) -> Path:
        copy = tmp_path / "export"
        shutil.copytree(tiny_export(KEEP), copy)
        CASES[case][0](copy)
        return copy

    return make


@pytest.mark.parametrize("case", CASES)
def test_api_refuses_hostile_export(case: str, damaged) -> None:
    _, named, stage = CASES[case]
    copy = damaged(case)
    with pytest.raises(ManifestError) as raised:
        pipe = Pipeline.load(copy)
        assert stage == "generate", f"{case}: loaded, expected a refusal at load"
        pipe.generate(PICTURE, PROMPT, max_new_tokens=2)
    assert_one_line(raised, *named)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_hostile_export(case: str, damaged, tmp_path: Path) -> None:
    copy = damaged(case)
    image = tmp_path / "picture.png"
    Image.fromarray(PICTURE).save(image)
    run = cli("runtime", copy, "--image", image, "--prompt", PROMPT, "--max-new-tokens", "2")
    assert_refused(run, *CASES[case][1])
    assert run.stdout == "", f"refused, yet printed: {run.stdout!r}"


# --- content integrity -----------------------------------------------------------------------------------


def test_verify_catches_a_same_size_corrupt_file(tmp_path: Path, tiny_export) -> None:
    copy = tmp_path / "export"
    shutil.copytree(tiny_export(KEEP), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"llm.onnx", "llm.onnx.data", "embed_tokens.npy", "tokenizer.json"}
    assert Pipeline.load(copy, verify=True).manifest.files == manifest["files"]  # intact: verifies
    run = cli("runtime", copy, "--verify")
    assert run.returncode == 0 and run.stderr == "", run.stderr

    data = copy / "vision.onnx.data"
    with open(data, "r+b") as file:  # one flipped byte: same size, so only the sha256 can tell
        file.seek(1000)
        byte = file.read(1)
        file.seek(1000)
        file.write(bytes([byte[0] ^ 0xFF]))
    Pipeline.load(copy)  # the cheap size check cannot see it
    with pytest.raises(ManifestError) as raised:
        Pipeline.load(copy, verify=True)
    assert_one_line(raised, str(data), "sha256", "re-export")
    assert_refused(cli("runtime", copy, "--verify"), str(data), "sha256")


# --- files replaced under a running pipeline ----------------------------------------------------------------

_SURVIVOR = """
import os, sys
import numpy as np
from contract.errors import ManifestError
from runtime.pipeline import Pipeline

export = sys.argv[1]
picture = np.full((48, 64, 3), 120, np.uint8)
pipe = Pipeline.load(export)
before = pipe.generate(picture, "What is in the picture?", max_new_tokens=4).token_ids
for name in ("vision.onnx.data", "projector.onnx.data", "llm.onnx.data"):  # what `cp` over the export does
    path = os.path.join(export, name)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\\x7f" * size)
    os.truncate(path, size // 2)
after = pipe.generate(picture, "What is in the picture?", max_new_tokens=4).token_ids
print("GRAPHS", before == after)
with open(os.path.join(export, "embed_tokens.npy"), "r+b") as f:
    f.seek(-4096, 2)
    f.write(b"\\0" * 4096)
try:
    pipe.generate(picture, "What is in the picture?", max_new_tokens=4)
    print("EMBEDDINGS not noticed")
except ManifestError as exc:
    print("EMBEDDINGS", exc)
os.truncate(os.path.join(export, "embed_tokens.npy"), 100)
try:
    pipe.generate(picture, "What is in the picture?", max_new_tokens=4)
except ManifestError as exc:
    print("TRUNCATED", exc)
"""


def test_running_pipeline_survives_files_overwritten_in_place(tmp_path: Path, tiny_export) -> None:
    """Before: ONNX Runtime mapped the .data files and numpy the embedding table, so a truncated file killed
    the process with SIGBUS (exit 135) and an overwritten one silently changed the answer."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_export(KEEP), copy)
    run = subprocess.run([sys.executable, "-c", _SURVIVOR, str(copy)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, f"exit code {run.returncode}: {run.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert lines.get("GRAPHS") == "True", run.stdout  # the sessions hold their own copy of the weights
    assert "was changed while this pipeline used it" in lines.get("EMBEDDINGS", ""), run.stdout
    assert "embed_tokens.npy" in lines.get("TRUNCATED", ""), run.stdout
