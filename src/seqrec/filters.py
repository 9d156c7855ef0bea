"""Result filters shared by offline evaluation and serving (numpy only).

The evaluator (``seqrec.pipeline.evaluate``) and the predictor (``SessionRecommender``) call the same
function with the same flags, so what is measured offline is what is served.
"""

from __future__ import annotations

import itertools
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
    return set_excluded(out, prefixes, exclude_seen, allow_idxs, deny_idxs)


def set_excluded(
    out: np.ndarray,
    prefixes: Sequence[Sequence[int] | np.ndarray],
    exclude_seen: bool = False,
    allow_idxs: np.ndarray | None = None,
    deny_idxs: np.ndarray | None = None,
    value: float = EXCLUDED,
) -> np.ndarray:
    """Write ``value`` in place into every entry of ``out`` that :func:`mask_scores` excludes
    (the rule itself; :func:`mask_scores` is this on a copy).

    Called again with ``value=0.0`` on a score mask built from zeros, it restores the zeros: the
    predictor keeps one zero (B, C) mask per thread this way instead of allocating and filling a
    new one for every filtered request.

    Args:
        out: (B, C) float array, written in place; B = len(prefixes).
        prefixes, exclude_seen, allow_idxs, deny_idxs: as in :func:`mask_scores`.
        value: what excluded entries get (-inf by default).

    Returns:
        ``out``.
    """
    out[:, PAD_IDX] = value
    if allow_idxs is not None:
        is_allowed = np.zeros(out.shape[1], dtype=bool)
        is_allowed[np.asarray(allow_idxs, dtype=np.int64)] = True
        out[:, ~is_allowed] = value
    if deny_idxs is not None and len(deny_idxs):
        out[:, np.asarray(deny_idxs, dtype=np.int64)] = value
    if exclude_seen:
        lengths = np.fromiter(map(len, prefixes), dtype=np.int64, count=len(prefixes))
        rows = np.repeat(np.arange(len(prefixes)), lengths)  # one entry per seen item
        cols = np.fromiter(
            itertools.chain.from_iterable(prefixes), dtype=np.int64, count=int(lengths.sum())
        )
        out[rows, cols] = value
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
