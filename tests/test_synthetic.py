"""Tests for the synthetic demo shop generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from seqrec.constants import EVENT_TYPE, ITEM_ID, SESSION_ID, TS_MS
from seqrec.data.events import read_events
from seqrec.data.sessionize import drop_consecutive_repeats, sessionize
from seqrec.data.synthetic import OUTPUT_COLUMNS, generate_events, main, write_events_csv

SMALL = {"num_visitors": 1500, "num_items": 300, "num_categories": 10, "days": 20}
START_2015_MS = 1_420_070_400_000  # 2015-01-01 UTC
START_2016_MS = 1_451_606_400_000  # 2016-01-01 UTC


@pytest.fixture(scope="module")
def default_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_events_csv(tmp_path_factory.mktemp("synthetic") / "events.csv", seed=0)


@pytest.fixture(scope="module")
def default_sessions(default_csv: Path) -> pd.DataFrame:
    events, _ = read_events(default_csv)
    sessions, _ = drop_consecutive_repeats(sessionize(events, gap_s=1800))
    return sessions


def test_deterministic_per_seed() -> None:
    first = generate_events(**SMALL, seed=3)
    pd.testing.assert_frame_equal(first, generate_events(**SMALL, seed=3))
    other = generate_events(**SMALL, seed=4)
    assert not first.equals(other)


def test_schema_and_time_order() -> None:
    events = generate_events(**SMALL)
    assert tuple(events.columns) == OUTPUT_COLUMNS
    assert events["timestamp"].dtype == "int64"
    assert events["visitorid"].dtype == "int64"
    assert events["itemid"].dtype == "int64"
    assert events["timestamp"].is_monotonic_increasing
    assert events["timestamp"].between(START_2015_MS, START_2016_MS - 1).all()
    assert set(events["event"]) == {"view", "addtocart", "transaction"}


def test_funnel_present() -> None:
    events = generate_events(**SMALL)
    is_transaction = events["event"] == "transaction"
    assert (events["event"] == "addtocart").sum() > 0
    assert is_transaction.sum() > 0
    assert events.loc[is_transaction, "transactionid"].notna().all()
    assert events.loc[~is_transaction, "transactionid"].isna().all()
    # Every bought item was carted earlier by the same visitor.
    carts = events.loc[events["event"] == "addtocart", ["visitorid", "itemid"]]
    buys = events.loc[is_transaction, ["visitorid", "itemid"]]
    assert (
        len(
            buys.merge(carts.drop_duplicates(), how="left", indicator=True).query(
                "_merge == 'left_only'"
            )
        )
        == 0
    )


def test_default_size_and_funnel_rates(default_csv: Path) -> None:
    events, stats = read_events(default_csv, event_types=None)
    counts = events[EVENT_TYPE].value_counts()
    assert 60_000 <= counts["view"] <= 120_000
    assert 0.02 <= counts["addtocart"] / counts["view"] <= 0.04
    assert 0.2 <= counts["transaction"] / counts["addtocart"] <= 0.35
    assert 1 <= stats["num_duplicate_rows"] <= 20


def test_session_lengths(default_sessions: pd.DataFrame) -> None:
    lengths = default_sessions.groupby(SESSION_ID).size()
    assert 2 <= lengths.median() <= 6
    assert lengths.max() > 15  # a long tail exists
    assert lengths.max() <= 60


def test_re_views_share(default_sessions: pd.DataFrame) -> None:
    seen_before = 0
    num_next = 0
    for items in default_sessions.groupby(SESSION_ID, sort=False)[ITEM_ID].agg(list):
        for position in range(1, len(items)):
            num_next += 1
            seen_before += items[position] in items[:position]
    assert 0.15 <= seen_before / num_next <= 0.4


def top_successor_share(sessions: pd.DataFrame, min_count: int = 100) -> float:
    """Mean share of the most frequent next item, over items with >= min_count next items."""
    next_item = sessions.groupby(SESSION_ID, sort=False)[ITEM_ID].shift(-1)
    pairs = pd.DataFrame({"item": sessions[ITEM_ID], "next": next_item}).dropna()
    pair_counts = pairs.groupby(["item", "next"]).size()
    totals = pair_counts.groupby(level="item").sum()
    tops = pair_counts.groupby(level="item").max()
    popular = totals.index[totals >= min_count]
    assert len(popular) >= 20
    return float((tops[popular] / totals[popular]).mean())


def test_transition_signal_beats_shuffled_order(default_sessions: pd.DataFrame) -> None:
    shuffled = default_sessions.copy()
    rng = np.random.default_rng(0)
    shuffled[ITEM_ID] = rng.permutation(shuffled[ITEM_ID].to_numpy())
    real_share = top_successor_share(default_sessions)
    assert real_share > 5 * top_successor_share(shuffled)


def test_cli_writes_csv(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "events.csv.gz"
    assert main([str(out), "--seed", "2"]) == 0
    events, stats = read_events(out)
    assert stats["num_rows_kept"] > 0
    assert events[TS_MS].dtype == "int64"


def test_generated_sessions_do_not_depend_on_gap_between_20_min_and_2_h(default_csv: Path) -> None:
    events, _ = read_events(default_csv)
    num_short_gap = sessionize(events, gap_s=1200)[SESSION_ID].nunique()
    assert sessionize(events, gap_s=7200)[SESSION_ID].nunique() == num_short_gap


def test_only_planted_duplicates(default_csv: Path) -> None:
    _, stats = read_events(default_csv, event_types=None)
    _, view_stats = read_events(default_csv)
    assert stats["num_duplicate_rows"] == view_stats["num_duplicate_rows"] > 0
