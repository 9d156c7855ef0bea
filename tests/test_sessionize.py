"""Tests for seqrec.data.sessionize."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from seqrec.constants import EVENT_TYPE, ITEM_ID, SESSION_ID, TS_MS, VISITOR_ID
from seqrec.data.events import read_events
from seqrec.data.sessionize import drop_consecutive_repeats, filter_min_support, sessionize

T0_MS = 1_433_221_332_117  # 2015-06-02, a 13-digit RetailRocket timestamp
GAP_S = 1800


def make_events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """Build an event frame from ``(visitor, item, ts_ms)`` rows."""
    return pd.DataFrame(
        {
            VISITOR_ID: pd.Series([r[0] for r in rows], dtype=object),
            ITEM_ID: pd.Series([r[1] for r in rows], dtype=object),
            TS_MS: pd.Series([r[2] for r in rows], dtype="int64"),
        }
    )


def make_sessions(sessions: dict[str, list[str]]) -> pd.DataFrame:
    """Build a session frame from ``{session_id: [item, ...]}`` (1 s between events)."""
    rows = [
        (sid, item, T0_MS + 1000 * pos)
        for sid, items in sessions.items()
        for pos, item in enumerate(items)
    ]
    return pd.DataFrame(
        {
            SESSION_ID: pd.Series([r[0] for r in rows], dtype=object),
            ITEM_ID: pd.Series([r[1] for r in rows], dtype=object),
            TS_MS: pd.Series([r[2] for r in rows], dtype="int64"),
        }
    )


def items_by_session(frame: pd.DataFrame) -> dict[str, list[str]]:
    return {sid: group[ITEM_ID].tolist() for sid, group in frame.groupby(SESSION_ID, sort=True)}


@pytest.mark.parametrize(("gap_ms", "num_sessions"), [(GAP_S * 1000, 1), (GAP_S * 1000 + 1, 2)])
def test_gap_boundary(gap_ms: int, num_sessions: int) -> None:
    sessions = sessionize(make_events([("v", "A", T0_MS), ("v", "B", T0_MS + gap_ms)]), GAP_S)
    assert sessions[SESSION_ID].nunique() == num_sessions


def test_views_at_0_10_50_minutes_give_two_sessions() -> None:
    events = make_events(
        [("v", "A", T0_MS), ("v", "B", T0_MS + 10 * 60_000), ("v", "C", T0_MS + 50 * 60_000)]
    )
    sessions = sessionize(events, GAP_S)
    assert sessions[SESSION_ID].tolist() == ["v:0", "v:0", "v:1"]
    assert sessions[ITEM_ID].tolist() == ["A", "B", "C"]
    assert list(sessions.columns) == [SESSION_ID, VISITOR_ID, ITEM_ID, TS_MS]
    assert sessions[SESSION_ID].dtype == object


def test_sessions_per_visitor_and_extra_columns_kept() -> None:
    events = make_events(
        [
            ("u", "A", T0_MS),
            ("w", "B", T0_MS + 1),
            ("u", "C", T0_MS + 3_600_000),
            ("w", "D", T0_MS + 2),
            ("u", "E", T0_MS + 7_200_000),
        ]
    )
    events[EVENT_TYPE] = "view"
    sessions = sessionize(events, GAP_S)
    assert items_by_session(sessions) == {
        "u:0": ["A"],
        "u:1": ["C"],
        "u:2": ["E"],
        "w:0": ["B", "D"],
    }
    assert (sessions[EVENT_TYPE] == "view").all()
    assert list(sessions.index) == list(range(5))


def test_unsorted_input_gives_same_sessions() -> None:
    rows = [
        ("u", "A", T0_MS),
        ("u", "B", T0_MS + 60_000),
        ("u", "C", T0_MS + 60_000 + GAP_S * 1000 + 1),
        ("w", "D", T0_MS + 5),
        ("w", "E", T0_MS + 6),
        ("x", "F", T0_MS),
    ]
    expected = sessionize(make_events(rows), GAP_S)
    shuffled = make_events([rows[i] for i in [5, 2, 4, 0, 3, 1]])
    pd.testing.assert_frame_equal(sessionize(shuffled, GAP_S), expected)
    assert items_by_session(expected) == {
        "u:0": ["A", "B"],
        "u:1": ["C"],
        "w:0": ["D", "E"],
        "x:0": ["F"],
    }


def test_file_order_breaks_timestamp_ties() -> None:
    events = make_events([("v", "B", T0_MS), ("v", "A", T0_MS), ("v", "C", T0_MS)])
    assert sessionize(events, GAP_S)[ITEM_ID].tolist() == ["B", "A", "C"]


def test_read_sessionize_collapse_order_example(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "timestamp,visitorid,event,itemid,transactionid\n"
        f"{T0_MS},7,view,A,\n"
        f"{T0_MS},7,view,A,\n"  # exact duplicate
        f"{T0_MS + 5_000},7,view,A,\n"
        f"{T0_MS + 5_000},7,view,C,\n"  # same time as the previous row: file order decides
        f"{T0_MS + 20_000},7,view,B,\n"
        f"{T0_MS + 40_000},7,view,A,\n"
    )
    events, stats = read_events(path, drop_duplicates=True, id_pattern=None)
    assert stats["num_duplicate_rows"] == 1
    sessions = sessionize(events, GAP_S)
    assert sessions[ITEM_ID].tolist() == ["A", "A", "C", "B", "A"]
    assert sessions[SESSION_ID].unique().tolist() == ["7:0"]

    collapsed, num_dropped = drop_consecutive_repeats(sessions)
    assert collapsed[ITEM_ID].tolist() == ["A", "C", "B", "A"]
    assert num_dropped == 1
    assert list(collapsed.index) == [0, 1, 2, 3]


def test_consecutive_repeats_only_within_a_session() -> None:
    sessions = make_sessions({"s1": ["A", "A", "A", "B", "A"], "s2": ["A", "B", "B"]})
    collapsed, num_dropped = drop_consecutive_repeats(sessions)
    assert items_by_session(collapsed) == {"s1": ["A", "B", "A"], "s2": ["A", "B"]}
    assert num_dropped == 3


def test_filter_min_support_needs_several_passes() -> None:
    sessions = make_sessions(
        {"s1": ["X", "A"], "s2": ["A", "B"], "s3": ["B", "C", "D"], "s4": ["C", "D"]}
    )
    # Pass 1: X is rare (1 event) -> s1 = [A] is short.  Pass 2: A is now rare -> s2 = [B] is
    # short.  Pass 3: B is now rare -> s3 = [C, D], nothing short: stop.
    filtered, stats = filter_min_support(sessions, min_session_len=2, min_item_support=2)
    assert items_by_session(filtered) == {"s3": ["C", "D"], "s4": ["C", "D"]}
    assert stats == {
        "num_filter_iterations": 3,
        "num_events_rare_items": 3,
        "num_events_short_sessions": 2,
        "num_sessions_short": 2,
    }
    assert len(sessions) - len(filtered) == 5
    assert list(filtered.index) == [0, 1, 2, 3]


def test_filter_min_support_clean_input_is_one_pass() -> None:
    sessions = make_sessions({"s1": ["A", "B"], "s2": ["B", "A"]})
    filtered, stats = filter_min_support(sessions, min_session_len=2, min_item_support=2)
    pd.testing.assert_frame_equal(filtered, sessions)
    assert stats == {
        "num_filter_iterations": 1,
        "num_events_rare_items": 0,
        "num_events_short_sessions": 0,
        "num_sessions_short": 0,
    }


def test_bad_arguments() -> None:
    events = make_events([("v", "A", T0_MS)])
    with pytest.raises(ValueError, match="gap_s"):
        sessionize(events, -1)
    with pytest.raises(ValueError, match="missing column"):
        sessionize(events.drop(columns=[TS_MS]), GAP_S)
    with pytest.raises(ValueError, match=">= 1"):
        filter_min_support(make_sessions({"s": ["A"]}), 0, 1)
