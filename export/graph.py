"""What a family hands the exporter for each graph: the module, its spec and how to check it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from contract.compare import Tolerance  # noqa: F401  (families build their tolerances from here)
from contract.manifest import GraphSpec


@dataclass(frozen=True)
class GraphExport:
    name: str  # key in the manifest's `graphs`
    module: nn.Module  # forward(*inputs in spec order) -> outputs in spec order
    spec: GraphSpec
    example: Callable[[int], dict]  # seed -> feeds (torch tensors by input name); sizes > 1 on every dynamic axis
    tolerances: dict[str, Tolerance]  # per output; outputs not listed must match exactly
    # Outputs compared as per-row sets (selected indices): order-free, exact.
    set_outputs: tuple[str, ...] = field(default=())
    # (feeds, output name) -> boolean array broadcastable to the output marking the elements that matter,
    # or None for all. The LLM's KV cache at left-padding positions is never read, and attention
    # implementations legitimately differ there (a fully masked query row).
    compared: Callable[[dict, str], object] | None = None
