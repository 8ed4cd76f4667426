"""The export directory's contract: `manifest.json` and the tensor/graph specs inside it.

The exporter writes a `Manifest`; the runtime reads it back and never guesses anything else. Both halves
use these classes, so the schema is defined once. Plain JSON only (no pickles), so other tools can read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from contract.errors import ManifestError
from contract.layouts import Layout, layout_from_dict, layout_to_dict
from contract.names import BATCH, PAST, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, SEQUENCE, TOTAL

FORMAT_VERSION = 3  # 3: modalities name their vision and projector graphs, typed layouts, `precision`
MANIFEST_FILE = "manifest.json"
TOOLKIT_VERSION = "0.1.0"

AXES = (BATCH, SEQUENCE, PAST, TOTAL)  # re-exported: the graphs' named dynamic axes
PRECISIONS = ("float32", "float16")  # the graphs' compute precision (inputs and outputs are float32 either way)
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES
    shape: tuple[int | str, ...]  # ints are static sizes, strings name a dynamic axis

    def __post_init__(self) -> None:
        if self.dtype not in NUMPY_DTYPES:
            raise ManifestError(f"tensor {self.name!r} has dtype {self.dtype!r}; expected one of {sorted(NUMPY_DTYPES)}")
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass(frozen=True)
class GraphSpec:
    file: str  # ONNX file name inside the export directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Bytes of the .onnx file and of its external data file: a cheap check for truncated copies.
    sizes: dict[str, int] = field(default_factory=dict)

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


@dataclass(frozen=True)
class PromptSpec:
    tokenizer: str  # tokenizer.json inside the export directory
    chat_template: str  # the checkpoint's Jinja chat template
    # Template variables apply_chat_template passes: the tokenizer's special tokens (bos_token, ...).
    special_tokens: dict = field(default_factory=dict)


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

    @property
    def graphs(self) -> tuple[str, str]:
        return self.vision, self.projector


@dataclass(frozen=True)
class MethodSpec:
    name: str  # "fastervlm" ([CLS] attention in the vision encoder) or "none" (keep == num_patches)
    keep: int  # visual tokens handed to the LLM per image
    num_patches: int  # patch tokens the vision encoder produces per image
    grid: tuple[int, int]  # patch grid (rows, cols), raster order
    feature_layer: int  # vision_feature_layer as HF counts it (hidden_states index)
    score_layer: int  # 0-based encoder layer whose [CLS] attention row ranks the patches


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

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ManifestError(f"precision {self.precision!r} is unknown; expected one of {PRECISIONS}")
        for name, modality in self.modalities.items():
            for graph in modality.graphs:
                if graph not in self.graphs:
                    raise ManifestError(f"modality {name!r} names graph {graph!r}, which the manifest does not list")

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
        path = Path(directory) / MANIFEST_FILE
        if not Path(directory).is_dir():
            problem = "is not a directory" if Path(directory).exists() else "does not exist"
            raise ManifestError(f"export directory {str(directory)!r} {problem}")
        if not path.is_file():
            raise ManifestError(f"{path} is missing: {str(directory)!r} is not an export directory")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_dict(data, where=str(path))

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
                name: GraphSpec(
                    file=g["file"],
                    inputs=tuple(TensorSpec(**t) for t in g["inputs"]),
                    outputs=tuple(TensorSpec(**t) for t in g["outputs"]),
                    sizes=dict(g.get("sizes", {})),
                )
                for name, g in data["graphs"].items()
            }
            method = dict(data["method"])
            method["grid"] = tuple(method["grid"])
            llm = dict(data["llm"])
            llm["eos_token_ids"] = tuple(llm["eos_token_ids"])
            return cls(
                family=data["family"],
                method=MethodSpec(**method),
                modalities={name: ModalitySpec(**{**m, "layout": layout_from_dict(m["layout"])})
                            for name, m in data["modalities"].items()},
                prompt=PromptSpec(**data["prompt"]),
                llm=LLMSpec(**llm),
                graphs=graphs,
                source=dict(data["source"]),
                precision=data["precision"],
                format_version=data["format_version"],
                toolkit_version=data["toolkit_version"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where} is incomplete or malformed ({type(exc).__name__}: {exc})") from None


def check_files(directory: Path, spec: GraphSpec) -> None:
    """The graph file and its external data exist and have the sizes the exporter recorded."""
    for name, expected in spec.sizes.items():
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing: the export directory is incomplete, re-export it")
        actual = path.stat().st_size
        if actual != expected:
            raise ManifestError(
                f"{path} has {actual} bytes, the manifest says {expected}: the file is truncated or "
                "replaced, re-export it"
            )
