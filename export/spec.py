"""Export configuration. The CLI flags map one to one onto `ExportOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import ExportError
from contract.manifest import LLM_WEIGHTS, TARGETS

OPSETS = range(17, 24)  # 17-20 suit TensorRT's parsers; 23 adds fused Attention/RMSNorm ops for ORT


# In-LLM methods' published settings (METHODS.md): prune layers for a 32-layer LLM, R, grid stride.
FEATHER_DEFAULTS = dict(prune_layers=(8, 16), reduction=0.7, grid_stride=3)
FASTV_DEFAULTS = dict(prune_layers=(3,), reduction=0.75, grid_stride=None)
METHOD_DEFAULTS = {"feather": FEATHER_DEFAULTS, "fastv": FASTV_DEFAULTS}
METHODS = ("fastervlm", *METHOD_DEFAULTS)
REFERENCE_DEPTH = 32  # the LLM depth the published prune layers are for


@dataclass(frozen=True)
class ExportOptions:
    family: str  # key of export.families.FAMILIES
    keep: int | None = None  # FasterVLM's K: visual tokens kept per image; the number of patches: no pruning
    model: str | None = None  # checkpoint dir, HF id in the local cache, or a built-in name; None: family default
    out: Path | None = None  # export directory; None: exports/{family}-k{keep} or exports/{family}-{method}
    force: bool = False  # replace an existing export directory
    validate: bool = True  # check every graph against PyTorch after exporting it
    opset: int = 18  # ONNX opset of the graphs
    max_seq_len: int | None = None  # None: the LLM's max_position_embeddings
    layout: str | None = None  # token layout (family-specific, e.g. llava-next: fastervlm | hf); None: default
    dtype: str = "float32"  # "float16": fp16 graphs with fp32 islands and fp32 inputs/outputs (export/precision.py)
    method: str = "fastervlm"  # "fastervlm" (vision encoder, --keep), "feather" or "fastv" (inside the LLM)
    prune_layers: tuple[int, ...] | None = None  # in-LLM: first layer of each pruned block; None: scaled defaults
    reduction: float | None = None  # in-LLM: R in (0, 1); None: the method's default
    grid_stride: int | None = None  # FEATHER: stage-1 grid stride; None: 3
    positions: str | None = None  # "packed" | "original"; None: packed for FasterVLM (in-LLM methods: original)
    target: str = "standard"  # "standard" (ONNX ops: ONNX Runtime, TensorRT) | "onnxruntime" (GroupQueryAttention)
    llm_weights: str = "float"  # "float" | "int4" | "int8": the LLM graphs' linear weights (weight-only)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ExportError(f"--method {self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if self.method == "fastervlm":
            if self.keep is None:
                raise ExportError("--keep K is required with --method fastervlm (visual tokens kept per image)")
            for flag, value in (("--prune-layers", self.prune_layers), ("--reduction", self.reduction),
                                ("--grid-stride", self.grid_stride)):
                if value is not None:
                    raise ExportError(f"{flag} is for --method feather / fastv (pruning inside the LLM); "
                                      "FasterVLM takes --keep")
            if self.keep < 1:
                raise ExportError(f"--keep {self.keep} is out of range: keep at least 1 visual token")
        else:
            if self.keep is not None:
                raise ExportError(f"--keep is FasterVLM's (pruning in the vision encoder); --method {self.method} prunes "
                                  "inside the LLM: drop --keep, use --reduction")
            if self.positions == "packed":
                raise ExportError(f"--positions packed does not apply to --method {self.method}: kept tokens always "
                                  "keep their original positions inside the LLM")
            if self.reduction is not None and not (isinstance(self.reduction, (int, float)) and 0 < self.reduction < 1):
                raise ExportError(f"--reduction {self.reduction} is out of range: R must be in (0, 1), e.g. 0.7")
            if self.method == "fastv" and self.grid_stride is not None:
                raise ExportError("--grid-stride is FEATHER's uniform sample; FastV keeps only the top-scored tokens")
            if self.grid_stride is not None and self.grid_stride < 1:
                raise ExportError(f"--grid-stride {self.grid_stride} is out of range: use 1 or more (FEATHER: 3)")
            if self.prune_layers is not None:
                layers = list(self.prune_layers)
                if not layers or layers != sorted(set(layers)):
                    raise ExportError(f"--prune-layers {','.join(map(str, layers))} must be strictly increasing "
                                      "layer indices, e.g. 8,16")
                if self.method == "fastv" and len(layers) != 1:
                    raise ExportError(f"--prune-layers {','.join(map(str, layers))}: FastV prunes once; give one layer")
            if self.dtype != "float32":
                raise ExportError(f"--dtype {self.dtype} with --method {self.method} is not supported yet; use float32")
        if self.positions not in (None, "packed", "original"):
            raise ExportError(f"--positions {self.positions!r} is not supported; use packed or original")
        if self.opset not in OPSETS:
            raise ExportError(f"--opset {self.opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ExportError(f"--max-seq-len {self.max_seq_len} is too small; use at least the prompt length")
        if self.dtype not in ("float32", "float16"):
            raise ExportError(f"--dtype {self.dtype!r} is not supported; use float32 or float16")
        if self.target not in TARGETS:
            raise ExportError(f"--target {self.target!r} is not supported; use {' or '.join(TARGETS)}")
        if self.llm_weights not in LLM_WEIGHTS:
            raise ExportError(f"--llm-weights {self.llm_weights!r} is not supported; use {' or '.join(LLM_WEIGHTS)}")
        if self.llm_weights == "int8" and self.target != "onnxruntime":
            raise ExportError("--llm-weights int8 is ONNX Runtime's MatMulNBits operator: use it with --target onnxruntime "
                              "(--target standard takes --llm-weights int4 or float)")
        for flag, value in (("--target", self.target), ("--llm-weights", self.llm_weights)):
            if value not in ("standard", "float") and self.dtype != "float32":
                raise ExportError(f"{flag} {value} with --dtype {self.dtype} is not supported; use --dtype float32")

    @property
    def kv_cache(self) -> str:
        """How the LLM graphs keep the KV cache: in place in a buffer (GroupQueryAttention) or by concat."""
        return "buffer" if self.target == "onnxruntime" else "concat"

    @property
    def in_llm(self) -> bool:
        return self.method in METHOD_DEFAULTS

    def llm_pruning(self, num_layers: int) -> tuple[tuple[int, ...], float, int]:
        """(prune layers, R, grid stride; 0 for none) for an LLM of `num_layers` layers. Default layers are the
        published ones scaled to the depth: round(K * L / 32) (half up), at least 1; refused when they do not
        fit or collide (a too-shallow LLM), as are explicit layers outside 1..L-1."""
        defaults = METHOD_DEFAULTS[self.method]
        reduction = defaults["reduction"] if self.reduction is None else float(self.reduction)
        stride = self.grid_stride if self.grid_stride is not None else (defaults["grid_stride"] or 0)
        if self.prune_layers is not None:
            layers = tuple(self.prune_layers)
            if layers[0] < 1 or layers[-1] >= num_layers:
                raise ExportError(f"--prune-layers {','.join(map(str, layers))} is out of range: this LLM has "
                                  f"{num_layers} layers, use layers within 1..{num_layers - 1}")
            return layers, reduction, stride
        published = defaults["prune_layers"]
        layers = tuple(max(1, (2 * k * num_layers + REFERENCE_DEPTH) // (2 * REFERENCE_DEPTH)) for k in published)
        if list(layers) != sorted(set(layers)) or layers[-1] >= num_layers:
            raise ExportError(f"this LLM has {num_layers} layers: {self.method}'s prune layers "
                              f"{','.join(map(str, published))} (of 32) scale to {','.join(map(str, layers))}, which "
                              f"do not fit; give --prune-layers within 1..{num_layers - 1}")
        return layers, reduction, stride

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = f"{self.family}-k{self.keep}" if self.method == "fastervlm" else f"{self.family}-{self.method}"
        return Path("exports") / (name + ("-original" if self.positions == "original" and not self.in_llm else ""))
