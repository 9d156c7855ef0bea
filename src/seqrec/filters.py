"""Result filters shared by offline evaluation and serving (numpy only).

The evaluator (``seqrec.pipeline.evaluate``) and the predictor (``SessionRecommender``) call the same
function with the same flags, so what is measured offline is what is served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from seqrec.constants import PAD_IDX

EXCLUDED = -np.inf
"""Score given to excluded items (PAD, seen items when ``exclude_seen``, deny-listed items)."""


def mask_scores(
    scores: np.ndarray,
    prefixes: Sequence[Sequence[int] | np.ndarray],
    exclude_seen: bool = False,
    allow_idxs: np.ndarray | None = None,
    deny_idxs: np.ndarray | None = None,
) -> np.ndarray:
    """Return a float copy of ``scores`` with excluded items set to ``-inf``.

    Args:
        scores: (B, C) float scores, one row per session.
        prefixes: B sessions of item indices (the items seen so far).
        exclude_seen: exclude every item of the row's session.
        allow_idxs: (A,) int64 item indices; when given, every other item is excluded.
        deny_idxs: (D,) int64 item indices that are always excluded (e.g. out of stock).

    Returns:
        (B, C) float array (float32 stays float32); the PAD column is always excluded.

    Raises:
        ValueError: if ``scores`` is not (B, C) with B = len(prefixes).
    """
    if scores.ndim != 2 or scores.shape[0] != len(prefixes):
        raise ValueError(f"scores must be (B, C) with B={len(prefixes)}, got {scores.shape}")
    out = np.array(scores, dtype=np.result_type(scores.dtype, np.float32), copy=True)
    out[:, PAD_IDX] = EXCLUDED
    if allow_idxs is not None:
        is_allowed = np.zeros(out.shape[1], dtype=bool)
        is_allowed[np.asarray(allow_idxs, dtype=np.int64)] = True
        out[:, ~is_allowed] = EXCLUDED
    if deny_idxs is not None and len(deny_idxs):
        out[:, np.asarray(deny_idxs, dtype=np.int64)] = EXCLUDED
    if exclude_seen:
        for row, prefix in enumerate(prefixes):
            if len(prefix):
                out[row, np.asarray(prefix, dtype=np.int64)] = EXCLUDED
    return out


def filtered_scorer(
    score_fn: Callable[[list[np.ndarray]], Any],
    exclude_seen: bool = False,
    allow_idxs: np.ndarray | None = None,
    deny_idxs: np.ndarray | None = None,
) -> Callable[[list[np.ndarray]], Any]:
    """Wrap ``score(prefixes) -> (B, C)`` so its scores pass through :func:`mask_scores`.

    Offline evaluation wraps every scorer with this; ``SessionRecommender`` calls
    :func:`mask_scores` with the same arguments, so both apply identical filters. Without any
    filter the scorer is returned unchanged (PAD is masked by the metrics anyway).
    """
    if not exclude_seen and allow_idxs is None and deny_idxs is None:
        return score_fn

    def score(prefixes: list[np.ndarray]) -> np.ndarray:
        scores = np.asarray(score_fn(prefixes), dtype=np.float32)  # (B, C)
        return mask_scores(scores, prefixes, exclude_seen, allow_idxs, deny_idxs)

    return score
