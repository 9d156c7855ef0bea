"""Non-neural baselines with the model's scoring contract.

Every baseline has ``fit(train_sessions, num_items)`` and ``score(prefixes) -> (B, C) float32``
where ``prefixes`` are item-index arrays (oldest first) and column PAD_IDX is never ranked.
Scores are ranked by :func:`seqrec.metrics.evaluate_scorer` exactly like the model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seqrec.constants import PAD_IDX

_NEVER = np.float32(np.finfo(np.float32).min)


def item_counts(train_sessions: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Training-event count per item index.

    Returns:
        (C,) int64 counts; entry PAD_IDX is 0.
    """
    if not train_sessions:
        return np.zeros(num_items + 1, dtype=np.int64)
    counts = np.bincount(np.concatenate(train_sessions), minlength=num_items + 1).astype(np.int64)
    counts[PAD_IDX] = 0
    return counts


class Pop:
    """Global popularity: every session gets the items with the most training events.

    Ties (items with equal counts) share a score and so count against this baseline.
    """

    name = "Pop"

    def fit(self, train_sessions: Sequence[np.ndarray], num_items: int) -> Pop:
        counts = item_counts(train_sessions, num_items).astype(np.float32)
        counts[PAD_IDX] = _NEVER
        self.scores_ = counts
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32 training counts (same row for every session)."""
        return np.broadcast_to(self.scores_, (len(prefixes), self.scores_.shape[0])).copy()


class RepeatPop:
    """Repeat-aware popularity: items of the prefix first, most recent first, then popular items.

    The usual "session popularity + recency" heuristic of session-based recommendation
    (e.g. Ludewig & Jannach, "Evaluation of session-based recommendation algorithms", 2018):
    score = 1 + (last position in prefix + 1) / (len + 1) for items seen in the session, and
    count / (max count + 1) < 1 for all others.
    """

    name = "RepeatPop"

    def fit(self, train_sessions: Sequence[np.ndarray], num_items: int) -> RepeatPop:
        counts = item_counts(train_sessions, num_items).astype(np.float64)
        base = (counts / (counts.max() + 1.0)).astype(np.float32)
        base[PAD_IDX] = _NEVER
        self.base_ = base
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32 scores; prefix items above 1, others below."""
        scores = np.broadcast_to(self.base_, (len(prefixes), self.base_.shape[0])).copy()
        for row, prefix in enumerate(prefixes):
            prefix = np.asarray(prefix, dtype=np.int64)
            prefix = prefix[prefix != PAD_IDX]
            # later occurrences overwrite earlier ones, so each item keeps its last position
            scores[row, prefix] = 1.0 + (np.arange(len(prefix)) + 1.0) / (len(prefix) + 1.0)
        return scores
