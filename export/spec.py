"""Export configuration. The CLI flags map one to one onto `ExportOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.errors import ExportError

OPSETS = range(17, 24)  # 17-20 suit TensorRT's parsers; 23 adds fused Attention/RMSNorm ops for ORT


@dataclass(frozen=True)
class ExportOptions:
    family: str  # key of export.families.FAMILIES
    keep: int  # visual tokens kept per image (FasterVLM's K); the number of patches means no pruning
    model: str | None = None  # checkpoint dir, HF id in the local cache, or a built-in name; None: family default
    out: Path | None = None  # export directory; None: exports/{family}-k{keep}
    force: bool = False  # replace an existing export directory
    validate: bool = True  # check every graph against PyTorch after exporting it
    opset: int = 18  # ONNX opset of the graphs
    max_seq_len: int | None = None  # None: the LLM's max_position_embeddings
    layout: str | None = None  # token layout (family-specific, e.g. llava-next: fastervlm | hf); None: default
    dtype: str = "float32"  # "float16": fp16 graphs with fp32 islands and fp32 inputs/outputs (export/precision.py)

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ExportError(f"--keep {self.keep} is out of range: keep at least 1 visual token")
        if self.opset not in OPSETS:
            raise ExportError(f"--opset {self.opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ExportError(f"--max-seq-len {self.max_seq_len} is too small; use at least the prompt length")
        if self.dtype not in ("float32", "float16"):
            raise ExportError(f"--dtype {self.dtype!r} is not supported; use float32 or float16")

    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("exports") / f"{self.family}-k{self.keep}"
