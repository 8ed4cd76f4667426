"""`run(options)`: an export directory + photos -> Q/DQ graphs, calibration set and calibration.json.

    photos --runtime preprocessing--> calibration-<sha>.npz
    vision.onnx    + pixel_values                         --ModelOpt PTQ--> vision.int8.onnx
    projector.onnx + fp32 vision outputs                  --ModelOpt PTQ--> projector.int8.onnx
    llm.onnx       + prefill inputs (fp32 vision+projector) --ModelOpt PTQ--> llm.int8.onnx      (--graphs llm)
    held-out photos: fp32 vs quantized graphs (top-k agreement, cosine, latency) -> calibration.json

Everything is written into a `.calibration.partial-*` directory beside the outputs, checked and measured
there, then renamed into place (external data before the graph that needs it, calibration.json last).
A failure or an interrupt (Ctrl-C, SIGTERM, SIGHUP) removes the partial directory: no half-written file is
ever visible; what a SIGKILL leaves is removed by the next run. `OUT/.calibration.lock` is held meanwhile:
one calibration writes into a directory at a time. Only files an existing calibration.json lists are
replaced (or deleted when no entry refers to them any more); any other file of the same name is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from calibration import data, evaluate, nodes, ptq
from calibration.options import TARGETS, CalibrationError, CalibrationOptions
from contract import names, onnx_walk
from contract.errors import UserError
from contract.files import check_terminated, locked, partial_dir, quoted, require_replaceable_file, signals_raise
from contract.manifest import MANIFEST_FILE, TOOLKIT_VERSION, Manifest, check_files
from contract.progress import Progress as Log

RECORD_FILE = "calibration.json"
RECORD_VERSION = 1
ROLES = (names.VISION, names.PROJECTOR, names.LLM)  # --graphs: the image modality's graphs and the LLM


def run(options: CalibrationOptions, log: "Log | None" = None) -> dict:
    """Quantize the graphs `options` names; returns this precision's entry of calibration.json.
    Every input is checked (manifest, files, photos, ModelOpt installed) before anything is written."""
    log = log or Log()
    export_dir = Path(options.export_dir)
    manifest = Manifest.read(export_dir)
    graph_of = graph_names(manifest)
    roles = _roles(manifest, options.graphs)
    for graph in sorted({*roles.values(), graph_of[names.VISION], graph_of[names.PROJECTOR]}):
        if graph not in manifest.graphs:
            raise CalibrationError(f"the manifest in {str(export_dir)!r} has no {graph!r} graph")
        check_files(export_dir, manifest.graphs[graph])
    out = options.out_dir()
    outputs = _output_names(manifest, roles, options.precision)
    _refuse_foreign(out, _read_record(out), outputs)  # before any work; again below, under the lock
    input_shape = manifest.graphs[graph_of[names.VISION]].inputs[0].shape
    calibration = data.build(options.images, options.calibration_data, manifest, export_dir, input_shape)
    held_out = _held_out(options, manifest, export_dir)
    ptq.require_modelopt()
    log.say(f"calibrating {', '.join(roles)} at {options.precision} on {len(calibration.names)} images")

    with _writing(out) as tmp:
        record = _read_record(out)
        _refuse_foreign(out, record, outputs)
        listed = _listed(record)
        npz_sha = data.write_npz(calibration, tmp / "calibration.npz")
        npz_name = f"calibration-{npz_sha[:12]}.npz"
        os.replace(tmp / "calibration.npz", tmp / npz_name)
        pipe = _pipeline(export_dir) if names.LLM in roles else None
        feeds = _calibration_feeds(export_dir, manifest, roles, calibration, pipe, options.prompt)
        graphs, files = _quantize(options, export_dir, manifest, roles, feeds, tmp, log)
        metrics = None
        if held_out is not None:
            pairs = {role: (export_dir / manifest.graphs[graph_of[role]].file,) * 2
                     for role in (names.VISION, names.PROJECTOR)}
            pairs.update({role: (export_dir / graphs[role]["source"], tmp / graphs[role]["file"]) for role in roles})
            with log.step(f"measuring on {len(held_out.names)} held-out photos"):
                metrics = evaluate.measure(export_dir, manifest, pipe, pairs, options.precision == "fp8", held_out,
                                           options.prompt, options.latency_runs)
            metrics["calibration_overlap"] = _overlap(calibration, held_out)
        record[options.precision] = _entry(options, manifest, calibration, npz_name, npz_sha, graphs, metrics)
        record["notes"] = _notes(manifest)
        _install(tmp, out, [tmp / npz_name, *sorted(files, key=lambda p: not p.name.endswith(".data"))], record,
                 listed)
    log.say(f"wrote {out / RECORD_FILE}")
    return record[options.precision]


def _quantize(options: CalibrationOptions, export_dir: Path, manifest: Manifest, roles: dict[str, str],
              feeds: dict, tmp: Path, log: "Log") -> tuple[dict, list[Path]]:
    """Each graph through ModelOpt into `tmp`; returns the record of each graph and the files written."""
    graphs, files = {}, []
    for role, graph in roles.items():
        source = export_dir / manifest.graphs[graph].file
        out_name = f"{Path(source.name).stem}.{options.precision}.onnx"
        vocab = manifest.llm.vocab_size if role == names.LLM else None
        plan = nodes.plan(onnx.load(str(source), load_external_data=False), vocab)
        work = tmp / role
        work.mkdir()
        with log.step(f"{role}: ModelOpt {options.precision} PTQ of {len(plan.quantize)} linear layers"):
            result = ptq.quantize(source, out_name, work, options.precision, options.calibration_method,
                                  feeds[role], plan, verbose=log.verbose)
        for path in result.files:  # beside the other outputs, so evaluation finds the data file by name
            os.replace(path, tmp / path.name)
        files += [tmp / path.name for path in result.files]
        graphs[role] = {
            "source": source.name,
            "source_sha256": data.sha256_file(source),
            "file": out_name,
            "files": {path.name: data.sha256_file(tmp / path.name) for path in result.files},
            "opset": result.opset,
            "qdq_nodes": result.qdq,
            **plan.record(),
            "rewired_to_float": list(result.rewired),
        }
        shutil.rmtree(work)  # ModelOpt's intermediate files
    return graphs, files


def graph_names(manifest: Manifest) -> dict[str, str]:
    """Graph role -> graph name in the manifest: the image modality's vision and projector graphs, the LLM."""
    image = manifest.modalities.get(names.IMAGE)
    if image is None:
        raise CalibrationError(f"this export has no {names.IMAGE!r} modality; calibration needs photos")
    return {names.VISION: image.vision, names.PROJECTOR: image.projector, names.LLM: names.LLM}


