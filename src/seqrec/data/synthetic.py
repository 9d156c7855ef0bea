"""SYNTHETIC demo shop: a seeded generator of RetailRocket-schema events (no real data).

The events are invented, for demos, tests and smoke runs only. They are written in the Kaggle
RetailRocket ``events.csv`` schema (``timestamp,visitorid,event,itemid,transactionid``; ms
timestamps from 2015-05-03 UTC; integer ids; ``transactionid`` set on transaction rows only),
so they go through exactly the same reader as the real file.

What the shop contains (all draws from one ``numpy.random.Generator(seed)``, so the output is
a pure function of the arguments):

* Catalog: ``num_items`` items in ``num_categories`` categories; Zipf-like popularity of the
  categories and of the items within each category.
* Sequential structure a popularity model cannot capture: each item has a few fixed "next item"
  successors (two in its own category, one complement in a fixed other category) with strong
  weights. Each step of a session follows a successor of the current item, re-views an earlier
  item of the session, browses the current category by popularity, or jumps to a new category.
* Sessions: mostly 2-6 views (lognormal length, long tail capped at 50); 2 s to 20 min between
  views (median 35 s); visitors have one or more sessions separated by idle gaps of hours to
  days (median 8 h, always at least 2.5 h), so any ``gap_s`` from 1200 to 7200 recovers the
  generated sessions; a session starts in the visitor's favourite category or a popular one.
* Funnel: a small share of views is followed by an ``addtocart`` of the same item; a share of
  the sessions with carts ends in one ``transaction`` row per distinct carted item, all sharing
  one ``transactionid``.
* A handful of exact duplicate view rows, to exercise de-duplication.

Default size: about 90k views, 2.8k carts and 0.8k transaction rows over 60 days, generated in
under a second; about a quarter of next views re-view an item already seen in the session. Rows
are in time order.

CLI: ``python -m seqrec.data.synthetic OUT.csv [--seed N]`` (``.csv.gz`` is compressed).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

# Time.
_START_MS = 1_430_611_200_000  # 2015-05-03 00:00:00 UTC, the first day of RetailRocket
_MS_PER_S = 1000
_MS_PER_DAY = 86_400_000
# Popularity (Zipf exponents over popularity rank).
_CATEGORY_ZIPF_EXPONENT = 0.8
_ITEM_ZIPF_EXPONENT = 1.0
_SUCCESSOR_POPULARITY_POWER = 0.5  # successors drawn with prob ∝ popularity ** this (flatter)
# Successors: slots 0 and 1 in the item's category, slot 2 in its complement category.
_SUCCESSOR_WEIGHTS = np.array([0.6, 0.25, 0.15])
# Step actions within a session (probabilities; the rest browses the current category).
_P_FOLLOW_SUCCESSOR = 0.5
_P_REVIEW_EARLIER = 0.26
_P_JUMP_CATEGORY = 0.05
_P_START_IN_FAVOURITE = 0.5
# Session lengths (views): round(lognormal), clipped.
_SESSION_LEN_LOG_MEAN = 1.15
_SESSION_LEN_LOG_STD = 0.75
_MAX_SESSION_LEN = 50
# Sessions per visitor: geometric, capped.
_SESSIONS_PER_VISITOR_P = 0.55
_MAX_SESSIONS_PER_VISITOR = 10
# Gaps.
_VIEW_GAP_MEDIAN_S = 35.0
_VIEW_GAP_LOG_STD = 0.9
_VIEW_GAP_RANGE_S = (2.0, 1200.0)
_IDLE_GAP_MEDIAN_S = 8 * 3600.0
_IDLE_GAP_LOG_STD = 1.3
_MIN_IDLE_GAP_S = 9000.0
# Funnel.
_P_CART_AFTER_VIEW = 0.03
_CART_DELAY_RANGE_S = (5.0, 90.0)
_P_SESSION_BUYS_CARTS = 0.28
_PURCHASE_DELAY_RANGE_S = (60.0, 600.0)
_NUM_DUPLICATE_ROWS = 8
# Id ranges (RetailRocket-like magnitudes).
_ITEM_ID_RANGE = 470_000
_VISITOR_ID_RANGE = 1_500_000
_FIRST_TRANSACTION_ID = 1000

OUTPUT_COLUMNS: tuple[str, ...] = ("timestamp", "visitorid", "event", "itemid", "transactionid")
"""Columns of the generated frame, the RetailRocket Kaggle schema."""


def _zipf_weights(num: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Return (num,) float64 weights ``1 / rank ** exponent`` over a random ranking, summing to 1."""
    ranks = rng.permutation(num) + 1
    weights = 1.0 / ranks.astype(np.float64) ** exponent
    return weights / weights.sum()


