"""The export directory's contract: `manifest.json` and the tensor/graph specs inside it.

The exporter writes a `Manifest`; the runtime reads it back and never guesses anything else. Both halves
use these classes, so the schema is defined once. Plain JSON only (no pickles), so other tools can read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.errors import ManifestError

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
TOOLKIT_VERSION = "0.1.0"

# Dynamic axis names used in the graphs' specs (a shape entry is an int when static, a name when dynamic).
BATCH = "batch"
SEQUENCE = "sequence"  # new tokens fed to the LLM in one call (prompt length at prefill, 1 when decoding)
PAST = "past_sequence"  # tokens already in the KV cache
TOTAL = "total_sequence"  # PAST + SEQUENCE: the attention mask's length

# KV-cache tensor names of the LLM graph, formatted with the layer index.
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"

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
    `preprocess` and encoded by the vision graph `graph`; the projector graph maps each sub-image's kept
    tokens; the layout orders them and the runtime splices them where the template wrote `placeholder`.
    """

    placeholder: str  # token the chat template writes where the item goes ("<image>")
    placeholder_id: int
    content_type: str  # the chat template's content block type ("image", "video")
    graph: str  # key in Manifest.graphs of the vision graph for this modality
    preprocess: dict  # see runtime.preprocess.preprocess: applied to each sub-image
    layout: dict  # {"name": ..., ...}: see runtime.layout
    projector: str = "projector"  # key in Manifest.graphs of the projector graph for this modality


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
    graphs: dict[str, GraphSpec]  # vision graph(s), "projector", "llm"
    source: dict  # where the weights came from and the library versions that exported them
    format_version: int = FORMAT_VERSION
    toolkit_version: str = TOOLKIT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

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
                modalities={name: ModalitySpec(**m) for name, m in data["modalities"].items()},
                prompt=PromptSpec(**data["prompt"]),
                llm=LLMSpec(**llm),
                graphs=graphs,
                source=dict(data["source"]),
                format_version=data["format_version"],
                toolkit_version=data["toolkit_version"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is incomplete or malformed ({type(exc).__name__}: {exc})") from None
