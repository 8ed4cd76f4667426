"""The one place where token-selection math lives (FasterVLM's [CLS] attention ranking).

FasterVLM (arXiv 2412.01818) ranks patch tokens by the attention the [CLS] query pays them inside the
vision encoder layer whose output LLaVA uses (layer -2): softmax over all keys ([CLS] included, not
renormalised), keep the patch columns, mean over heads, top-k, indices sorted ascending so the kept
tokens stay in raster order.
"""

from __future__ import annotations

import torch


def cls_attention_scores(q_cls: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[CLS] row of one attention layer, averaged over heads, patch columns only.

        q_cls [B, H, 1, Dh] --+
                              +-> q.K^T * scale -> softmax over 1+N keys -> drop [CLS] column -> mean(H)
        keys  [B, H, 1+N, Dh] +                                                               -> [B, N]

    Only this one row is materialised; the layer's own attention stays fused.
    """
    logits = torch.matmul(q_cls, keys.transpose(-1, -2)) * scale  # [B, H, 1, 1+N]
    probs = torch.softmax(logits.float(), dim=-1)  # [B, H, 1, 1+N]
    return probs[:, :, 0, 1:].mean(dim=1)  # [B, N]


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, sorted ascending (raster order). [B, N] -> [B, k] int64."""
    indices = torch.topk(scores, k, dim=-1).indices  # [B, k]
    return torch.sort(indices, dim=-1).values


def gather_tokens(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Pick tokens by index per batch row. features [B, N, C], indices [B, K] -> [B, K, C]."""
    index = indices.unsqueeze(-1).expand(-1, -1, features.shape[-1])  # [B, K, C]
    return torch.gather(features, 1, index)


def reference_selection(attentions: torch.Tensor, k: int) -> torch.Tensor:
    """FasterVLM's selection from a full eager attention map, as the reference code computes it.

    attentions [B, H, 1+N, 1+N] (HF `output_attentions=True`, the feature layer) -> [B, k] sorted indices.
    """
    scores = attentions[:, :, 0, 1:].mean(dim=1)  # [B, N]
    return topk_sorted(scores, k)