class _Catalog:
    """Items, categories, popularity and the successor kernel (item indices 0..num_items-1)."""

    def __init__(self, num_items: int, num_categories: int, rng: np.random.Generator) -> None:
        self.num_categories = num_categories
        self.category_of_item = rng.permutation(np.arange(num_items) % num_categories)  # (I,)
        self.category_prob = _zipf_weights(num_categories, _CATEGORY_ZIPF_EXPONENT, rng)  # (Cat,)

        # Items grouped by category; within-category Zipf popularity.
        self.items_by_category = np.argsort(self.category_of_item, kind="stable")  # (I,)
        sorted_category = self.category_of_item[self.items_by_category]
        self.category_start = np.searchsorted(sorted_category, np.arange(num_categories))
        self.category_end = np.searchsorted(sorted_category, np.arange(num_categories), "right")
        prob_in_category = np.empty(num_items)  # (I,) indexed by item, sums to 1 per category
        for category in range(num_categories):
            members = self.items_by_category[
                self.category_start[category] : self.category_end[category]
            ]
            prob_in_category[members] = _zipf_weights(len(members), _ITEM_ZIPF_EXPONENT, rng)
        self.prob_in_category = prob_in_category
        # Cumulative probability over items_by_category: category c spans (c, c + 1].
        sorted_prob = prob_in_category[self.items_by_category]
        within_cumsum = np.cumsum(sorted_prob) - np.repeat(
            np.concatenate([[0.0], np.cumsum(sorted_prob)])[self.category_start],
            self.category_end - self.category_start,
        )
        self.cdf_by_category = sorted_category + within_cumsum

        # Successor kernel: (I, 3) item indices with fixed weights _SUCCESSOR_WEIGHTS.
        complement = np.arange(num_categories) + rng.integers(1, num_categories, num_categories)
        complement %= num_categories
        successors = np.empty((num_items, len(_SUCCESSOR_WEIGHTS)), dtype=np.int64)
        for item in range(num_items):
            category = self.category_of_item[item]
            successors[item, :2] = self._draw_members(category, 2, exclude=item, rng=rng)
            successors[item, 2] = self._draw_members(complement[category], 1, -1, rng)[0]
        self.successors = successors
        self.successor_cdf = np.cumsum(_SUCCESSOR_WEIGHTS)

    def _draw_members(
        self, category: int, num: int, exclude: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Draw ``num`` distinct items of ``category`` (not ``exclude``), ∝ flattened popularity."""
        members = self.items_by_category[
            self.category_start[category] : self.category_end[category]
        ]
        members = members[members != exclude]
        weights = self.prob_in_category[members] ** _SUCCESSOR_POPULARITY_POWER
        return rng.choice(members, size=num, replace=False, p=weights / weights.sum())

    def sample_in_category(self, categories: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Sample one item per row by popularity within the given category.

        Args:
            categories: (M,) int64 category per draw.
            uniforms: (M,) float64 in [0, 1).

        Returns:
            (M,) int64 item indices.
        """
        positions = np.searchsorted(self.cdf_by_category, categories + uniforms, side="right")
        positions = np.clip(
            positions, self.category_start[categories], self.category_end[categories] - 1
        )
        return self.items_by_category[positions]

    def sample_category(self, uniforms: np.ndarray) -> np.ndarray:
        """Sample (M,) int64 categories by category popularity from (M,) uniforms."""
        categories = np.searchsorted(np.cumsum(self.category_prob), uniforms, side="right")
        return np.minimum(categories, self.num_categories - 1)


def _walk_sessions(
    catalog: _Catalog, start_items: np.ndarray, lengths: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Run the item walk of every session at once, one step at a time.

    Args:
        catalog: the shop catalog.
        start_items: (S,) int64 first item per session.
        lengths: (S,) int64 number of views per session (>= 1).
        rng: random generator.

    Returns:
        (S, max(lengths)) int64 item indices; positions at or beyond a session's length are -1.
    """
    num_sessions = len(lengths)
    items = np.full((num_sessions, int(lengths.max())), -1, dtype=np.int64)
    items[:, 0] = start_items
    for step in range(1, items.shape[1]):
        active = np.flatnonzero(lengths > step)  # (M,) sessions that have a view at this step
        current = items[active, step - 1]
        action_u, choice_u, item_u = rng.random((3, len(active)))
        is_follow = action_u < _P_FOLLOW_SUCCESSOR
        is_review = (action_u >= _P_FOLLOW_SUCCESSOR) & (
            action_u < _P_FOLLOW_SUCCESSOR + _P_REVIEW_EARLIER
        )
        is_review &= step >= 2  # needs an item before the current one
        is_jump = action_u >= 1.0 - _P_JUMP_CATEGORY

        category = catalog.category_of_item[current]
        category = np.where(is_jump, catalog.sample_category(choice_u), category)
        following = catalog.successors[
            current, np.searchsorted(catalog.successor_cdf, choice_u, side="right").clip(max=2)
        ]
        earlier_pos = np.minimum((choice_u * (step - 1)).astype(np.int64), max(step - 2, 0))
        earlier = items[active, earlier_pos]
        browsing = catalog.sample_in_category(category, item_u)
        items[active, step] = np.where(is_follow, following, np.where(is_review, earlier, browsing))
    return items


def _session_schedule(
    num_visitors: int, days: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw sessions per visitor, session lengths, start times and view gaps.

    Returns:
        ``(visitor_of_session, lengths, view_ts_ms)``: (S,) int64 visitor index, (S,) int64 views
        per session, and (S, max_len) int64 view times in ms (undefined past a session's length).
        Sessions starting after ``days`` are dropped.
    """
    sessions_per_visitor = np.minimum(
        rng.geometric(_SESSIONS_PER_VISITOR_P, num_visitors), _MAX_SESSIONS_PER_VISITOR
    )
    visitor_of_session = np.repeat(np.arange(num_visitors), sessions_per_visitor)  # (S,)
    num_sessions = len(visitor_of_session)
    session_rank = np.arange(num_sessions) - np.repeat(
        np.cumsum(sessions_per_visitor) - sessions_per_visitor, sessions_per_visitor
    )  # (S,) 0-based index of the session within its visitor

    lengths = np.rint(
        np.exp(rng.normal(_SESSION_LEN_LOG_MEAN, _SESSION_LEN_LOG_STD, num_sessions))
    ).astype(np.int64)
    lengths = np.clip(lengths, 1, _MAX_SESSION_LEN)
    view_gap_s = np.exp(
        rng.normal(np.log(_VIEW_GAP_MEDIAN_S), _VIEW_GAP_LOG_STD, (num_sessions, _MAX_SESSION_LEN))
    ).clip(*_VIEW_GAP_RANGE_S)
    view_gap_s[:, 0] = 0.0
    view_offset_ms = np.rint(np.cumsum(view_gap_s, axis=1) * _MS_PER_S).astype(np.int64)
    duration_ms = view_offset_ms[np.arange(num_sessions), lengths - 1]  # (S,)
    idle_gap_ms = np.rint(
        np.maximum(
            np.exp(rng.normal(np.log(_IDLE_GAP_MEDIAN_S), _IDLE_GAP_LOG_STD, num_sessions)),
            _MIN_IDLE_GAP_S,
        )
        * _MS_PER_S
    ).astype(np.int64)

    start_ms = np.empty(num_sessions, dtype=np.int64)
    is_first = session_rank == 0
    start_ms[is_first] = _START_MS + rng.integers(0, days * _MS_PER_DAY, int(is_first.sum()))
    for rank in range(1, int(session_rank.max()) + 1):
        rows = np.flatnonzero(session_rank == rank)
        start_ms[rows] = start_ms[rows - 1] + duration_ms[rows - 1] + idle_gap_ms[rows]

    keep = start_ms < _START_MS + days * _MS_PER_DAY
    view_ts_ms = start_ms[keep, None] + view_offset_ms[keep, : lengths[keep].max()]
    return visitor_of_session[keep], lengths[keep], view_ts_ms


def generate_events(
    num_visitors: int = 12000,
    num_items: int = 1200,
    num_categories: int = 24,
    days: int = 60,
    seed: int = 0,
) -> pd.DataFrame:
    """Generate a SYNTHETIC demo shop's events in the RetailRocket Kaggle schema.

    Args:
        num_visitors: visitors drawn (each has >= 1 session; sessions after ``days`` are cut).
        num_items: catalog size (>= 3 * num_categories).
        num_categories: number of item categories (>= 2).
        days: length of the period in days, starting 2015-05-03 00:00 UTC (1..240, stays in 2015).
        seed: seed of the ``numpy.random.Generator``; equal arguments give an identical frame.

    Returns:
        Frame with columns ``timestamp`` (int64 ms since epoch), ``visitorid`` (int64),
        ``event`` (str: ``view`` / ``addtocart`` / ``transaction``), ``itemid`` (int64) and
        ``transactionid`` (nullable Int64, set on transaction rows only), sorted by time (stable),
        fresh ``RangeIndex``.

    Raises:
        ValueError: an argument is out of range.
    """
    if num_visitors < 1 or num_categories < 2 or num_items < 3 * num_categories:
        raise ValueError(
            "need num_visitors >= 1, num_categories >= 2 and num_items >= 3 * num_categories; got "
            f"{num_visitors=}, {num_categories=}, {num_items=}"
        )
    if not 1 <= days <= 240:
        raise ValueError(f"days must be in 1..240 (timestamps stay in 2015), got {days}")
    rng = np.random.default_rng(seed)

    catalog = _Catalog(num_items, num_categories, rng)
    item_ids = rng.choice(_ITEM_ID_RANGE, size=num_items, replace=False) + 1  # (I,) raw ids
    visitor_ids = rng.choice(_VISITOR_ID_RANGE, size=num_visitors, replace=False)  # (V,) raw ids
    favourite_category = catalog.sample_category(rng.random(num_visitors))  # (V,)

    visitor_of_session, lengths, view_ts_ms = _session_schedule(num_visitors, days, rng)
    num_sessions = len(lengths)
    start_u, category_u, item_u = rng.random((3, num_sessions))
    start_category = np.where(
        start_u < _P_START_IN_FAVOURITE,
        favourite_category[visitor_of_session],
        catalog.sample_category(category_u),
    )
    start_items = catalog.sample_in_category(start_category, item_u)
    session_items = _walk_sessions(catalog, start_items, lengths, rng)  # (S, max_len)

    is_view = np.arange(session_items.shape[1])[None, :] < lengths[:, None]  # (S, max_len)
    view_session = np.nonzero(is_view)[0]  # (num_views,) session index per view, time order
    view_item = session_items[is_view]
    view_ts = view_ts_ms[is_view]

    # Funnel: view -> addtocart (same item) -> one transaction per buying session.
    is_carted = rng.random(len(view_item)) < _P_CART_AFTER_VIEW
    cart_session = view_session[is_carted]
    cart_item = view_item[is_carted]
    cart_ts = view_ts[is_carted] + np.rint(
        rng.uniform(*_CART_DELAY_RANGE_S, len(cart_item)) * _MS_PER_S
    ).astype(np.int64)
    carting_sessions = np.unique(cart_session)
    buying_sessions = carting_sessions[rng.random(len(carting_sessions)) < _P_SESSION_BUYS_CARTS]
    is_bought = np.isin(cart_session, buying_sessions)
    purchase_delay_ms = np.rint(
        rng.uniform(*_PURCHASE_DELAY_RANGE_S, num_sessions) * _MS_PER_S
    ).astype(np.int64)
    last_cart_ms = pd.Series(cart_ts).groupby(cart_session).max()  # per carting session
    # One transaction row per distinct (session, item): an item carted twice is bought once.
    bought = np.flatnonzero(is_bought)
    _, first_of_pair = np.unique(
        cart_session[bought] * num_items + cart_item[bought], return_index=True
    )
    bought = np.sort(bought[first_of_pair])
    buy_session = cart_session[bought]
    buy_item = cart_item[bought]
    buy_ts = last_cart_ms.loc[buy_session].to_numpy() + purchase_delay_ms[buy_session]
    buy_transaction = _FIRST_TRANSACTION_ID + np.searchsorted(buying_sessions, buy_session)

    rows = pd.DataFrame(
        {
            "timestamp": np.concatenate([view_ts, cart_ts, buy_ts]),
            "visitorid": visitor_ids[
                visitor_of_session[np.concatenate([view_session, cart_session, buy_session])]
            ],
            "event": np.repeat(
                np.array(["view", "addtocart", "transaction"], dtype=object),
                [len(view_ts), len(cart_ts), len(buy_ts)],
            ),
            "itemid": item_ids[np.concatenate([view_item, cart_item, buy_item])],
            "transactionid": pd.array(
                np.concatenate(
                    [np.zeros(len(view_ts) + len(cart_ts), dtype=np.int64), buy_transaction]
                ),
                dtype="Int64",
            ),
        }
    )
    rows.loc[rows["event"] != "transaction", "transactionid"] = pd.NA
    num_duplicates = min(_NUM_DUPLICATE_ROWS, len(view_ts))
    duplicated = rows.iloc[np.sort(rng.choice(len(view_ts), num_duplicates, replace=False))]
    rows = pd.concat([rows, duplicated], ignore_index=True)
    rows = rows.sort_values("timestamp", kind="stable").reset_index(drop=True)
    rows["event"] = rows["event"].astype(object)
    logger.info(
        "synthetic shop (seed=%d): %d sessions, %d views, %d carts, %d transactions, "
        "%d duplicate rows",
        seed,
        num_sessions,
        len(view_ts),
        len(cart_ts),
        len(buy_ts),
        num_duplicates,
    )
    return rows


def write_events_csv(path: str | Path, **kwargs: Any) -> Path:
    """Generate synthetic events and write them as a RetailRocket-schema CSV.

    Args:
        path: output file; parent folders are created; ``.gz`` etc. compress by extension.
        **kwargs: passed to :func:`generate_events`.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    events = generate_events(**kwargs)
    events.to_csv(path, index=False, compression="infer")
    logger.info("wrote %d synthetic events to %s", len(events), path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m seqrec.data.synthetic OUT.csv [--seed N]``."""
    parser = argparse.ArgumentParser(
        description="Write a SYNTHETIC demo shop events.csv (RetailRocket Kaggle schema)."
    )
    parser.add_argument("out", type=Path, help="output CSV path (.csv or .csv.gz)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_events_csv(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
