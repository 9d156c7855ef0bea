"""Tests for seqrec.data.split."""

from __future__ import annotations

import pandas as pd
import pytest

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID, TS_MS
from seqrec.data.split import (
    MS_PER_DAY,
    drop_unknown_items,
    sessions_to_examples,
    temporal_split,
)

CUT_MS = 1_433_221_332_117  # T, 2015-06-02
MINUTE_MS = 60_000


def make_sessions(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """Build a session frame from ``(session_id, item, ts_ms)`` rows."""
    return pd.DataFrame(
        {
            SESSION_ID: pd.Series([r[0] for r in rows], dtype=object),
            ITEM_ID: pd.Series([r[1] for r in rows], dtype=object),
            TS_MS: pd.Series([r[2] for r in rows], dtype="int64"),
        }
    )


def split_fixture() -> pd.DataFrame:
    return make_sessions(
        [
            ("w:0", "A", CUT_MS - MS_PER_DAY),  # before
            ("u:0", "A", CUT_MS - 180 * MINUTE_MS),  # before
            ("u:0", "B", CUT_MS - 170 * MINUTE_MS),
            ("u:1", "C", CUT_MS - 10 * MINUTE_MS),  # spans the cut: wholly after
            ("u:1", "D", CUT_MS - 5 * MINUTE_MS),
            ("u:1", "E", CUT_MS + 3 * MINUTE_MS),
            ("x:0", "F", CUT_MS - 1),  # last event 1 ms before T: before
            ("y:0", "G", CUT_MS),  # starts exactly at T: after, not spanning
            ("u:2", "H", CUT_MS + 120 * MINUTE_MS),  # after
            ("u:2", "I", CUT_MS + MS_PER_DAY),  # the last event: T = this - 1 day
        ]
    )


def test_temporal_split_spanning_session_goes_after() -> None:
    sessions = split_fixture()
    before, after, stats = temporal_split(sessions, holdout_days=1)
    assert stats == {
        "cutoff_ts_ms": CUT_MS,
        "num_sessions_before": 3,
        "num_sessions_after": 3,
        "num_sessions_spanning_cutoff": 1,
    }
    assert (before[TS_MS] < CUT_MS).all()
    assert before[SESSION_ID].unique().tolist() == ["w:0", "u:0", "x:0"]
    assert after[SESSION_ID].unique().tolist() == ["u:1", "y:0", "u:2"]
    assert after.loc[after[SESSION_ID] == "u:1", ITEM_ID].tolist() == ["C", "D", "E"]
    assert len(before) + len(after) == len(sessions)
    assert list(before.index) == list(range(len(before)))


def test_temporal_split_applies_twice_and_fractional_days() -> None:
    before, _, _ = temporal_split(split_fixture(), holdout_days=1)
    train, valid, stats = temporal_split(before, holdout_days=0.5)
    assert stats["cutoff_ts_ms"] == CUT_MS - 1 - MS_PER_DAY // 2
    assert train[SESSION_ID].unique().tolist() == ["w:0"]
    assert valid[SESSION_ID].unique().tolist() == ["u:0", "x:0"]


def test_temporal_split_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="holdout_days"):
        temporal_split(split_fixture(), holdout_days=0)
    with pytest.raises(ValueError, match="no sessions"):
        temporal_split(make_sessions([]), holdout_days=1)


def test_drop_unknown_items_counts() -> None:
    sessions = make_sessions(
        [
            ("a", "A", 1),
            ("a", "Z", 2),  # unknown
            ("a", "B", 3),
            ("b", "A", 1),
            ("b", "Z", 2),  # unknown -> b = [A] is too short
            ("c", "Z", 1),  # all unknown -> c disappears
            ("c", "Y", 2),
            ("d", "B", 1),
            ("d", "A", 2),
        ]
    )
    kept, stats = drop_unknown_items(sessions, {"A", "B"}, min_session_len=2)
    assert kept[SESSION_ID].tolist() == ["a", "a", "d", "d"]
    assert kept[ITEM_ID].tolist() == ["A", "B", "B", "A"]
    assert stats == {
        "num_events_unknown_item": 4,
        "num_sessions_too_short_after_unknown": 2,
        "num_events_too_short_after_unknown": 1,
    }
    kept_index, _ = drop_unknown_items(sessions, pd.Index(["A", "B"]), min_session_len=2)
    pd.testing.assert_frame_equal(kept_index, kept)


def test_sessions_to_examples_rows() -> None:
    sessions = make_sessions(
        [
            ("s1", "A", 10),
            ("s1", "C", 30),  # out of time order in the input
            ("s1", "B", 20),
            ("s2", "D", 5),  # length 1: no example
            ("s3", "E", 7),
            ("s3", "E", 8),
        ]
    )
    examples = sessions_to_examples(sessions)
    assert list(examples.columns) == [SESSION_ID, PREFIX_ITEM_IDS, NEXT_ITEM_ID, TS_MS]
    assert examples[SESSION_ID].tolist() == ["s1", "s1", "s3"]
    assert examples[PREFIX_ITEM_IDS].tolist() == [["A"], ["A", "B"], ["E"]]
    assert examples[NEXT_ITEM_ID].tolist() == ["B", "C", "E"]
    assert examples[TS_MS].tolist() == [20, 30, 8]
    assert examples[TS_MS].dtype == "int64"


def test_sessions_to_examples_empty() -> None:
    examples = sessions_to_examples(make_sessions([("s", "A", 1)]))
    assert examples.empty
    assert list(examples.columns) == [SESSION_ID, PREFIX_ITEM_IDS, NEXT_ITEM_ID, TS_MS]
