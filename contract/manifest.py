"""The export directory's contract: `manifest.json` and the tensor/graph specs inside it.

The exporter writes a `Manifest`; the runtime reads it back and never guesses anything else. Both halves
use these classes, so the schema is defined once. Plain JSON only (no pickles), so other tools can read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract import checks
from contract.errors import ManifestError
from contract.layouts import LAYOUTS, Layout, layout_from_dict, layout_to_dict
from contract.names import (
    ATTENTION_MASK,
    BATCH,
    CAPACITY,
    HIDDEN_STATES,
    IMAGE_EMBEDS,
    IMAGE_FEATURES,
    INPUTS_EMBEDS,
    KEEP_INDICES,
    KEEP_SLOTS,
    KEEP_VALID,
    LLM,
    LOGITS,
    PAST,
    PAST_KEY,
    PAST_VALUE,
    PIXEL_VALUES,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    PRUNE_LOGITS,
    SEQUENCE,
    TOTAL,
    WINDOW_LOGITS,
    WINDOW_VALID,
    llm_block,
)

FORMAT_VERSION = 5  # 3: modalities name their vision and projector graphs, typed layouts, `precision`;
# 4: `llm_pruning` (FEATHER / FastV decoder blocks and select graphs), `method.positions`;
# 5: `target`, `llm.kv_cache`, `llm.weights`
MANIFEST_FILE = "manifest.json"
TOOLKIT_VERSION = "0.1.0"

AXES = (BATCH, SEQUENCE, PAST, TOTAL, CAPACITY)  # re-exported: the graphs' named dynamic axes
# Which backends can run the export: "standard" (ONNX operators only: ONNX Runtime and TensorRT), or
# "onnxruntime" (the LLM graphs use ONNX Runtime's GroupQueryAttention: ONNX Runtime only).
TARGETS = ("standard", "onnxruntime")
# How the LLM graph keeps its KV cache: "concat" (past [B, Hkv, P, Dh] in, present [B, Hkv, P+S, Dh] out) or
# "buffer" (one preallocated [B, Hkv, capacity, Dh] buffer per tensor, bound as both past and present and
# written in place at positions P..P+S-1).
KV_CACHES = ("concat", "buffer")
LLM_WEIGHTS = ("float", "int4", "int8")  # the LLM graphs' linear weights: as `precision`, or blocked int4 / int8
# (weight-only; int8 is ONNX Runtime's MatMulNBits, --target onnxruntime only)
PRECISIONS = ("float32", "float16")  # the graphs' compute precision (inputs and outputs are float32 either way)
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32"}
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is ~10 KB (+ the chat template); read at most this much
METHODS = ("fastervlm", "none", "feather", "fastv")  # vision-side (fastervlm) or in-LLM (feather, fastv)
LLM_METHODS = ("feather", "fastv")
POSITIONS = ("packed", "original")  # visual tokens' RoPE positions: renumbered 0..K-1, or their unpruned ones


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES
    shape: tuple[int | str, ...]  # ints are static sizes, strings name a dynamic axis

    def __post_init__(self) -> None:
        checks.text(self.name, "tensor name")
        if not isinstance(self.dtype, str) or self.dtype not in NUMPY_DTYPES:
            raise ManifestError(f"tensor {self.name!r} has dtype {checks._short(self.dtype)}; expected one of "
                                f"{sorted(NUMPY_DTYPES)}: re-export")
        shape = checks.sequence(self.shape, f"shape of tensor {self.name!r}", 0, checks.MAX_RANK)
        for dim in shape:
            if isinstance(dim, str):
                if dim not in AXES:
                    raise ManifestError(f"tensor {self.name!r} has dynamic axis {checks._short(dim)}; expected one of "
                                        f"{list(AXES)}: re-export")
            else:
                checks.integer(dim, f"shape of tensor {self.name!r}", 1, checks.MAX_TENSOR_DIM)
        object.__setattr__(self, "shape", shape)


@dataclass(frozen=True)
class GraphSpec:
    file: str  # ONNX file name inside the export directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Bytes of the .onnx file and of its external data file: a cheap check for truncated copies.
    sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.relative_path(self.file, "graphs[*].file")
        for role, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            specs = checks.sequence(specs, f"{self.file} {role}", 1)
            if not all(isinstance(t, TensorSpec) for t in specs):
                raise ManifestError(f"{self.file} {role} must be tensor specs: re-export")
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ManifestError(f"{self.file} declares {role} with repeated names: re-export")
            object.__setattr__(self, role, specs)
        for name, size in checks.mapping(self.sizes, f"{self.file} sizes", 16).items():
            checks.relative_path(name, f"{self.file} sizes key")
            checks.integer(size, f"{self.file} sizes[{name!r}]", 0, 1 << 50)

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.file)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.file)


def _by_name(specs: tuple[TensorSpec, ...], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ManifestError(f"{where} has no tensor named {name!r}; it has {[s.name for s in specs]}")


@dataclass(frozen=True)
class LLMSpec:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_seq_len: int  # prompt + generated tokens the export promises to handle
    embeddings: str  # .npy file with the input embedding table [vocab, hidden], float32
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    # Tensor-name patterns of the KV cache, formatted with the layer index.
    past_key: str = PAST_KEY
    past_value: str = PAST_VALUE
    present_key: str = PRESENT_KEY
    present_value: str = PRESENT_VALUE
    kv_cache: str = "concat"  # a key of KV_CACHES
    weights: str = "float"  # a key of LLM_WEIGHTS

    def __post_init__(self) -> None:
        checks.choice(self.kv_cache, "llm.kv_cache", KV_CACHES)
        checks.choice(self.weights, "llm.weights", LLM_WEIGHTS)
        checks.integer(self.num_layers, "llm.num_layers", 1, checks.MAX_LAYERS)
        checks.integer(self.num_heads, "llm.num_heads", 1, checks.MAX_HEADS)
        checks.integer(self.num_kv_heads, "llm.num_kv_heads", 1, self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ManifestError(f"manifest field llm.num_kv_heads={self.num_kv_heads} does not divide "
                                f"llm.num_heads={self.num_heads}: re-export")
        checks.integer(self.head_dim, "llm.head_dim", 1, checks.MAX_WIDTH)
        checks.integer(self.hidden_size, "llm.hidden_size", 1, checks.MAX_WIDTH)
        checks.integer(self.vocab_size, "llm.vocab_size", 1, checks.MAX_VOCAB)
        checks.integer(self.max_seq_len, "llm.max_seq_len", 2, checks.MAX_SEQ_LEN)
        checks.relative_path(self.embeddings, "llm.embeddings")
        eos = checks.sequence(self.eos_token_ids, "llm.eos_token_ids", 1, 64)
        for token in eos:
            checks.integer(token, "llm.eos_token_ids[*]", 0, self.vocab_size - 1)
        object.__setattr__(self, "eos_token_ids", eos)
        checks.integer(self.pad_token_id, "llm.pad_token_id", 0, self.vocab_size - 1)
        for name in ("past_key", "past_value", "present_key", "present_value"):
            checks.pattern(getattr(self, name), f"llm.{name}")

    def cache_names(self, layers: range | None = None) -> tuple[list[str], list[str]]:
        """(past input names, present output names) of `layers` (default: every layer), keys and values interleaved."""
        layers = range(self.num_layers) if layers is None else layers
        past = [p.format(i) for i in layers for p in (self.past_key, self.past_value)]
        present = [p.format(i) for i in layers for p in (self.present_key, self.present_value)]
        return past, present


@dataclass(frozen=True)
class PromptSpec:
    tokenizer: str  # tokenizer.json inside the export directory
    chat_template: str  # the checkpoint's Jinja chat template
    # Template variables apply_chat_template passes: the tokenizer's special tokens (bos_token, ...).
    special_tokens: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.relative_path(self.tokenizer, "prompt.tokenizer")
        checks.text(self.chat_template, "prompt.chat_template", checks.MAX_TEMPLATE)
        for key, value in checks.mapping(self.special_tokens, "prompt.special_tokens", 64).items():
            if not isinstance(key, str) or not key.isidentifier() or key in _TEMPLATE_ARGUMENTS:
                raise ManifestError(f"manifest field prompt.special_tokens has key {checks._short(key)}; keys must "
                                    f"be template variable names other than {sorted(_TEMPLATE_ARGUMENTS)}: re-export")
            checks.text(value, f"prompt.special_tokens[{key!r}]", empty=True)


_TEMPLATE_ARGUMENTS = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


@dataclass(frozen=True)
class ModalitySpec:
    """How one kind of visual input (an image, a video) becomes LLM tokens.

    The item is cut into sub-images (tiles or frames) by its layout, each sub-image preprocessed with
    `preprocess` and encoded by the vision graph `vision`; the projector graph `projector` maps each
    sub-image's kept tokens; the layout orders them and the runtime splices them where the template wrote
    `placeholder`. Both graphs see `layout.sub_images` sub-images per item.
    """

    placeholder: str  # token the chat template writes where the item goes ("<image>")
    placeholder_id: int
    content_type: str  # the chat template's content block type ("image", "video")
    vision: str  # key in Manifest.graphs of this modality's vision graph
    projector: str  # key in Manifest.graphs of this modality's projector graph
    preprocess: dict  # see runtime.preprocess.preprocess: applied to each sub-image
    layout: Layout  # contract.layouts

    def __post_init__(self) -> None:
        checks.text(self.placeholder, "modalities[*].placeholder")
        checks.integer(self.placeholder_id, "modalities[*].placeholder_id", 0, checks.MAX_VOCAB)
        checks.text(self.content_type, "modalities[*].content_type")
        checks.text(self.vision, "modalities[*].vision")
        checks.text(self.projector, "modalities[*].projector")
        _check_preprocess(checks.mapping(self.preprocess, "modalities[*].preprocess", 32))
        if not isinstance(self.layout, tuple(LAYOUTS.values())):
            raise ManifestError(f"modality {self.content_type!r} has layout {checks._short(self.layout)}: re-export")
        for side in (*getattr(self.layout, "resolution", ()), *(v for p in getattr(self.layout, "grid_pinpoints", ())
                                                               for v in p)):
            checks.integer(side, "layout resolution", 1, checks.MAX_LAYOUT_SIDE)
        if hasattr(self.layout, "tile"):
            checks.integer(self.layout.tile, "layout tile", 1, checks.MAX_IMAGE_SIDE)
        if hasattr(self.layout, "newline"):
            checks.relative_path(self.layout.newline, "layout newline")

    @property
    def graphs(self) -> tuple[str, str]:
        return self.vision, self.projector




def _check_preprocess(spec: dict) -> None:
    """Values of a preprocessing spec (runtime.preprocess.check_spec checks its keys): switches are booleans,
    sizes are bounded (an image is resized to them), mean/std have 3 finite values and std none zero."""
    for key, value in spec.items():
        if key.startswith("do_"):
            checks.boolean(value, f"preprocess.{key}")
    sized = [("size", spec.get("do_resize")), ("crop_size", spec.get("do_center_crop"))]
    for key, used in sized:
        if used:
            for name, side in checks.mapping(spec.get(key), f"preprocess.{key}", 2).items():
                checks.integer(side, f"preprocess.{key}.{name}", 1, checks.MAX_IMAGE_SIDE)
    if spec.get("do_resize"):
        checks.integer(spec.get("resample"), "preprocess.resample", 0, 5)
    if spec.get("do_rescale"):
        checks.number(spec.get("rescale_factor"), "preprocess.rescale_factor", positive=True)
    if spec.get("do_normalize"):
        for key in ("image_mean", "image_std"):
            values = checks.sequence(spec.get(key), f"preprocess.{key}", 3, 3)
            for v in values:
                checks.number(v, f"preprocess.{key}[*]", positive=(key == "image_std"))


@dataclass(frozen=True)
class MethodSpec:
    name: str  # "fastervlm" ([CLS] attention in the vision encoder) or "none" (keep == num_patches)
    keep: int  # visual tokens handed to the LLM per image
    num_patches: int  # patch tokens the vision encoder produces per image
    grid: tuple[int, int]  # patch grid (rows, cols), raster order
    feature_layer: int  # vision_feature_layer as HF counts it (hidden_states index)
    score_layer: int  # 0-based encoder layer whose [CLS] attention row ranks the patches
    # "packed": kept visual tokens take consecutive positions (FasterVLM's paper); "original": each keeps the
    # position it has in the unpruned sequence and the text after the item continues from the unpruned length.
    positions: str = "packed"

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ManifestError(f"manifest field method.name={checks._short(self.name)} must be one of {METHODS}: re-export")
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise ManifestError(f"manifest field method.positions={checks._short(self.positions)} must be one of "
                                f"{POSITIONS}: re-export")
        checks.integer(self.num_patches, "method.num_patches", 1, 1 << 16)
        checks.integer(self.keep, "method.keep", 1, self.num_patches)
        grid = checks.sequence(self.grid, "method.grid", 2, 2)
        for side in grid:
            checks.integer(side, "method.grid[*]", 1, 1 << 16)
        object.__setattr__(self, "grid", grid)
        checks.integer(self.feature_layer, "method.feature_layer", -1024, 1024)
        checks.integer(self.score_layer, "method.score_layer", 0, 1024)


@dataclass(frozen=True)
class PruningSpec:
    """In-LLM pruning (FEATHER, FastV): the decoder split into blocks at the prune layers, one select graph
    per modality and stage. Block i runs layers [bounds[i], bounds[i+1]) with bounds = (0, *layers, L) as
    graph `names.llm_block(i)`; every block but the last ends at a prune point (outputs hidden_states and
    prune_logits); the last outputs logits."""

    method: str  # a key of LLM_METHODS
    layers: tuple[int, ...]  # K per stage: the first layer that sees fewer tokens, strictly increasing
    reduction: float  # R in (0, 1): stage s keeps int(n (1 - R)^s) tokens by score (FastV: s = 1 only)
    stride: int  # stage 1's uniform grid[::stride, ::stride] per sub-image (FEATHER); 0: no grid (FastV)
    rope: bool  # the score's q and k carry RoPE (FastV) or not (FEATHER)
    select: dict[str, tuple[str, ...]]  # modality -> its select graph key per stage

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in LLM_METHODS:
            raise ManifestError(f"manifest field llm_pruning.method={checks._short(self.method)} must be one of "
                                f"{LLM_METHODS}: re-export")
        layers = checks.sequence(self.layers, "llm_pruning.layers", 1, 16)
        for k in layers:
            checks.integer(k, "llm_pruning.layers[*]", 1, checks.MAX_LAYERS)
        if list(layers) != sorted(set(layers)):
            raise ManifestError(f"manifest field llm_pruning.layers={list(layers)} must be strictly increasing: re-export")
        object.__setattr__(self, "layers", layers)
        checks.number(self.reduction, "llm_pruning.reduction", positive=True)
        if not self.reduction < 1:
            raise ManifestError(f"manifest field llm_pruning.reduction={self.reduction} must be in (0, 1): re-export")
        checks.integer(self.stride, "llm_pruning.stride", 0, 1 << 16)
        checks.boolean(self.rope, "llm_pruning.rope")
        select = {}
        for modality, keys in checks.mapping(self.select, "llm_pruning.select", 8).items():
            keys = checks.sequence(keys, f"llm_pruning.select[{modality!r}]", len(layers), len(layers))
            select[checks.text(modality, "llm_pruning.select key")] = tuple(checks.text(k, "select graph") for k in keys)
        object.__setattr__(self, "select", select)

    def bounds(self, num_layers: int) -> tuple[int, ...]:
        return (0, *self.layers, num_layers)


@dataclass(frozen=True)
class Manifest:
    family: str
    method: MethodSpec
    modalities: dict[str, ModalitySpec]  # "image", and "video" for video models
    prompt: PromptSpec
    llm: LLMSpec
    graphs: dict[str, GraphSpec]  # vision graph(s), projector graph(s), "llm"
    source: dict  # where the weights came from and the library versions that exported them
    precision: str = "float32"  # a key of PRECISIONS: what the graphs compute in
    format_version: int = FORMAT_VERSION
    toolkit_version: str = TOOLKIT_VERSION
    # Every file of the export but the manifest -> {"bytes": n, "sha256": hex}: `Pipeline.load(verify=True)`.
    files: dict[str, dict] = field(default_factory=dict)
    llm_pruning: PruningSpec | None = None  # FEATHER / FastV: the LLM as blocks; None: one "llm" graph
    target: str = "standard"  # a key of TARGETS: which backends can run the graphs

    def __post_init__(self) -> None:
        checks.choice(self.target, "target", TARGETS)
        checks.choice(self.precision, "precision", PRECISIONS)
        checks.text(self.family, "family")
        checks.text(self.toolkit_version, "toolkit_version")
        checks.mapping(self.source, "source", 64)
        for role, value, kind in (("method", self.method, MethodSpec), ("prompt", self.prompt, PromptSpec),
                                  ("llm", self.llm, LLMSpec)):
            if not isinstance(value, kind):
                raise ManifestError(f"manifest field {role} is malformed: re-export")
        if self.llm.kv_cache == "buffer" and self.target != "onnxruntime":
            raise ManifestError(f"manifest field llm.kv_cache=buffer needs target onnxruntime (its attention "
                                f"operator), the manifest says {self.target!r}: re-export")
        if not checks.mapping(self.graphs, "graphs", 64) or not all(isinstance(g, GraphSpec) for g in self.graphs.values()):
            raise ManifestError("manifest field graphs must list the export's graphs: re-export")
        if not checks.mapping(self.modalities, "modalities", 8) or not all(
                isinstance(m, ModalitySpec) for m in self.modalities.values()):
            raise ManifestError("manifest field modalities must describe at least one modality: re-export")
        for name, modality in self.modalities.items():
            for graph in modality.graphs:
                if graph not in self.graphs:
                    raise ManifestError(f"modality {name!r} names graph {graph!r}, which the manifest does not list")
            checks.integer(modality.placeholder_id, f"modalities[{name!r}].placeholder_id", 0, self.llm.vocab_size - 1)
            _check_names(self.graphs[modality.vision], {PIXEL_VALUES}, {IMAGE_FEATURES, KEEP_INDICES})
            _check_names(self.graphs[modality.projector], {IMAGE_FEATURES, KEEP_INDICES}, {IMAGE_EMBEDS})
        if self.llm_pruning is not None:
            pruning = self.llm_pruning
            if not isinstance(pruning, PruningSpec):
                raise ManifestError("manifest field llm_pruning is malformed: re-export")
            if pruning.layers[-1] >= self.llm.num_layers:
                raise ManifestError(f"manifest field llm_pruning.layers={list(pruning.layers)} must be within "
                                    f"1..{self.llm.num_layers - 1}: re-export")
            if set(pruning.select) != set(self.modalities):
                raise ManifestError(f"manifest field llm_pruning.select names {sorted(pruning.select)}, the "
                                    f"modalities are {sorted(self.modalities)}: re-export")
            for keys in pruning.select.values():
                for key in keys:
                    if key not in self.graphs:
                        raise ManifestError(f"llm_pruning names graph {key!r}, which the manifest does not list")
                    _check_names(self.graphs[key], {WINDOW_LOGITS, WINDOW_VALID}, {KEEP_SLOTS, KEEP_VALID})
        for key, layers in self.blocks():
            if key not in self.graphs:
                raise ManifestError(f"manifest has no {key!r} graph (it lists {sorted(self.graphs)[:8]}): re-export")
            past, present = self.llm.cache_names(layers)
            last = layers.stop == self.llm.num_layers
            _check_names(self.graphs[key], {INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, *past},
                         {LOGITS, *present} if last else {HIDDEN_STATES, PRUNE_LOGITS, *present},
                         f" (llm.num_layers={self.llm.num_layers}, past_key={self.llm.past_key!r})")
        for name, record in checks.mapping(self.files, "files", checks.MAX_ENTRIES).items():
            checks.relative_path(name, "files key")
            if not isinstance(record, dict) or set(record) != {"bytes", "sha256"}:
                raise ManifestError(f"manifest field files[{name!r}] must be {{bytes, sha256}}: re-export")
            checks.integer(record["bytes"], f"files[{name!r}].bytes", 0, 1 << 50)
            checks.sha256(record["sha256"], f"files[{name!r}].sha256")

    def blocks(self) -> list[tuple[str, range]]:
        """(graph key, decoder layers) of each LLM graph in the order they run: [("llm", 0..L-1)] unless the
        export prunes inside the LLM."""
        if self.llm_pruning is None:
            return [(LLM, range(self.llm.num_layers))]
        bounds = self.llm_pruning.bounds(self.llm.num_layers)
        return [(llm_block(i), range(a, b)) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def paths(self) -> dict[str, str]:
        """Every file name the manifest mentions -> the field that names it."""
        named = {self.llm.embeddings: "llm.embeddings", self.prompt.tokenizer: "prompt.tokenizer"}
        for key, graph in self.graphs.items():
            named[graph.file] = f"graphs[{key!r}].file"
            named.update({name: f"graphs[{key!r}].sizes" for name in graph.sizes})
        for key, modality in self.modalities.items():
            if hasattr(modality.layout, "newline"):
                named[modality.layout.newline] = f"modalities[{key!r}].layout.newline"
        named.update({name: "files" for name in self.files})
        return named

    def to_dict(self) -> dict:
        data = asdict(self)
        for name, modality in self.modalities.items():
            data["modalities"][name]["layout"] = layout_to_dict(modality.layout)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def sub_images(self) -> dict[str, int]:
        """Graph name -> the most sub-images one item sends through it (1 for graphs no modality uses)."""
        counts = {name: 1 for name in self.graphs}
        for modality in self.modalities.values():
            for graph in modality.graphs:
                counts[graph] = max(counts[graph], modality.layout.sub_images)
        return counts

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_FILE).write_text(self.to_json() + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        """Read and check DIR/manifest.json: at most MAX_MANIFEST_BYTES, every field's type and range, every
        path it names inside DIR (symlinks resolved). Whether the files exist is the reader's business."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            problem = "is not a directory" if directory.exists() else "does not exist"
            raise ManifestError(f"export directory {str(directory)!r} {problem}")
        if not path.is_file():
            raise ManifestError(f"{path} is missing: {str(directory)!r} is not an export directory")
        checks.inside(directory, MANIFEST_FILE, "the manifest")
        try:
            with open(path, "rb") as file:
                raw = file.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; a manifest is a few KB: "
                                    "not an export's manifest, re-export")
            data = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ManifestError(f"{path} is not valid JSON ({reason}): re-export") from None
        manifest = cls.from_dict(data, where=str(path))
        for name, field_name in manifest.paths().items():
            checks.inside(directory, name, field_name)
        return manifest

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_FILE) -> "Manifest":
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            made_by = data.get("toolkit_version", "unknown") if isinstance(data, dict) else "unknown"
            raise ManifestError(
                f"{where} has format_version {version!r} (written by prunevlm {made_by}); this runtime "
                f"({TOOLKIT_VERSION}) reads format_version {FORMAT_VERSION}: re-export the model"
            )
        try:
            graphs = {
                checks.text(name, "graphs key"): GraphSpec(
                    file=g["file"],
                    inputs=tuple(TensorSpec(**t) for t in checks.sequence(g["inputs"], "graph inputs")),
                    outputs=tuple(TensorSpec(**t) for t in checks.sequence(g["outputs"], "graph outputs")),
                    sizes=dict(g.get("sizes", {})),
                )
                for name, g in checks.mapping(data["graphs"], "graphs", 64).items()
            }
            method = dict(data["method"])
            method["grid"] = tuple(method["grid"])
            llm = dict(data["llm"])
            llm["eos_token_ids"] = tuple(llm["eos_token_ids"])
            pruning = data.get("llm_pruning")
            if pruning is not None:
                pruning = dict(pruning)
                pruning["layers"] = tuple(pruning["layers"])
                pruning["select"] = {k: tuple(v) for k, v in checks.mapping(pruning["select"], "llm_pruning.select", 8).items()}
                pruning = PruningSpec(**pruning)
            return cls(
                family=data["family"],
                method=MethodSpec(**method),
                modalities={checks.text(name, "modalities key"): ModalitySpec(**{**m, "layout": layout_from_dict(m["layout"])})
                            for name, m in checks.mapping(data["modalities"], "modalities", 8).items()},
                prompt=PromptSpec(**data["prompt"]),
                llm=LLMSpec(**llm),
                graphs=graphs,
                source=dict(data["source"]),
                precision=data["precision"],
                format_version=data["format_version"],
                toolkit_version=data["toolkit_version"],
                files=dict(data.get("files", {})),
                llm_pruning=pruning,
                target=data["target"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise ManifestError(f"{where} is incomplete or malformed ({type(exc).__name__}: {reason}): re-export") from None


def _check_names(spec: GraphSpec, inputs: set[str], outputs: set[str], why: str = "") -> None:
    """The graph declares exactly `inputs` and at least `outputs` (the runtime feeds and reads these)."""
    declared = {t.name for t in spec.inputs}
    if declared != inputs:
        missing, extra = sorted(inputs - declared)[:4], sorted(declared - inputs)[:4]
        raise ManifestError(f"{spec.file} declares inputs missing {missing} and unexpected {extra}{why}: re-export")
    missing = sorted(outputs - {t.name for t in spec.outputs})[:4]
    if missing:
        raise ManifestError(f"{spec.file} declares no outputs {missing}{why}: re-export")


def check_files(directory: Path, spec: GraphSpec) -> None:
    """The graph file and its external data exist inside `directory` and have the sizes the exporter recorded."""
    for name, expected in spec.sizes.items():
        path = checks.inside(Path(directory), name, f"sizes of {spec.file}")
        if not path.is_file():
            raise ManifestError(f"{path} is missing: the export directory is incomplete, re-export it")
        actual = path.stat().st_size
        if actual != expected:
            raise ManifestError(
                f"{path} has {actual} bytes, the manifest says {expected}: the file is truncated or "
                "replaced, re-export it"
            )


def file_record(path: Path) -> dict:
    """{"bytes": n, "sha256": hex} of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def record_files(directory: Path) -> dict[str, dict]:
    """`Manifest.files` of an export directory being written: every regular file but the manifest."""
    return {str(p.relative_to(directory)): file_record(p) for p in sorted(Path(directory).rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST_FILE}


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every file the exporter recorded has its recorded size and sha256 (a same-size corrupt file is caught)."""
    if not manifest.files:
        raise ManifestError(f"{Path(directory) / MANIFEST_FILE} records no file checksums (written before they were "
                            "recorded): re-export to verify it")
    for name, record in manifest.files.items():
        path = checks.inside(Path(directory), name, "files")
        if not path.is_file():
            raise ManifestError(f"{path} is missing: the export directory is incomplete, re-export it")
        actual = file_record(path)
        if actual["bytes"] != record["bytes"]:
            raise ManifestError(f"{path} has {actual['bytes']} bytes, the manifest says {record['bytes']}: the file "
                                "is truncated or replaced, re-export it")
        if actual["sha256"] != record["sha256"]:
            raise ManifestError(f"{path} has sha256 {actual['sha256'][:16]}..., the manifest says "
                                f"{record['sha256'][:16]}...: the file is corrupt or replaced, re-export it")
