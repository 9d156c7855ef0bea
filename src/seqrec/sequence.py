"""The one way to turn a session into model input (numpy only, shared by training and serving)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seqrec.constants import PAD_IDX


def first_repeat(ids: Sequence[str]) -> tuple[int, int] | None:
    """The positions (first, second) of the first id that occurs twice in ``ids`` (0-based), or
    None when every id is distinct. Used to name a duplicate in a vocabulary (``ItemVocab``, an
    export's ``item_vocab.json``) instead of only saying there is one."""
    first: dict[str, int] = {}
    for position, item in enumerate(ids):
        if first.setdefault(item, position) != position:
            return first[item], position
    return None


def encode_prefix(item_idxs: Sequence[int] | np.ndarray, max_len: int) -> np.ndarray:
    """Keep the most recent ``max_len`` item indices and left-pad with ``PAD_IDX``.

    Args:
        item_idxs: item indices of one session, oldest first (ints in 1..num_items).
        max_len: model context length L (> 0).

    Returns:
        (L,) int64 array; the last element is the most recent item, padding (0) is on the left.

    Raises:
        ValueError: if ``max_len`` < 1.
    """
    return encode_prefixes([item_idxs], max_len, pad_to_longest=False)[0]


def encode_prefixes(
    prefixes: Sequence[Sequence[int] | np.ndarray], max_len: int, pad_to_longest: bool = True
) -> np.ndarray:
    """Keep each session's most recent item indices and left-pad them with ``PAD_IDX`` into one
    batch (the single rule behind :func:`encode_prefix`).

    Args:
        prefixes: B sessions of item indices, oldest first.
        max_len: model context length L.
        pad_to_longest: pad only to the longest (truncated) session in the batch instead of L.
            The model is invariant to extra left padding, so both give the same scores.

    Returns:
        (B, L') int64 array with L' = min(L, longest session) (at least 1) or L.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    width = max_len
    if pad_to_longest:
        width = max(1, min(max_len, max((len(p) for p in prefixes), default=1)))
    out = np.full((len(prefixes), width), PAD_IDX, dtype=np.int64)
    for row, prefix in enumerate(prefixes):
        items = prefix[-width:]  # the most recent items (a view or a short copy)
        if len(items):
            out[row, width - len(items) :] = items
    return out