def _roles(manifest: Manifest, graphs: tuple[str, ...]) -> dict[str, str]:
    known = graph_names(manifest)
    for role in graphs:
        if role not in known:
            raise CalibrationError(f"--graphs names {role!r}; choose from {', '.join(ROLES)}")
        if role == names.LLM and manifest.llm_pruning is not None:
            raise CalibrationError(f"--graphs llm: this export prunes inside the LLM ({manifest.llm_pruning.method}, "
                                   "blocks llm.0, llm.1, ...); calibrating its blocks is not supported, use --graphs "
                                   "vision,projector")
        if role == names.LLM and (manifest.target != "standard" or manifest.llm.weights != "float"):
            raise CalibrationError(f"--graphs llm: this export's LLM graph is already specialised (--target "
                                   f"{manifest.target}, --llm-weights {manifest.llm.weights}); calibrate a standard "
                                   "float export, or use --graphs vision,projector")
        if known[role] not in manifest.graphs:
            raise CalibrationError(f"the manifest has no {known[role]!r} graph for --graphs {role}")
    return {role: known[role] for role in ROLES if role in graphs}


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[Path]:
    """A `.calibration.partial-*` directory in `out` (created if missing, removed again if the run fails),
    with `out/.calibration.lock` held and SIGTERM / SIGHUP unwinding like Ctrl-C."""
    label = f"the calibration outputs in {quoted(out)}"
    created = not out.exists()
    if created:
        try:
            out.mkdir()
        except OSError as exc:
            raise CalibrationError(f"cannot create --out {quoted(out)} ({exc.strerror})") from None
    try:
        with signals_raise(), locked(out, "calibration", label, CalibrationError), \
                partial_dir(out, "calibration", label, CalibrationError) as tmp:
            yield tmp
    except BaseException:
        if created:  # only if still empty: another run may have taken the lock and be writing into it
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _output_names(manifest: Manifest, roles: dict[str, str], precision: str) -> list[str]:
    """The graph files this run writes (`vision.int8.onnx` and its `.data`), and calibration.json."""
    stems = [Path(Path(manifest.graphs[graph].file).name).stem for graph in roles.values()]
    return [name for stem in stems for name in (f"{stem}.{precision}.onnx", f"{stem}.{precision}.onnx.data")] + [
        RECORD_FILE]


def _listed(record: dict) -> set[str]:
    """The files a calibration record lists (graphs, their data, calibration sets): the ones prunevlm wrote."""
    listed = {RECORD_FILE}
    for entry in record.values():
        if not isinstance(entry, dict):
            continue
        calibration_set = entry.get("calibration_data")
        if isinstance(calibration_set, dict) and isinstance(calibration_set.get("file"), str):
            listed.add(calibration_set["file"])
        graphs = entry.get("graphs")
        for graph in graphs.values() if isinstance(graphs, dict) else ():
            if isinstance(graph, dict):
                listed.update(n for n in [graph.get("file"), *(graph.get("files") or {})] if isinstance(n, str))
    return listed


def _refuse_foreign(out: Path, record: dict, outputs: list[str]) -> None:
    """Refuse to replace a file in `out` that calibration.json does not list: prunevlm did not write it."""
    listed = _listed(record)
    for name in outputs:
        path = out / name
        require_replaceable_file(path, "calibration output", CalibrationError)
        if name != RECORD_FILE and os.path.lexists(path) and name not in listed:
            raise CalibrationError(f"{quoted(path)} exists and no calibration.json there lists it, so prunevlm did "
                                   "not write it: move it away or choose another --out")


def _read_record(out: Path) -> dict:
    """The existing calibration.json (other precisions are kept), or a new one. Refused when unreadable,
    rather than overwritten: it is the only record of the graphs already there."""
    path = out / RECORD_FILE
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"--out {str(out)!r} exists and is not a directory")
    if not out.exists() and not out.parent.is_dir():
        raise CalibrationError(f"--out {str(out)!r}: its parent directory does not exist")
    if not path.exists():
        return {"format_version": RECORD_VERSION}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path} is not valid JSON ({exc}); move it away and calibrate again") from None
    if not isinstance(record, dict) or record.get("format_version") != RECORD_VERSION:
        raise CalibrationError(f"{path} is not a calibration record of format_version {RECORD_VERSION}; move it away")
    return record


def _held_out(options: CalibrationOptions, manifest: Manifest, export_dir: Path) -> data.CalibrationSet | None:
    if not options.evaluate:
        return None
    try:
        if options.eval_images is not None:
            return data.from_images(data.list_images(options.eval_images, "--eval-images"), manifest, export_dir)
        photos = evaluate.skimage_photos()
        return None if photos is None else data.from_arrays(photos, manifest, export_dir)
    except CalibrationError:
        raise
    except UserError as exc:  # the runtime's one-line InputError for a bad photo
        raise CalibrationError(f"--eval-images: {exc}") from None


def _pipeline(export_dir: Path):
    from runtime.pipeline import Pipeline

    return Pipeline.load(export_dir)


def _calibration_feeds(export_dir: Path, manifest: Manifest, roles: dict[str, str], calibration: data.CalibrationSet,
                       pipe, prompt: str) -> dict[str, dict[str, np.ndarray]]:
    """Each graph's calibration inputs: pixels for the vision graph, the fp32 graphs' outputs downstream."""
    graph_of = graph_names(manifest)
    vision = manifest.graphs[graph_of[names.VISION]]
    feeds = {names.VISION: {vision.inputs[0].name: calibration.pixel_values}}
    if names.PROJECTOR not in roles and names.LLM not in roles:
        return {r: feeds[r] for r in roles}
    session = evaluate.session(export_dir / vision.file)
    outs = [session.run([names.IMAGE_FEATURES, names.KEEP_INDICES], {vision.inputs[0].name: calibration.pixel_values[i:i + 1]})
            for i in range(len(calibration.pixel_values))]
    feeds[names.PROJECTOR] = {names.IMAGE_FEATURES: np.concatenate([o[0] for o in outs]),
                          names.KEEP_INDICES: np.concatenate([o[1] for o in outs])}
    if names.LLM in roles:
        projector = evaluate.session(export_dir / manifest.graphs[graph_of[names.PROJECTOR]].file)
        embeds = projector.run(None, feeds[names.PROJECTOR])[0]  # [S, K, D]
        layout = pipe.layouts[names.IMAGE]
        starts = np.concatenate([[0], np.cumsum(calibration.tiles)])
        visual = [layout.assemble(embeds[a:b], feeds[names.PROJECTOR][names.KEEP_INDICES][a:b], tuple(size))
                  for a, b, size in zip(starts[:-1], starts[1:], calibration.sizes)]
        feeds[names.LLM] = data.llm_feeds(pipe, visual, prompt)
    return {r: feeds[r] for r in roles}


