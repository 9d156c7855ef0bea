"""Conversion examples: the views before an add-to-cart or purchase -> the converted item.

The retailer cares about sales, not only clicks. For raw-events sources (the demo shop, Kaggle
``events.csv``) this module turns every ``addtocart`` / ``transaction`` event that happens during
a TEST session into one example:

* the session: the processed test session (``test.parquet``, ``session_id = f"{visitor}:{k}"``)
  of the same visitor whose window ``[first view, last view + gap_s]`` (both ends included)
  contains the event time;
* prefix: that session's views (after the same processing as ``prepare``: repeats collapsed,
  rare and unknown items dropped) strictly before the event time, oldest first;
* target: the converted item.

Events outside every test session are not examples. Examples with an empty prefix or a target
outside the training catalog are dropped and counted. The examples are ranked by the same
evaluator as the next-view examples (see ``seqrec.report``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd

from seqrec.constants import (
    EVENT_TYPE,
    ITEM_ID,
    NEXT_ITEM_ID,
    PAD_IDX,
    PREFIX_ITEM_IDS,
    SESSION_ID,
    TS_MS,
    VISITOR_ID,
)
from seqrec.data.vocab import ItemVocab

log = logging.getLogger(__name__)

CONVERSION_TYPES: tuple[str, ...] = ("addtocart", "transaction")
"""Event kinds that count as conversions, in report order."""

_MS_PER_S = 1000


def conversion_examples(
    events: pd.DataFrame,
    test_sessions: pd.DataFrame,
    gap_s: int,
    known_items: Collection[str],
    event_types: Sequence[str] = CONVERSION_TYPES,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Build one example per conversion event that falls inside a test session.

    Args:
        events: canonical raw events with every kind (``read_events(path, event_types=None)``):
            ``VISITOR_ID`` (str), ``ITEM_ID`` (str), ``TS_MS`` (int64 ms), ``EVENT_TYPE`` (str).
        test_sessions: processed test views (``test.parquet``): ``SESSION_ID`` (str
            ``f"{visitor}:{k}"``), ``ITEM_ID`` (str), ``TS_MS`` (int64 ms).
        gap_s: the sessionization gap in seconds; the session window ends at last view + gap_s.
        known_items: raw ids of the training catalog; other targets are dropped.
        event_types: conversion kinds to keep.

    Returns:
        ``(examples, stats)``. ``examples`` has ``SESSION_ID``, ``PREFIX_ITEM_IDS`` (list[str]),
        ``NEXT_ITEM_ID`` (str), ``TS_MS`` (int64, conversion time) and ``EVENT_TYPE``, in time
        order. ``stats`` per kind: ``num_<kind>_events`` (all events of that kind),
        ``num_<kind>_in_test_sessions``, ``num_dropped_empty_prefix_<kind>``,
        ``num_dropped_unknown_item_<kind>``, ``num_<kind>_examples`` and
        ``num_<kind>_target_in_prefix`` (the converted item was already viewed in the prefix).
    """
    kinds = list(dict.fromkeys(event_types))
    conversions = events.loc[
        events[EVENT_TYPE].isin(kinds), [VISITOR_ID, ITEM_ID, TS_MS, EVENT_TYPE]
    ].copy()
    conversions[VISITOR_ID] = conversions[VISITOR_ID].astype(str)
    conversions[TS_MS] = conversions[TS_MS].astype(np.int64)
    conversions = conversions.sort_values(TS_MS, kind="stable").reset_index(drop=True)

    views = test_sessions[[SESSION_ID, ITEM_ID, TS_MS]].copy()
    views[SESSION_ID] = views[SESSION_ID].astype(str)
    views[TS_MS] = views[TS_MS].astype(np.int64)
    views = views.sort_values([SESSION_ID, TS_MS], kind="stable")
    bounds = views.groupby(SESSION_ID, sort=False)[TS_MS].agg(first_ms="min", last_ms="max")
    bounds = bounds.reset_index()
    bounds[VISITOR_ID] = bounds[SESSION_ID].str.rsplit(":", n=1).str[0].astype(str)
    bounds = bounds.sort_values("first_ms", kind="stable")

    # The visitor's latest test session starting at or before the event; then check its end.
    matched = pd.merge_asof(
        conversions,
        bounds,
        left_on=TS_MS,
        right_on="first_ms",
        by=VISITOR_ID,
        direction="backward",
    )
    is_inside = matched[SESSION_ID].notna() & (
        matched[TS_MS] <= matched["last_ms"] + gap_s * _MS_PER_S
    )
    matched = matched.loc[is_inside.to_numpy(dtype=bool)].reset_index(drop=True)

    session_items = {
        sid: (group[ITEM_ID].to_numpy(dtype=object), group[TS_MS].to_numpy(dtype=np.int64))
        for sid, group in views.groupby(SESSION_ID, sort=False)
    }
    prefixes = []
    for sid, ts_ms in zip(matched[SESSION_ID], matched[TS_MS], strict=True):
        items, item_ts = session_items[sid]
        prefixes.append(items[: np.searchsorted(item_ts, ts_ms, side="left")].tolist())
    matched[PREFIX_ITEM_IDS] = pd.Series(prefixes, dtype=object)

    is_empty = (matched[PREFIX_ITEM_IDS].map(len) == 0).to_numpy(dtype=bool)
    is_known = matched[ITEM_ID].isin(set(known_items)).to_numpy(dtype=bool)
    is_kept = ~is_empty & is_known
    stats: dict[str, int] = {}
    for kind in kinds:
        of_kind = (matched[EVENT_TYPE] == kind).to_numpy(dtype=bool)
        kept = matched.loc[of_kind & is_kept]
        stats[f"num_{kind}_events"] = int((events[EVENT_TYPE] == kind).sum())
        stats[f"num_{kind}_in_test_sessions"] = int(of_kind.sum())
        stats[f"num_dropped_empty_prefix_{kind}"] = int((of_kind & is_empty).sum())
        stats[f"num_dropped_unknown_item_{kind}"] = int((of_kind & ~is_empty & ~is_known).sum())
        stats[f"num_{kind}_examples"] = len(kept)
        stats[f"num_{kind}_target_in_prefix"] = int(
            sum(
                target in prefix
                for target, prefix in zip(kept[ITEM_ID], kept[PREFIX_ITEM_IDS], strict=True)
            )
        )
    examples = matched.loc[is_kept, [SESSION_ID, PREFIX_ITEM_IDS, ITEM_ID, TS_MS, EVENT_TYPE]]
    examples = examples.rename(columns={ITEM_ID: NEXT_ITEM_ID}).reset_index(drop=True)
    log.info("conversion examples: %s", stats)
    return examples, stats


def encode_conversions(
    examples: pd.DataFrame, vocab: ItemVocab, event_types: Sequence[str] = CONVERSION_TYPES
) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Encode the examples of :func:`conversion_examples` per conversion kind.

    Returns:
        ``{kind: (prefixes, next_items)}`` for every kind in ``event_types`` (possibly empty):
        ``prefixes`` is a list of (n_i,) int64 item-index arrays, ``next_items`` (N,) int64.

    Raises:
        ValueError: an item is not in the vocabulary.
    """
    out = {}
    for kind in dict.fromkeys(event_types):
        part = examples.loc[examples[EVENT_TYPE] == kind]
        next_items = vocab.encode(part[NEXT_ITEM_ID].to_numpy(dtype=object)).astype(np.int64)
        prefixes = [
            vocab.encode(np.asarray(p, dtype=object)).astype(np.int64)
            for p in part[PREFIX_ITEM_IDS]
        ]
        if (next_items == PAD_IDX).any() or any((p == PAD_IDX).any() for p in prefixes):
            raise ValueError(f"{kind}: items outside the vocabulary (drop unknown items first)")
        out[kind] = (prefixes, next_items)
    return out
