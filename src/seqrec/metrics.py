"""Full-catalog ranking metrics for next-item prediction.

Rank of the next item = 1 + number of *other* catalog items scored >= it (ties count against the
model), over columns 1..num_items (PAD column 0 excluded). With one relevant item per example:
Recall@k = HR@k = [rank <= k]; MRR@k = 1/rank if rank <= k else 0; NDCG@k = 1/log2(rank + 1) if
rank <= k else 0 (Järvelin & Kekäläinen 2002). Averages are over every example of the split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from seqrec.constants import PAD_IDX


def target_rank(scores: Tensor, next_items: Tensor) -> Tensor:
    """Rank of each next item against the full catalog, ties counted against the model.

    Args:
        scores: (B, C) float scores, column PAD_IDX ignored.
        next_items: (B,) int64 item indices in 1..C-1.

    Returns:
        (B,) int64 ranks in 1..C-1.

    Raises:
        ValueError: if any score is NaN, or a next item is PAD or out of range.
    """
    if scores.ndim != 2 or next_items.shape != (scores.shape[0],):
        raise ValueError(
            f"need scores (B, C) and next_items (B,), got {tuple(scores.shape)}, {tuple(next_items.shape)}"
        )
    if torch.isnan(scores).any():
        bad_rows = torch.isnan(scores).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"NaN scores in rows {bad_rows}; cannot rank")
    if ((next_items <= PAD_IDX) | (next_items >= scores.shape[1])).any():
        raise ValueError(f"next item index outside 1..{scores.shape[1] - 1}")
    target_scores = scores.gather(1, next_items.unsqueeze(1))  # (B, 1)
    catalog = scores[:, PAD_IDX + 1 :]  # (B, C-1)
    return (catalog >= target_scores).sum(dim=1).to(torch.int64)  # counts the target itself once


def recall_at_k(ranks: Tensor, k: int) -> Tensor:
    """(B,) int64 ranks -> (B,) float 1.0 where rank <= k."""
    return (ranks <= k).to(torch.float32)


def mrr_at_k(ranks: Tensor, k: int) -> Tensor:
    """(B,) int64 ranks -> (B,) float reciprocal rank, 0 where rank > k."""
    return torch.where(
        ranks <= k, 1.0 / ranks.to(torch.float32), torch.zeros((), dtype=torch.float32)
    )


def ndcg_at_k(ranks: Tensor, k: int) -> Tensor:
    """(B,) int64 ranks -> (B,) float 1/log2(rank+1), 0 where rank > k."""
    gain = 1.0 / torch.log2(ranks.to(torch.float32) + 1.0)
    return torch.where(ranks <= k, gain, torch.zeros((), dtype=torch.float32))


METRIC_FNS = {"recall": recall_at_k, "mrr": mrr_at_k, "ndcg": ndcg_at_k}


class NextItemMetrics(Metric):
    """Accumulates Recall@k, MRR@k and NDCG@k over batches (sum states, DDP-safe).

    ``compute()`` returns ``{"recall@10": ..., "mrr@10": ..., "ndcg@10": ..., ...}`` as floats
    averaged over every example seen.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (10, 20)) -> None:
        super().__init__()
        self.ks = tuple(int(k) for k in ks)
        for name in METRIC_FNS:
            for k in self.ks:
                self.add_state(
                    f"{name}_{k}",
                    default=torch.tensor(0.0, dtype=torch.float64),
                    dist_reduce_fx="sum",
                )
        self.add_state(
            "num_examples", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, scores: Tensor, next_items: Tensor) -> None:  # type: ignore[override]
        """Add a batch: scores (B, C) float, next_items (B,) int64 (see :func:`target_rank`)."""
        ranks = target_rank(scores, next_items)
        for name, fn in METRIC_FNS.items():
            for k in self.ks:
                state = getattr(self, f"{name}_{k}")
                setattr(self, f"{name}_{k}", state + fn(ranks, k).to(torch.float64).sum())
        self.num_examples += ranks.numel()

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        total = max(int(self.num_examples), 1)
        return {
            f"{name}@{k}": float(getattr(self, f"{name}_{k}")) / total
            for name in METRIC_FNS
            for k in self.ks
        }


def evaluate_scorer(
    score_fn,  # noqa: ANN001 - Callable[[list[np.ndarray]], np.ndarray | Tensor]
    prefixes: Sequence,
    next_items,  # noqa: ANN001 - (N,) int64 array-like
    batch_size: int = 1024,
    ks: Sequence[int] = (10, 20),
    num_items: int | None = None,
) -> dict[str, float]:
    """Rank every example against the full catalog and average the metrics.

    Only full-catalog ranking is offered: there is no sampled-candidate mode. Passing
    ``num_items`` makes that checkable: a scorer that returns fewer (e.g. sampled) or more
    columns than the catalog is rejected instead of silently ranking against a subset.

    Args:
        score_fn: maps a list of B item-index arrays (oldest first) to (B, C) scores (numpy or
            torch, float).
        prefixes: N item-index arrays.
        next_items: (N,) int64 next-item indices.
        batch_size: examples per call of ``score_fn``.
        ks: cut-offs.
        num_items: catalog size; when given, every score matrix must have ``num_items + 1``
            columns.

    Returns:
        ``{"recall@10": ..., "mrr@10": ..., "ndcg@10": ..., ..., "num_examples": N}``.

    Raises:
        ValueError: NaN scores, a next item outside the score columns, or (with ``num_items``)
            a score matrix that does not cover the whole catalog.
    """
    import numpy as np

    next_items = torch.as_tensor(np.asarray(next_items, dtype=np.int64))
    metrics = NextItemMetrics(ks)
    for start in range(0, len(prefixes), batch_size):
        batch = list(prefixes[start : start + batch_size])
        scores = torch.as_tensor(score_fn(batch))
        if num_items is not None and scores.shape[-1] != num_items + 1:
            raise ValueError(
                f"scorer returned {scores.shape[-1]} columns, the full catalog needs "
                f"num_items + 1 = {num_items + 1} (sampled-candidate evaluation is not offered)"
            )
        metrics.update(scores, next_items[start : start + len(batch)])
    out: dict[str, float] = metrics.compute()
    out["num_examples"] = int(metrics.num_examples)
    return out
