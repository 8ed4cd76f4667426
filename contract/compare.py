"""One way to compare a graph's outputs with a reference, used by every check in the toolkit: the
exporter's validation against PyTorch (fp32 and fp16), `engines check` (TensorRT vs ONNX Runtime) and the
calibration report (quantized vs fp32).

    values   max|got - ref| <= atol + rtol * max|ref|, over the whole tensor (fp32 rounding grows with the
             tensor's magnitude, not with each element's); no tolerance means exact
    sets     selected indices (top-k) compared per row as sets: agreement = mean |A n B| / K, which must
             reach `min_agreement` (1.0: identical sets)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

# Top-k agreement a lower-precision graph (fp16, int8, fp8) must keep: fp16 or quantized hidden states feed
# the fp32 score path, so a near-tie at the K-th place can flip.
MIN_TOPK_AGREEMENT = 0.9


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0

    def __str__(self) -> str:
        return f"{self.atol:g} + {self.rtol:g}*max|ref|"


@dataclass(frozen=True)
class Comparison:
    graph: str
    output: str
    case: str  # which input (a shape, a photo name)
    value: float  # max |got - ref| for values; agreement for sets
    limit: str  # the tolerance, in words
    ok: bool
    is_set: bool = False

    @property
    def badness(self) -> tuple:
        """Larger is worse: failures first, then the largest difference or the smallest agreement."""
        return (not self.ok, -self.value if self.is_set else self.value)


def topk_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows of |A n B| / K for index sets in the last axis (1.0: identical sets)."""
    rows = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
    if not rows[0].size:
        return 1.0
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(*rows)]))


def max_abs_diff(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max()) if got.size else 0.0


def compare(graph: str, output: str, case: str, got: np.ndarray, ref: np.ndarray, *,
            tolerance: Tolerance | None = None, is_set: bool = False, min_agreement: float = 1.0) -> Comparison:
    """One output against its reference (see the module docstring)."""
    if got.shape != ref.shape:
        return Comparison(graph, output, case, float("inf"), f"shape {ref.shape}, got {got.shape}", False, is_set)
    if is_set:
        agreement = topk_agreement(got, ref)
        limit = "same sets" if min_agreement >= 1.0 else f"agreement >= {min_agreement:g}"
        return Comparison(graph, output, case, agreement, limit, agreement >= min_agreement, True)
    diff = max_abs_diff(got, ref)
    if tolerance is None:
        return Comparison(graph, output, case, diff, "exact", diff == 0.0)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return Comparison(graph, output, case, diff, str(tolerance), diff <= tolerance.atol + tolerance.rtol * scale)


def worst(comparisons: Iterable[Comparison], fold_prefix: str = "present.") -> list[tuple[str, Comparison, int]]:
    """The worst comparison per (graph, output) over the cases, outputs starting with `fold_prefix` (the KV
    cache) folded into one row per graph: [(row label, worst comparison, outputs folded)]."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        label = f"{fold_prefix}*" if fold_prefix and c.output.startswith(fold_prefix) else c.output
        groups.setdefault((c.graph, label), []).append(c)
    rows = []
    for (graph, label), group in groups.items():
        outputs = len({c.output for c in group})
        rows.append((f"{label} ({outputs})" if label.endswith("*") else label, max(group, key=lambda c: c.badness),
                     outputs))
    return rows


def table(comparisons: Iterable[Comparison], value_header: str) -> str:
    """One row per graph and output, the worst case; values as max |diff| or agreement."""
    rows = [("graph", "output", value_header, "tolerance", "result")]
    for label, c, _ in worst(comparisons):
        if c.is_set:
            value = "same sets" if c.value == 1.0 else f"agreement {c.value:.3f}"
        else:
            value = f"{c.value:.2e}"
        rows.append((c.graph, label, value, c.limit, "ok" if c.ok else "FAIL"))
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    """Rows of strings as left-aligned columns; the first row is the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def next_token_agreement(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Logits [N, V] of the same N positions from two models -> (share of positions whose argmax agree, mean
    KL(reference || other) in nats): how close a quantized model's next-token predictions stay."""
    log_p, log_q = (_log_softmax(x.astype(np.float64)) for x in (reference, logits))
    agreement = float((reference.argmax(-1) == logits.argmax(-1)).mean())
    return agreement, float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
