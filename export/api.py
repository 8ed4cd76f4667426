"""`run(options)`: checkpoint -> export directory (graphs, embeddings, tokenizer, manifest), atomically."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

from contract import compare, files, names
from contract.errors import ExportError
from contract.layouts import token_sources, uniform_grid
from contract.manifest import LLMSpec, Manifest, PromptSpec, PruningSpec, record_files
from contract.progress import Progress
from export import checkpoints, llm, onnx_io
from export.families import FAMILIES
from export.spec import ExportOptions

TOKENIZER_FILE = "tokenizer.json"
EMBEDDINGS_FILE = "embed_tokens.npy"


def run(options: ExportOptions, progress: Progress | None = None) -> Path:
    """Export `options.family` with its pruning method (FasterVLM at `options.keep`, or FEATHER / FastV inside
    the LLM); returns the export directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is loading
    progress = progress or Progress()
    if options.family not in FAMILIES:
        raise ExportError(f"unknown family {options.family!r}; choose one of {sorted(FAMILIES)}")
    family = FAMILIES[options.family]
    model_name = options.model or family.DEFAULT_MODEL
    # Everything the user chose is checked before the first progress line: bad input gets one line, the error.
    path = checkpoints.for_family(family, model_name, step=progress.step)
    config = family.read_config(path)
    pruning = None
    if options.in_llm:  # the vision side keeps every patch; the LLM prunes
        patches = family.method_spec(config, 1).num_patches
        method = dataclasses.replace(family.method_spec(config, patches), name=options.method, positions="original")
        pruning = options.llm_pruning(config.get_text_config().num_hidden_layers)
        stride, grid = pruning[2], method.grid
        if stride > min(grid):
            raise ExportError(f"--grid-stride {stride} is larger than the {grid[0]}x{grid[1]} patch grid; use 1..{min(grid)}")
        _check_stages(method, *pruning)
        layout = options.layout or next(name for name, spec in family.LAYOUTS.items() if not spec.unpruned_only)
        if family.LAYOUTS[layout].unpruned_only:
            others = [name for name, spec in family.LAYOUTS.items() if not spec.unpruned_only]
            raise ExportError(f"--layout {layout} has no fixed token window (unpadding, newline tokens) for --method "
                              f"{options.method}; use --layout {' / '.join(others)}")
    else:
        method = dataclasses.replace(family.method_spec(config, options.keep), positions=options.positions or "packed")
        if method.positions == "original" and method.keep == method.num_patches:
            raise ExportError(f"--positions original with --keep {method.keep} (every patch): without pruning the "
                              "original positions are the packed ones; drop --positions")
        layout = options.layout or family.default_layout(method.keep, method.num_patches)
    if layout not in family.LAYOUTS:
        raise ExportError(f"--layout {layout!r} is not one of {family.NAME}'s layouts: {', '.join(family.LAYOUTS)}")
    if method.positions == "original" and family.LAYOUTS[layout].unpruned_only:
        raise ExportError(f"--positions original needs a layout with a fixed token window; --layout {layout} has none")
    if family.LAYOUTS[layout].unpruned_only and method.keep != method.num_patches:
        others = [name for name, spec in family.LAYOUTS.items() if not spec.unpruned_only]
        raise ExportError(
            f"--layout {layout} places every patch and works without pruning only: use --keep {method.num_patches}, "
            f"or --layout {' / '.join(others)} to prune"
        )
    # --out is checked and locked before any work, and stays locked until the export is renamed into place:
    # --force replaces only an export, and of two exports to one --out started together one is refused.
    out = options.out_dir()
    with files.replacing(out, options.force, ExportError) as tmp:
        with progress.step(f"loading {path}"):
            model, processor = family.load(path)
        _write(tmp, family, model, processor, method, layout, options, model_name, progress, pruning)
    progress.say(f"wrote {out}")
    return out