def _overlap(calibration: data.CalibrationSet, held_out: data.CalibrationSet) -> list[str]:
    """Held-out photos whose pixels are also in the calibration set (then they are not held out)."""
    seen = {row.tobytes() for row in calibration.pixel_values}
    starts = np.concatenate([[0], np.cumsum(held_out.tiles)])
    return [name for name, a, b in zip(held_out.names, starts[:-1], starts[1:])
            if any(row.tobytes() in seen for row in held_out.pixel_values[a:b])]


def _entry(options: CalibrationOptions, manifest: Manifest, calibration: data.CalibrationSet, npz_name: str,
           npz_sha: str, graphs: dict, metrics: dict | None) -> dict:
    sm = TARGETS.get(options.target) if options.target else None
    return {
        "precision": options.precision,
        "target": options.target,
        "target_compute_capability": ".".join(map(str, sm)) if sm else None,
        "tool": f"nvidia-modelopt {_version('nvidia-modelopt')}: modelopt.onnx.quantization.quantize",
        "settings": {
            "calibration_method": options.calibration_method,
            "op_types_to_quantize": list(onnx_walk.LINEAR_OPS),
            "nodes_to_quantize": "the linear layers listed per graph under 'quantized'",
            "high_precision_dtype": "fp32",
            "calibration_eps": ["cpu"],
        },
        "calibration_data": {
            "file": npz_name,
            "sha256": npz_sha,
            "images": list(calibration.names),
            "sub_images": int(len(calibration.pixel_values)),
            "llm_prompt": options.prompt if names.LLM in graphs else None,
        },
        "export": {"directory": str(Path(options.export_dir).resolve()),
                   "manifest_sha256": data.sha256_file(Path(options.export_dir) / MANIFEST_FILE),
                   "model": manifest.source.get("model"), "keep": manifest.method.keep},
        "graphs": graphs,
        "metrics": metrics,
        "versions": {"prunevlm": TOOLKIT_VERSION, "onnx": onnx.__version__, "onnxruntime": _version("onnxruntime")},
    }


def _notes(manifest: Manifest) -> list[str]:
    notes = [
        "Q/DQ graphs for TensorRT (explicit quantization; TensorRT 10 and 11 build them). Only Linear layers are "
        "quantized; see each graph's 'excluded' and 'kept_float_by_op_type' for what stays fp32 and why.",
        "metrics: ONNX Runtime on CPU, fp32 vs quantized graphs on held-out photos; FP8 graphs run there only "
        "with graph optimizations off (simulated): their latency says nothing about a GPU.",
    ]
    if manifest.source.get("random_weights"):
        notes.append(
            f"model {manifest.source.get('model')!r} has random weights (attention sharpened by "
            "export.synthetic.sharpen_attention so the [CLS] ranking is not flat): these metrics check the "
            "quantization pipeline, not a trained model's accuracy."
        )
    return notes


def _install(tmp: Path, out: Path, files: list[Path], record: dict, listed: set[str]) -> None:
    """Rename finished files into `out`, calibration.json last. Files they replace are first moved aside
    into `tmp`; if any step fails, the new files are removed and the old ones put back, so `out` holds
    either the previous state or the new one. Then calibration sets that the previous record `listed` and
    no entry refers to any more are deleted (never a file prunevlm did not write)."""
    check_terminated()  # a SIGTERM whose exception a finalizer swallowed: nothing is installed
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    aside = tmp / "replaced"
    aside.mkdir()
    moved: list[str] = []
    try:
        for path in [*files, tmp / RECORD_FILE]:
            if (out / path.name).exists():
                os.replace(out / path.name, aside / path.name)
            moved.append(path.name)
            os.replace(path, out / path.name)
    except BaseException:
        for name in reversed(moved):
            (out / name).unlink(missing_ok=True)
            if (aside / name).exists():
                os.replace(aside / name, out / name)
        raise
    used = {e["calibration_data"]["file"] for e in record.values() if isinstance(e, dict) and "calibration_data" in e}
    for stale in out.glob("calibration-*.npz"):
        if stale.name in listed and stale.name not in used:
            stale.unlink()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


