"""Bad input gets a clear error and loses nothing, through the real command lines and the Python API.

A refused command exits with code 2 and writes exactly one stderr line, "error: ...", naming the bad value,
with no traceback (unless --debug); the exporter leaves no export directory and no `.NAME.partial-*`
directory behind, and an existing directory stays as it was. The Python API raises InputError or
ManifestError with the same one-line messages.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from contract.errors import InputError, ManifestError
from runtime.pipeline import Pipeline
from tests.helpers import assert_one_line, assert_refused, cli, leftovers, run_main, snapshot

KEEP = 32  # the export the parity tests also use, so a whole-suite run exports it once
PROMPT = "What is in the picture?"


# --- export --------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """Directories that look like checkpoints but are not LLaVA ones. The built-in tiny LLaVA-NeXT is built
    first (its build prints progress lines, which are not what the refusal cases check)."""
    from export import checkpoints as builtin
    from export.families import llava_next

    builtin.for_family(llava_next, "tiny")
    (tmp_path / "no-config").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text('{"model_type": "llava", "vision_config": {')
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return tmp_path


# (arguments after the family, strings the error must name); "{tmp}" is the test's temporary directory.
EXPORT_CASES = {
    "keep-0": (["llava15", "--keep", "0", "--model", "tiny"], ["--keep 0", "at least 1"]),
    "keep-negative": (["llava15", "--keep", "-3", "--model", "tiny"], ["--keep -3", "at least 1"]),
    "keep-too-many": (["llava15", "--keep", "577", "--model", "tiny"], ["--keep 577", "576 patch tokens", "1..576"]),
    "unknown-family": (["llava99", "--keep", "8", "--model", "tiny"], ["'llava99'", "llava15"]),
    "model-missing": (["llava15", "--keep", "8", "--model", "{tmp}/missing"], ["{tmp}/missing", "directory"]),
    "model-no-config": (["llava15", "--keep", "8", "--model", "{tmp}/no-config"], ["{tmp}/no-config", "config.json"]),
    "model-corrupt-config": (
        ["llava15", "--keep", "8", "--model", "{tmp}/corrupt"], ["{tmp}/corrupt/config.json", "not a valid JSON"],
    ),
    "model-wrong-type": (["llava15", "--keep", "8", "--model", "{tmp}/llama"], ["{tmp}/llama", "'llama'", "'llava'"]),
    "model-not-cached": (
        ["llava15", "--keep", "8", "--model", "prunevlm-tests/not-a-cached-model"],
        ["'prunevlm-tests/not-a-cached-model'", "HF_HUB_OFFLINE", "--model tiny"],
    ),
    "opset": (["llava15", "--keep", "8", "--model", "tiny", "--opset", "99"], ["--opset 99", "17..23"]),
    "max-seq-len": (["llava15", "--keep", "8", "--model", "tiny", "--max-seq-len", "1"], ["--max-seq-len 1"]),
    "keep-not-a-number": (["llava15", "--keep", "abc", "--model", "tiny"], ["--keep", "'abc'", "--help"]),
    "layout-unknown": (["llava15", "--keep", "8", "--model", "tiny", "--layout", "hf"], ["--layout 'hf'", "single"]),
    "layout-hf-pruned": (["llava-next", "--keep", "29", "--model", "tiny", "--layout", "hf"],
                         ["--layout hf", "--keep 576", "fastervlm"]),
    # in-LLM pruning (FEATHER, FastV); the tiny LLM has 3 layers
    "method-unknown": (["llava15", "--method", "pdrop", "--model", "tiny"], ["--method", "'pdrop'", "fastv"]),
    "fastervlm-without-keep": (["llava15", "--model", "tiny"], ["--keep K is required", "fastervlm"]),
    "feather-with-keep": (["llava15", "--method", "feather", "--keep", "32", "--model", "tiny"],
                          ["--keep", "--method feather", "--reduction"]),
    "reduction-zero": (["llava15", "--method", "feather", "--reduction", "0", "--model", "tiny"],
                       ["--reduction 0.0", "(0, 1)"]),
    "reduction-one": (["llava15", "--method", "fastv", "--reduction", "1", "--model", "tiny"], ["--reduction 1.0", "(0, 1)"]),
    "reduction-nan": (["llava15", "--method", "feather", "--reduction", "nan", "--model", "tiny"], ["--reduction nan"]),
    "reduction-with-fastervlm": (["llava15", "--keep", "8", "--reduction", "0.5", "--model", "tiny"],
                                 ["--reduction", "--method feather / fastv"]),
    "stride-zero": (["llava15", "--method", "feather", "--grid-stride", "0", "--model", "tiny"],
                    ["--grid-stride 0", "1 or more"]),
    "stride-beyond-grid": (["llava15", "--method", "feather", "--grid-stride", "25", "--model", "tiny"],
                           ["--grid-stride 25", "24x24", "1..24"]),
    "stride-with-fastv": (["llava15", "--method", "fastv", "--grid-stride", "3", "--model", "tiny"],
                          ["--grid-stride", "FastV"]),
    "layers-beyond-llm": (["llava15", "--method", "feather", "--prune-layers", "2,4", "--model", "tiny"],
                          ["--prune-layers 2,4", "3 layers", "1..2"]),
    "layers-zero": (["llava15", "--method", "feather", "--prune-layers", "0,2", "--model", "tiny"],
                    ["--prune-layers 0,2", "1..2"]),
    "layers-not-increasing": (["llava15", "--method", "feather", "--prune-layers", "2,1", "--model", "tiny"],
                              ["--prune-layers 2,1", "strictly increasing"]),
    "layers-not-numbers": (["llava15", "--method", "feather", "--prune-layers", "a,b", "--model", "tiny"],
                           ["--prune-layers", "'a,b'"]),
    "fastv-two-layers": (["llava15", "--method", "fastv", "--prune-layers", "1,2", "--model", "tiny"],
                         ["--prune-layers 1,2", "FastV prunes once"]),
    "positions-packed-in-llm": (["llava15", "--method", "feather", "--positions", "packed", "--model", "tiny"],
                                ["--positions packed", "original"]),
    "feather-layout-hf": (["llava-next", "--method", "feather", "--layout", "hf", "--model", "tiny"],
                          ["--layout hf", "fixed token window", "fastervlm"]),
    "positions-original-unpruned": (["llava15", "--keep", "576", "--positions", "original", "--model", "tiny"],
                                    ["--positions original", "--keep 576", "drop --positions"]),
    "feather-float16": (["llava15", "--method", "feather", "--dtype", "float16", "--model", "tiny"],
                        ["--dtype float16", "float32"]),
    "target-float16": (["llava15", "--keep", "32", "--target", "onnxruntime", "--dtype", "float16", "--model", "tiny"],
                       ["--target onnxruntime", "--dtype float16", "--dtype float32"]),
    "int4-float16": (["llava15", "--keep", "32", "--llm-weights", "int4", "--dtype", "float16", "--model", "tiny"],
                     ["--llm-weights int4", "--dtype float16", "--dtype float32"]),
    "int8-standard": (["llava15", "--keep", "32", "--llm-weights", "int8", "--model", "tiny"],
                      ["--llm-weights int8", "--target onnxruntime"]),
    "target-unknown": (["llava15", "--keep", "32", "--target", "tensorrt", "--model", "tiny"],
                       ["--target", "'tensorrt'", "onnxruntime"]),
    "reduction-keeps-nothing": (["llava15", "--method", "feather", "--reduction", "0.99", "--model", "tiny",
                                 "--no-validate"], ["--reduction 0.99", "layer 2 keeps no token", "smaller --reduction"]),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_refuses(case: str, checkpoints: Path, tiny_checkpoint: Path) -> None:
    args, named = EXPORT_CASES[case]
    tmp = checkpoints
    out = tmp / "out"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home")}  # an empty cache: nothing is cached
    run = run_main("export", *[a.format(tmp=tmp) for a in args], "--out", out, cwd=tmp, env=offline)
    assert_refused(run, *[n.format(tmp=tmp) for n in named])
    assert not out.exists(), f"{out} was created"
    assert leftovers(tmp) == [], f"left behind: {leftovers(tmp)}"
    assert not (tmp / "exports").exists()


def test_export_refuses_existing_directory(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    before = snapshot(out)

    run = run_main("export", "llava15", "--keep", "8", "--model", "tiny", "--out", out, cwd=tmp_path)
    assert_refused(run, str(out), "--force")
    # With --force, bad input is still refused before the existing directory is touched.
    run = run_main("export", "llava15", "--keep", "577", "--model", "tiny", "--out", out, "--force", cwd=tmp_path)
    assert_refused(run, "--keep 577")

    assert snapshot(out) == before, "the existing directory changed"
    assert leftovers(tmp_path) == [], f"left behind: {leftovers(tmp_path)}"


def test_export_force_replaces_directory(tmp_path: Path, tiny_checkpoint: Path, tiny_export, reuse_graphs) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"format_version": 1}')  # an older export: --force replaces only exports
    (out / "stale.txt").write_text("from an older export")

    tiny_export(KEEP)  # its graphs are copied below instead of exported again
    with reuse_graphs("llava15", {}):
        run = run_main("export", "llava15", "--keep", KEEP, "--model", "tiny", "--out", out, "--force", "--no-validate",
                       cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert not (out / "stale.txt").exists(), "--force kept the old directory's content"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["keep"] == KEEP
    assert all((out / g["file"]).is_file() for g in manifest["graphs"].values())
    assert leftovers(tmp_path) == [], f"left behind: {leftovers(tmp_path)}"


def test_debug_shows_traceback(tmp_path: Path, tiny_export) -> None:
    run = cli("export", "llava15", "--keep", "0", "--out", tmp_path / "out", "--debug", cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" in run.stderr, run.stderr
    assert "ExportError: --keep 0 is out of range" in run.stderr, run.stderr

    run = cli("runtime", tiny_export(KEEP), "--image", tmp_path / "missing.jpg", "--prompt", PROMPT, "--debug")
    assert run.returncode != 0 and "Traceback" in run.stderr, run.stderr
    assert "InputError: image file not found" in run.stderr, run.stderr


# --- runtime: images and arguments ---------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG with a real IHDR claiming width x height and no pixel data (as in tests/runtime/test_preprocess.py)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


SIXTEEN_BIT = (np.arange(200 * 300, dtype=np.uint32).reshape(200, 300) * 21 % 65536).astype(np.uint16)


def _half_transparent() -> tuple[np.ndarray, np.ndarray]:
    """(RGBA, what load_image must make of it): left half transparent, so it becomes white; right half opaque."""
    rgb = data.chelsea()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : rgb.shape[1] // 2] = 0
    expected = rgb.copy()
    expected[:, : rgb.shape[1] // 2] = 255
    return np.dstack([rgb, alpha]), expected


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    chelsea = data.chelsea()
    Image.fromarray(chelsea).save(folder / "cat.jpg", quality=90)
    jpeg = (folder / "cat.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    Image.fromarray(chelsea).convert("L").save(folder / "gray.png")
    Image.fromarray(_half_transparent()[0]).save(folder / "rgba.png")
    Image.fromarray(SIXTEEN_BIT).save(folder / "sixteen.png")
    Image.fromarray(np.full((40, 60), 0.5, np.float32)).save(folder / "float.tif")  # mode F
    Image.fromarray(np.array([[-1, 70_000]] * 8, np.int32)).save(folder / "wide.tif")  # mode I beyond 16 bits
    return folder


# (image file, prompt, further arguments, strings the error must name); "{images}" is the images folder.
RUNTIME_CASES = {
    "image-missing": ("missing.jpg", PROMPT, [], ["{images}/missing.jpg", "not found"]),
    "image-is-text": ("text.jpg", PROMPT, [], ["{images}/text.jpg", "not an image"]),
    "image-truncated": ("truncated.jpg", PROMPT, [], ["{images}/truncated.jpg", "truncated"]),
    "image-huge": ("bomb.png", PROMPT, [], ["{images}/bomb.png", "too large", "67108864 pixels"]),
    "image-float": ("float.tif", PROMPT, [], ["{images}/float.tif", "mode F", "8-bit"]),
    "image-wide-int": ("wide.tif", PROMPT, [], ["{images}/wide.tif", "mode I", "-1..70000", "0..65535"]),
    "prompt-empty": ("cat.jpg", "", [], ["prompt ''", "empty"]),
    "prompt-whitespace": ("cat.jpg", " \t ", [], ["prompt ' \\t '", "empty"]),
    "prompt-placeholder": ("cat.jpg", "what is <image>?", [], ["'<image>'"]),
    "max-new-tokens-0": ("cat.jpg", PROMPT, ["--max-new-tokens", "0"], ["max_new_tokens=0", "positive"]),
    "temperature-0": ("cat.jpg", PROMPT, ["--sample", "--temperature", "0"], ["temperature=0.0", "> 0"]),
    "temperature-nan": ("cat.jpg", PROMPT, ["--sample", "--temperature", "nan"], ["temperature=nan", "> 0"]),
    "top-p-0": ("cat.jpg", PROMPT, ["--sample", "--top-p", "0"], ["top_p=0.0", "(0, 1]"]),
    "seed-negative": ("cat.jpg", PROMPT, ["--sample", "--seed", "-1"], ["seed=-1", ">= 0"]),
    "max-new-tokens-not-a-number": ("cat.jpg", PROMPT, ["--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
}


@pytest.mark.parametrize("case", RUNTIME_CASES)
def test_runtime_refuses(case: str, images: Path, tiny_export) -> None:
    image, prompt, args, named = RUNTIME_CASES[case]
    run = cli("runtime", tiny_export(KEEP), "--image", images / image, "--prompt", prompt, *args)
    assert_refused(run, *[n.format(images=images) for n in named])
    assert run.stdout == "", f"refused, yet printed: {run.stdout!r}"


def _answer(export_dir: Path, image: Path) -> dict:
    run = cli("runtime", export_dir, "--image", image, "--prompt", PROMPT, "--max-new-tokens", "3", "--json")
    assert run.returncode == 0 and "error" not in run.stderr, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "sixteen.png"])
def test_runtime_converts_images(name: str, images: Path, tiny_export, pipeline) -> None:
    """Grayscale, RGBA (composited onto white) and 16-bit (scaled by the high byte, as runtime/preprocess.py
    documents) files give what the API gives for the 8-bit RGB picture they stand for."""
    expected_rgb = {
        "gray.png": np.asarray(Image.fromarray(data.chelsea()).convert("L")),
        "rgba.png": _half_transparent()[1],
        "sixteen.png": (SIXTEEN_BIT >> 8).astype(np.uint8),
    }[name]
    got = _answer(tiny_export(KEEP), images / name)
    expected = pipeline(KEEP).generate(expected_rgb, PROMPT, max_new_tokens=3)
    assert got["kept_indices"] == expected.kept_indices.tolist(), f"{name}: a different picture reached the model"
    assert got["token_ids"] == expected.token_ids


# --- runtime: export directories -----------------------------------------------------------------------


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# How to damage a copy of an export, and the strings the error must name ("{dir}": the damaged copy).
DAMAGES = {
    "graph-missing": (lambda d: (d / "vision.onnx").unlink(), ["{dir}/vision.onnx", "missing"]),
    "data-truncated": (
        lambda d: (d / "llm.onnx.data").write_bytes((d / "llm.onnx.data").read_bytes()[:1000]),
        ["{dir}/llm.onnx.data", "1000 bytes", "truncated"],
    ),
    "manifest-corrupt": (
        lambda d: (d / "manifest.json").write_text('{"format_version": 1, "graphs": '),
        ["{dir}/manifest.json", "not valid JSON"],
    ),
    "manifest-other-version": (
        lambda d: _edit_manifest(d, lambda m: m.update(format_version=1)),
        ["{dir}/manifest.json", "format_version 1", "format_version 5", "re-export"],
    ),
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(), ["{dir}/manifest.json", "missing"]),
    "manifest-target-unknown": (lambda d: _edit_manifest(d, lambda m: m.update(target="gpu")),
                                ["target='gpu'", "standard, onnxruntime"]),
    "manifest-buffer-without-target": (lambda d: _edit_manifest(d, lambda m: m["llm"].update(kv_cache="buffer")),
                                       ["llm.kv_cache=buffer", "target onnxruntime"]),
    "embeddings-truncated": (
        lambda d: (d / "embed_tokens.npy").write_bytes((d / "embed_tokens.npy").read_bytes()[:1000]),
        ["{dir}/embed_tokens.npy", "re-export"],
    ),
    "tokenizer-corrupt": (lambda d: (d / "tokenizer.json").write_text('{"x":'), ["{dir}/tokenizer.json", "re-export"]),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_runtime_refuses_damaged_export(case: str, tmp_path: Path, images: Path, tiny_export) -> None:
    damage, named = DAMAGES[case]
    copy = tmp_path / "export"
    shutil.copytree(tiny_export(KEEP), copy)
    damage(copy)
    named = [n.format(dir=copy) for n in named]

    run = cli("runtime", copy, "--image", images / "cat.jpg", "--prompt", PROMPT)
    assert_refused(run, *named)
    with pytest.raises(ManifestError) as raised:
        Pipeline.load(copy)
    assert_one_line(raised, *named)


def test_runtime_refuses_missing_export_directory(tmp_path: Path, images: Path, tiny_export) -> None:
    run = cli("runtime", tmp_path / "nowhere", "--image", images / "cat.jpg", "--prompt", PROMPT)
    assert_refused(run, f"'{tmp_path / 'nowhere'}'", "does not exist")
    manifest = tiny_export(KEEP) / "manifest.json"
    run = cli("runtime", manifest, "--image", images / "cat.jpg", "--prompt", PROMPT)
    assert_refused(run, f"'{manifest}'", "is not a directory")


def test_runtime_refuses_prompt_longer_than_export(tmp_path: Path, images: Path, tiny_export) -> None:
    copy = tmp_path / "export"
    shutil.copytree(tiny_export(KEEP), copy)
    _edit_manifest(copy, lambda m: m["llm"].update(max_seq_len=40))  # the image alone takes 32
    run = cli("runtime", copy, "--image", images / "cat.jpg", "--prompt", PROMPT)
    assert_refused(run, f"with {KEEP} visual tokens", "at most 39", "shorten the prompt")
    with pytest.raises(InputError) as raised:
        Pipeline.load(copy).generate(data.chelsea(), PROMPT)
    assert_one_line(raised, "at most 39")


# --- Python API --------------------------------------------------------------------------------------------

PICTURE = data.chelsea()[:120, :160]

API_CASES = {
    "more-images-than-prompts": (dict(image=[PICTURE, PICTURE], prompt=[PROMPT]), ["2 images and 1 prompts"]),
    "no-images-no-prompts": (dict(image=[], prompt=[]), ["0 images and 0 prompts"]),
    "one-array-many-prompts": (dict(image=PICTURE, prompt=[PROMPT, PROMPT]), ["ndarray", "list"]),
    "prompt-none": (dict(image=PICTURE, prompt=None), ["NoneType"]),
    "prompt-not-str": (dict(image=[PICTURE], prompt=[5]), ["must be a str", "int 5"]),
    "prompt-empty": (dict(image=PICTURE, prompt="  "), ["prompt '  '", "empty"]),
    "max-new-tokens-0": (dict(max_new_tokens=0), ["max_new_tokens=0"]),
    "max-new-tokens-float": (dict(max_new_tokens=2.5), ["max_new_tokens=2.5"]),
    "temperature-0": (dict(do_sample=True, temperature=0), ["temperature=0", "> 0"]),
    "temperature-nan": (dict(do_sample=True, temperature=float("nan")), ["temperature=nan"]),
    "temperature-none": (dict(do_sample=True, temperature=None), ["temperature=None"]),
    "top-p-0": (dict(do_sample=True, top_p=0), ["top_p=0", "(0, 1]"]),
    "top-p-above-1": (dict(do_sample=True, top_p=1.5), ["top_p=1.5", "(0, 1]"]),
    "top-k-negative": (dict(do_sample=True, top_k=-1), ["top_k=-1", ">= 0"]),
    "seed-str": (dict(do_sample=True, seed="42"), ["seed='42'"]),
    "image-float32": (dict(image=PICTURE.astype(np.float32)), ["(120, 160, 3)", "float32", "uint8"]),
    "image-rgba-array": (dict(image=np.zeros((120, 160, 4), np.uint8)), ["(120, 160, 4)", "HxWx3"]),
    "image-channels-first": (dict(image=np.zeros((3, 120, 160), np.uint8)), ["(3, 120, 160)", "HxWx3"]),
    "image-empty": (dict(image=np.zeros((0, 160, 3), np.uint8)), ["(0, 160, 3)", "empty"]),
    "image-none": (dict(image=None), ["NoneType"]),
}


@pytest.mark.parametrize("case", API_CASES)
def test_generate_refuses(case: str, pipeline) -> None:
    changes, named = API_CASES[case]
    kwargs = {"image": PICTURE, "prompt": PROMPT, "max_new_tokens": 2, **changes}
    with pytest.raises(InputError) as raised:
        pipeline(KEEP).generate(kwargs.pop("image"), kwargs.pop("prompt"), **kwargs)
    assert_one_line(raised, *named)


def test_stream_refuses_like_generate(pipeline) -> None:
    with pytest.raises(InputError) as raised:
        list(pipeline(KEEP).stream(PICTURE, PROMPT, max_new_tokens=0))
    assert_one_line(raised, "max_new_tokens=0")
    with pytest.raises(InputError) as raised:
        list(pipeline(KEEP).stream(PICTURE, PROMPT, do_sample=True, top_p=0))
    assert_one_line(raised, "top_p=0")


def test_load_refuses(tmp_path: Path, tiny_export) -> None:
    with pytest.raises(ManifestError) as raised:
        Pipeline.load(tmp_path / "nowhere")
    assert_one_line(raised, str(tmp_path / "nowhere"), "does not exist")
    with pytest.raises(InputError) as raised:
        Pipeline.load(tiny_export(KEEP), backend="tensorflow")
    assert_one_line(raised, "'tensorflow'", "'onnxruntime'")


def test_extreme_sampling_values_still_sample(pipeline) -> None:
    """Legal extremes must not break the sampler: a top_k beyond the vocabulary filters nothing, and a
    vanishing temperature is greedy decoding (it used to overflow to inf - inf = NaN)."""
    pipe = pipeline(KEEP)
    greedy = pipe.generate(PICTURE, PROMPT, max_new_tokens=4).token_ids
    cold = pipe.generate(PICTURE, PROMPT, max_new_tokens=4, do_sample=True, temperature=1e-310, seed=0).token_ids
    assert cold == greedy
    wide = pipe.generate(PICTURE, PROMPT, max_new_tokens=4, do_sample=True, top_k=10**9, seed=0)
    same = pipe.generate(PICTURE, PROMPT, max_new_tokens=4, do_sample=True, top_k=0, seed=0)
    assert wide.token_ids == same.token_ids
