"""FEATHER / FastV token selection as a static-shape subgraph (TopK with constant K, no NonZero).

One prune point of in-LLM pruning (METHODS.md, FEATHER and FastV): from the last prompt token's attention
logits over a window of image tokens, pick the tokens the next block of layers keeps.

    logits [B, H, n] (q.k/sqrt(d), image keys only)   valid [B, n] (True = real token, False = padding slot)
        |                                                 |
        +--> masked softmax over valid keys, mean over heads --> score [B, n]
        |
        +--> TopK(score, K = int(n_max (1-R)^s)) --> first count = int(n_valid (1-R)^s) ranks --+
                                                     (count: a constant table indexed by n_valid) |
             grid (stage 1 only, constant mask) & valid --------------------------------------- U --> member [B, n]
        |
        +--> TopK ascending of (member ? j : n + j), K = slots --> keep [B, slots], keep_valid [B, slots]

Every output has a static size: `slots = int(n_max (1-R)^s) + |grid|`. The union is data-dependent in
size (top-k and grid overlap), so its members come first in ascending order and the remaining slots are
marked invalid (their index is some non-member token of the window, always in range). The kept count of a
stage without a grid (FEATHER stage 2) depends on how many stage-1 survivors there are; TopK runs with
its upper bound and the ranks beyond the data-dependent count are dropped. With a full window (every slot
valid) the count equals the static K, so stage 1 and FastV keep exactly int(n (1-R)) by score.

This reproduces the reference rule exactly, with no deviation, except where scores tie (TopK's order among
equal scores is the backend's). Stage 2 returns slots of its own window (the stage-1 slots): the original
image index of a kept token is `stage1_keep[stage2_keep]`, and both stay ascending.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from contract.errors import ExportError


class StageSelect(nn.Module):
    """One prune point: (logits [B, H, n_max], valid [B, n_max]) -> (keep [B, slots] int64, keep_valid [B, slots] bool).

    window: n_max, the slots of the window (stage 1: n image tokens; stage 2: the stage-1 slots).
    reduction: R in (0, 1). stage: s, the exponent of the kept fraction (1 - R)^s (FEATHER 1 then 2; FastV 1).
    grid: window indices kept whatever their score (FEATHER stage 1: grid[::s, ::s] of each sub-image).
    """

    def __init__(self, window: int, reduction: float, stage: int = 1, grid: Sequence[int] = ()):
        super().__init__()
        if window < 1:
            raise ExportError(f"selection window {window} must hold at least one token")
        if not 0 < reduction < 1:
            raise ExportError(f"reduction {reduction} must be in (0, 1)")
        if stage < 1:
            raise ExportError(f"stage {stage} must be 1 or more")
        grid = list(grid)
        if len(set(grid)) != len(grid) or any(not 0 <= i < window for i in grid):
            raise ExportError(f"grid indices must be distinct and within 0..{window - 1}")
        fraction = (1 - reduction) ** stage
        # kept by score for n valid tokens: int(n (1-R)^s), the reference's float arithmetic, tabulated
        counts = [int(n * fraction) for n in range(window + 1)]
        self.window = window
        self.topk = counts[window]  # static upper bound of the top-k count (TopK's constant K)
        self.slots = min(self.topk + len(grid), window)  # the union never exceeds the window
        if self.slots < 1:
            raise ExportError(f"stage {stage} keeps no token of {window} at reduction {reduction}")
        grid_mask = torch.zeros(window, dtype=torch.bool)
        grid_mask[grid] = True
        self.register_buffer("counts", torch.tensor(counts, dtype=torch.int64), persistent=False)  # [n_max + 1]
        self.register_buffer("grid_mask", grid_mask, persistent=False)  # [n_max]
        self.register_buffer("positions", torch.arange(window, dtype=torch.int64), persistent=False)  # [n_max]

    def scores(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean over heads of the softmax over valid keys only. [B, H, n], [B, n] bool -> [B, n] (0 where invalid)."""
        logits = logits.float().masked_fill(~valid.unsqueeze(1), torch.finfo(torch.float32).min)  # [B, H, n]
        probs = torch.softmax(logits, dim=-1) * valid.unsqueeze(1).float()  # [B, H, n]
        return probs.mean(dim=1)  # [B, n]

    def forward(self, logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = valid.bool()  # [B, n]
        score = self.scores(logits, valid)  # [B, n]
        member = self.grid_mask.unsqueeze(0) & valid  # [B, n]
        if self.topk > 0:
            ranked = score.masked_fill(~valid, -1.0)  # every invalid slot below every valid one (scores >= 0)
            top = torch.topk(ranked, self.topk, dim=-1).indices  # [B, K], best first
            count = self.counts.index_select(0, valid.long().sum(dim=-1))  # [B]: int(n_valid (1-R)^s) <= K
            in_count = self.positions[: self.topk].unsqueeze(0) < count.unsqueeze(1)  # [B, K]
            picked = torch.zeros_like(score).scatter(1, top, in_count.float())  # [B, n]
            member = member | (picked > 0)
        # members first, ascending; then the non-members (ascending too, marked invalid)
        key = torch.where(member, self.positions, self.positions + self.window)  # [B, n] distinct
        order = torch.topk(key, self.slots, dim=-1, largest=False)  # sorted ascending
        return order.indices, order.values < self.window  # [B, slots] int64, [B, slots] bool


class SelectGraph(nn.Module):
    """StageSelect with the graph's int64 validity tensors: (window_logits [B, H, n], window_valid [B, n])
    -> (keep_slots [B, slots], keep_valid [B, slots])."""

    def __init__(self, select: StageSelect):
        super().__init__()
        self.select = select

    def forward(self, window_logits: torch.Tensor, window_valid: torch.Tensor):
        keep, keep_valid = self.select(window_logits, window_valid > 0)
        return keep, keep_valid.long()


def select_export(name: str, heads: int, window: int, reduction: float, stage: int, grid: Sequence[int] = ()):
    """The GraphExport of one select graph (`names.select_graph(modality, stage)`)."""
    from contract import names
    from contract.manifest import BATCH, GraphSpec, TensorSpec
    from export.graph import GraphExport

    select = StageSelect(window, reduction, stage, grid)
    spec = GraphSpec(
        file=f"{name}.onnx",
        inputs=(TensorSpec(names.WINDOW_LOGITS, "float32", (BATCH, heads, window)),
                TensorSpec(names.WINDOW_VALID, "int64", (BATCH, window))),
        outputs=(TensorSpec(names.KEEP_SLOTS, "int64", (BATCH, select.slots)),
                 TensorSpec(names.KEEP_VALID, "int64", (BATCH, select.slots))),
    )

    def example(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        valid = torch.ones(2, window, dtype=torch.int64)
        valid[1] = (torch.rand(window, generator=gen) < 0.6).long()  # a window with empty slots (stage 2)
        valid[1, 0] = 1
        return {names.WINDOW_LOGITS: 4 * torch.randn(2, heads, window, generator=gen), names.WINDOW_VALID: valid}

    return GraphExport(name, SelectGraph(select).eval(), spec, example, tolerances={}), select
