"""The LLM's position ids, one formula for every caller (runtime, engine check, calibration)."""

from __future__ import annotations

import numpy as np


def prefill_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """attention_mask [B, S] (1 = token, 0 = left padding) -> position_ids [B, S] int64, as HF generate
    computes them: consecutive from 0 at each row's first token; padding positions get 0."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)