def _write(directory: Path, family, model, processor, method, layout: str, options: ExportOptions,
           model_name: str, progress: Progress, pruning: tuple | None) -> None:
    import torch
    import transformers

    specs = {}
    all_checks = []
    text_decoder, lm_head = family.decoder(model)
    modalities = family.modalities(model, processor, method, directory, layout)
    exports = family.graphs(model, method)
    llm_pruning = None
    text_config = model.config.get_text_config()
    max_seq_len = options.max_seq_len or text_config.max_position_embeddings
    if pruning is not None:
        exports = [g for g in exports if g.name != names.LLM]
        new_exports, llm_pruning = _llm_pruning(text_decoder, lm_head, method, modalities, *pruning, options.kv_cache,
                                                max_seq_len)
        exports += new_exports
    elif options.kv_cache != "concat":  # the family's LLM graph, with the KV cache the target asks for
        spec, _ = llm.llm_spec(text_decoder, lm_head, "llm.onnx", kv_cache=options.kv_cache)
        exports = [llm.graph_export(text_decoder, lm_head, spec, kv_cache=options.kv_cache, max_positions=max_seq_len)
                   if g.name == names.LLM
                   else g for g in exports]
    for graph in exports:  # opset 23+: the checkpoint's SDPA becomes ONNX's fused Attention; before, grouped
        if isinstance(graph.module, llm.DecoderGraph):
            graph.module.grouped = options.opset < llm.FUSED_ATTENTION_OPSET
    for graph in exports:
        with progress.step(f"exporting {graph.name} graph"):
            specs[graph.name] = onnx_io.export_graph(graph, directory, options.opset)
        if options.validate:
            with progress.step(f"validating {graph.name} graph against PyTorch"):
                checks = onnx_io.validate(graph, directory, specs[graph.name])
            all_checks += checks
    if options.validate:
        print(compare.table(all_checks, "max |onnx-torch|"), file=progress.stream, flush=True)
        failed = [c for c in all_checks if not c.ok]
        if failed:
            c = failed[0]
            raise ExportError(
                f"validation failed: {c.graph} output {c.output!r} differs from PyTorch by {c.value:.3g} "
                f"({c.limit}) on input {c.case}; nothing was written"
            )
    if options.dtype == "float16":  # the validated fp32 graphs -> fp16 with fp32 islands, validated again
        from export import precision

        specs = precision.run(directory, exports, specs, options.validate, progress)
    if options.llm_weights != "float":
        from export import weights

        llm_graphs = [g.name for g in exports if isinstance(g.module, llm.DecoderGraph)]
        specs = weights.quantize(directory, specs, llm_graphs, options.llm_weights, progress)

    _, dims = llm.llm_spec(text_decoder, lm_head, "llm.onnx")
    np.save(directory / EMBEDDINGS_FILE, text_decoder.embed_tokens.weight.detach().float().numpy())
    prompt = _save_tokenizer(processor, directory)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = text_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos_ids[0]
    manifest = Manifest(
        family=family.NAME,
        method=method,
        modalities=modalities,
        prompt=prompt,
        llm=LLMSpec(**dims, max_seq_len=max_seq_len, embeddings=EMBEDDINGS_FILE, eos_token_ids=eos_ids,
                    pad_token_id=int(pad), kv_cache=options.kv_cache, weights=options.llm_weights),
        graphs=specs,
        precision=options.dtype,
        source={
            "model": model_name,
            "random_weights": checkpoints.has_random_weights(model.config),
            "opset": options.opset,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        files=record_files(directory),  # last: the arguments above (modalities) may write files
        llm_pruning=llm_pruning,
        target=options.target,
    )
    manifest.write(directory)


def _check_stages(method, layers: tuple[int, ...], reduction: float, stride: int) -> None:
    """Every stage keeps a token of the smallest window an item can have (one sub-image): checked before
    anything loads. Larger windows (tiles, frames) keep at least as many at every stage."""
    from export import feather

    window, grid = method.num_patches, len(range(0, method.grid[0], stride or 1)) * len(range(0, method.grid[1], stride or 1))
    for stage, layer in enumerate(layers, 1):
        try:
            window = feather.StageSelect(window, reduction, stage, range(grid) if stage == 1 and stride else ()).slots
        except ExportError:
            raise ExportError(f"--reduction {reduction}: the prune point at layer {layer} keeps no token of {window}; "
                              "choose a smaller --reduction or fewer --prune-layers") from None


def _llm_pruning(decoder, lm_head, method, modalities: dict, layers: tuple[int, ...], reduction: float,
                 stride: int, kv_cache: str, max_positions: int) -> tuple[list, PruningSpec]:
    """FEATHER / FastV: the decoder blocks between the prune layers, and per modality one select graph per
    stage. Stage s of FEATHER keeps int(n (1-R)^s) by score of the n tokens left (stage 1 also the uniform
    grid of every sub-image); FastV's single stage keeps int(n (1-R))."""
    from export import feather

    rope = method.name == "fastv"
    exports = llm.block_exports(decoder, lm_head, (0, *layers, len(decoder.layers)), rope, kv_cache, max_positions)
    heads = decoder.config.num_attention_heads
    select = {}
    for modality, spec in modalities.items():
        window = len(token_sources(spec.layout, method.grid))
        grid = uniform_grid(spec.layout, method.grid, stride) if stride else ()
        keys = []
        for stage in range(1, len(layers) + 1):
            key = names.select_graph(modality, stage)
            try:
                graph, chosen = feather.select_export(key, heads, window, reduction, stage, grid if stage == 1 else ())
            except ExportError as exc:
                raise ExportError(f"{exc}: choose a smaller --reduction or fewer --prune-layers") from None
            exports.append(graph)
            keys.append(key)
            window = chosen.slots
        select[modality] = tuple(keys)
    return exports, PruningSpec(method.name, tuple(layers), reduction, stride, rope, select)


def _save_tokenizer(processor, directory: Path) -> PromptSpec:
    tokenizer = processor.tokenizer
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        source = Path(scratch) / TOKENIZER_FILE
        if not source.is_file():
            raise ExportError(f"tokenizer {type(tokenizer).__name__} has no fast-tokenizer file {TOKENIZER_FILE}")
        shutil.copyfile(source, directory / TOKENIZER_FILE)
    template = processor.chat_template or tokenizer.chat_template
    if not template:
        raise ExportError("the checkpoint's processor has no chat template; the runtime needs one to build prompts")
    return PromptSpec(
        tokenizer=TOKENIZER_FILE,
        chat_template=template,
        special_tokens={k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )

