"""Split sessions by time, drop items unknown to the training catalog, build next-item examples.

Split rule (:func:`temporal_split`): with cutoff ``T = max(ts_ms) - holdout_days * 86_400_000``,
a session goes to the earlier part only if all its events are before ``T`` (its last event is
``< T``). A session with any event at or after ``T`` goes wholly to the later part, including a
session that starts before ``T`` and spans the cut. So no event of the earlier part is ``>= T``,
and sessions are never cut in two. Callers apply the same function twice: to all sessions for
train / test, then to train for train' / valid.
"""

from __future__ import annotations

import logging
from collections.abc import Set

import numpy as np
import pandas as pd

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID, TS_MS

logger = logging.getLogger(__name__)

MS_PER_DAY = 86_400_000
"""Milliseconds in one day."""


def _require_columns(frame: pd.DataFrame, columns: list[str], where: str) -> None:
    """Raise ``ValueError`` naming the missing columns and the ones present."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; present: {list(frame.columns)}")


def temporal_split(
    sessions: pd.DataFrame, holdout_days: float
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Split sessions at ``T = max(ts_ms) - holdout_days`` days; spanning sessions go later.

    Args:
        sessions: frame with ``SESSION_ID`` and ``TS_MS`` (int64 ms since epoch); other columns
            are kept.
        holdout_days: length of the later part in days (> 0, fractions allowed).

    Returns:
        ``(before, after, stats)``: ``before`` holds the sessions whose events are all
        ``< T``, ``after`` the others; both keep the input row order with a fresh ``RangeIndex``.
        ``stats``: ``cutoff_ts_ms`` (T, int ms), ``num_sessions_before``,
        ``num_sessions_after`` and ``num_sessions_spanning_cutoff`` (sessions in ``after`` that
        start before ``T``).

    Raises:
        ValueError: a required column is missing, ``sessions`` is empty or ``holdout_days <= 0``.
    """
    _require_columns(sessions, [SESSION_ID, TS_MS], "temporal_split")
    if not holdout_days > 0:
        raise ValueError(f"holdout_days must be > 0, got {holdout_days}")
    if sessions.empty:
        raise ValueError("temporal_split: no sessions to split")

    cutoff_ts_ms = int(sessions[TS_MS].max()) - round(holdout_days * MS_PER_DAY)
    by_session = sessions.groupby(SESSION_ID, sort=False)[TS_MS]
    session_last_ms = by_session.transform("max").to_numpy(dtype=np.int64)
    is_before = session_last_ms < cutoff_ts_ms

    session_first_ms = by_session.min()
    session_last_ms_per_session = by_session.max()
    is_spanning = (session_first_ms < cutoff_ts_ms) & (session_last_ms_per_session >= cutoff_ts_ms)

    before = sessions.loc[is_before].reset_index(drop=True)
    after = sessions.loc[~is_before].reset_index(drop=True)
    stats = {
        "cutoff_ts_ms": cutoff_ts_ms,
        "num_sessions_before": int(before[SESSION_ID].nunique()),
        "num_sessions_after": int(after[SESSION_ID].nunique()),
        "num_sessions_spanning_cutoff": int(is_spanning.sum()),
    }
    logger.info("temporal_split(holdout_days=%s): %s", holdout_days, stats)
    return before, after, stats


def drop_unknown_items(
    sessions: pd.DataFrame, known_items: Set[str] | pd.Index, min_session_len: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop events of items outside ``known_items``, then sessions left too short.

    A session whose items are all unknown has no events left; it counts as a session too short
    (with zero events removed in the second step), so ``num_sessions_too_short_after_unknown``
    is the number of input sessions missing from the output.

    Args:
        sessions: frame with ``SESSION_ID`` and ``ITEM_ID`` (other columns kept).
        known_items: raw item ids to keep (e.g. the train catalog).
        min_session_len: minimum events per remaining session (>= 1).

    Returns:
        ``(sessions, stats)``: remaining rows in input order with a fresh ``RangeIndex``, and
        ``num_events_unknown_item``, ``num_sessions_too_short_after_unknown``,
        ``num_events_too_short_after_unknown``.

    Raises:
        ValueError: a required column is missing or ``min_session_len < 1``.
    """
    _require_columns(sessions, [SESSION_ID, ITEM_ID], "drop_unknown_items")
    if min_session_len < 1:
        raise ValueError(f"min_session_len must be >= 1, got {min_session_len}")
    num_sessions_in = sessions[SESSION_ID].nunique()

    is_known = sessions[ITEM_ID].isin(known_items).to_numpy(dtype=bool)
    frame = sessions.loc[is_known]
    session_len = frame.groupby(SESSION_ID, sort=False)[SESSION_ID].transform("size")
    is_short = (session_len < min_session_len).to_numpy(dtype=bool)
    frame = frame.loc[~is_short].reset_index(drop=True)

    stats = {
        "num_events_unknown_item": int((~is_known).sum()),
        "num_sessions_too_short_after_unknown": int(num_sessions_in - frame[SESSION_ID].nunique()),
        "num_events_too_short_after_unknown": int(is_short.sum()),
    }
    logger.info("drop_unknown_items(min_session_len=%d): %s", min_session_len, stats)
    return frame, stats


def sessions_to_examples(sessions: pd.DataFrame) -> pd.DataFrame:
    """Turn sessions into next-item examples: one row per position ``i >= 1`` of each session.

    Events are taken in time order within each session (stable on equal times); sessions appear
    in order of first appearance. Memory grows with the sum of squared session lengths.

    Args:
        sessions: frame with ``SESSION_ID``, ``ITEM_ID`` and ``TS_MS``.

    Returns:
        Frame with columns ``SESSION_ID`` (str), ``PREFIX_ITEM_IDS`` (list[str], ``items[:i]``,
        oldest first), ``NEXT_ITEM_ID`` (str, ``items[i]``) and ``TS_MS`` (int64 ms, time of the
        next item), fresh ``RangeIndex``.

    Raises:
        ValueError: a required column is missing.
    """
    _require_columns(sessions, [SESSION_ID, ITEM_ID, TS_MS], "sessions_to_examples")
    session_code, _ = pd.factorize(sessions[SESSION_ID], sort=False)
    ts_ms = sessions[TS_MS].to_numpy(dtype=np.int64)
    order = np.lexsort((ts_ms, session_code))  # stable: by session, then time, then row order
    session_code = session_code[order]
    session_ids = sessions[SESSION_ID].to_numpy(dtype=object)[order]
    item_ids = sessions[ITEM_ID].to_numpy(dtype=object)[order]
    ts_ms = ts_ms[order]

    num_events = len(order)
    is_session_start = np.ones(num_events, dtype=bool)
    is_session_start[1:] = session_code[1:] != session_code[:-1]
    start_position = np.flatnonzero(is_session_start)[np.cumsum(is_session_start) - 1]  # (N,)
    target_positions = np.flatnonzero(~is_session_start)  # (num_examples,)

    prefixes = [
        item_ids[start:end].tolist()
        for start, end in zip(start_position[target_positions], target_positions, strict=True)
    ]
    examples = pd.DataFrame(
        {
            SESSION_ID: pd.Series(session_ids[target_positions], dtype=object),
            PREFIX_ITEM_IDS: pd.Series(prefixes, dtype=object),
            NEXT_ITEM_ID: pd.Series(item_ids[target_positions], dtype=object),
            TS_MS: ts_ms[target_positions],
        }
    )
    logger.info("sessions_to_examples: %d events -> %d examples", num_events, len(examples))
    return examples
