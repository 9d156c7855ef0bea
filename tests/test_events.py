"""Tests for seqrec.data.events.read_events."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from seqrec.constants import EVENT_TYPE, ITEM_ID, TS_MS, VISITOR_ID
from seqrec.data.events import EventsFormatError, read_events

T0_MS = 1_433_221_332_117  # 2015-06-02, a 13-digit RetailRocket timestamp
HEADER = "timestamp,visitorid,event,itemid,transactionid"


def write_csv(tmp_path: Path, lines: list[str], name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_kaggle_schema_with_extra_datetime_column(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            "datetime," + HEADER,
            f"2015-06-02 05:02:12,{T0_MS},257597,view,355908,",
            f"2015-06-02 05:02:13,{T0_MS + 1000},992329,view,248676,",
        ],
    )
    events, stats = read_events(path)
    assert list(events.columns) == [VISITOR_ID, ITEM_ID, TS_MS, EVENT_TYPE]
    assert [str(t) for t in events.dtypes] == ["object", "object", "int64", "object"]
    assert events[VISITOR_ID].tolist() == ["257597", "992329"]
    assert events[ITEM_ID].tolist() == ["355908", "248676"]
    assert events[TS_MS].tolist() == [T0_MS, T0_MS + 1000]
    assert events[EVENT_TYPE].tolist() == ["view", "view"]
    assert list(events.index) == [0, 1]
    assert stats == {
        "num_rows_read": 2,
        "num_rows_other_event_type": 0,
        "num_duplicate_rows": 0,
        "num_rows_kept": 2,
    }


def funnel_lines() -> list[str]:
    return [
        HEADER,
        f"{T0_MS},1,view,10,",
        f"{T0_MS + 1},1,addtocart,10,",
        f"{T0_MS + 2},1,transaction,10,77",
        f"{T0_MS + 3},2,view,11,",
        f"{T0_MS + 3},2,view,11,",  # exact duplicate
        f"{T0_MS + 4},2,view,12,",
    ]


def test_event_type_filter_counts(tmp_path: Path) -> None:
    path = write_csv(tmp_path, funnel_lines())
    events, stats = read_events(path)
    assert events[ITEM_ID].tolist() == ["10", "11", "12"]
    assert stats == {
        "num_rows_read": 6,
        "num_rows_other_event_type": 2,
        "num_duplicate_rows": 1,
        "num_rows_kept": 3,
    }

    events, stats = read_events(path, event_types=None)
    assert events[EVENT_TYPE].tolist() == ["view", "addtocart", "transaction", "view", "view"]
    assert stats["num_rows_other_event_type"] == 0

    events, stats = read_events(path, event_types=("view", "addtocart"))
    assert events[EVENT_TYPE].tolist() == ["view", "addtocart", "view", "view"]
    assert stats["num_rows_other_event_type"] == 1

    events, _ = read_events(path, event_types="addtocart")  # a bare string is one type
    assert events[EVENT_TYPE].tolist() == ["addtocart"]


@pytest.mark.parametrize("event_types", [("view",), None, ("view", "transaction")])
@pytest.mark.parametrize("drop_duplicates", [True, False])
def test_stats_add_up(
    tmp_path: Path, event_types: tuple[str, ...] | None, drop_duplicates: bool
) -> None:
    path = write_csv(tmp_path, funnel_lines())
    events, stats = read_events(path, event_types=event_types, drop_duplicates=drop_duplicates)
    assert stats["num_rows_kept"] == len(events)
    assert (
        stats["num_rows_kept"] + stats["num_rows_other_event_type"] + stats["num_duplicate_rows"]
        == stats["num_rows_read"]
        == 6
    )


def test_duplicates_counted_and_dropped_first_kept(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            HEADER,
            f"{T0_MS},1,view,10,",
            f"{T0_MS + 5},1,view,11,",
            f"{T0_MS},1,view,10,",  # duplicate of row 1, not adjacent
            f"{T0_MS},1,view,10,",  # and again
            f"{T0_MS},2,view,10,",  # other visitor: not a duplicate
            f"{T0_MS},1,addtocart,10,",  # other event type: not a duplicate
        ],
    )
    events, stats = read_events(path, event_types=None)
    assert stats["num_duplicate_rows"] == 2
    assert events[VISITOR_ID].tolist() == ["1", "1", "2", "1"]
    assert events[ITEM_ID].tolist() == ["10", "11", "10", "10"]

    events, stats = read_events(path, event_types=None, drop_duplicates=False)
    assert stats["num_duplicate_rows"] == 0
    assert len(events) == 6


def test_ids_stay_strings(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [HEADER, f"{T0_MS},00123,view,000456,", f"{T0_MS},7,view,1e5,"])
    events, _ = read_events(path, id_pattern=None)  # any text is an id when no pattern is set
    assert events[VISITOR_ID].tolist() == ["00123", "7"]
    assert events[ITEM_ID].tolist() == ["000456", "1e5"]
    assert all(isinstance(v, str) for v in events[ITEM_ID])
    with pytest.raises(EventsFormatError, match=r"'itemid'.*line 3 \(data row 2\).*'1e5'"):
        read_events(path)  # the default pattern (digits, as in the Kaggle file) rejects 1e5


def test_reads_gzip_by_extension(tmp_path: Path) -> None:
    path = tmp_path / "events.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(funnel_lines()) + "\n")
    events, stats = read_events(path)
    assert events[ITEM_ID].tolist() == ["10", "11", "12"]
    assert stats["num_rows_read"] == 6


def test_seconds_unit_converts_to_ms(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [HEADER, "1433221332,1,view,10,"])
    events, _ = read_events(path, ts_unit="s")
    assert events[TS_MS].tolist() == [1_433_221_332_000]
    assert events[TS_MS].dtype == "int64"


def test_missing_column_lists_present_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["timestamp,visitorid,event,transactionid", f"{T0_MS},1,view,"])
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = str(err.value)
    assert str(path) in message
    assert "itemid" in message
    assert "present" in message and "'visitorid'" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("")
    with pytest.raises(EventsFormatError, match="empty") as err:
        read_events(path)
    assert str(path) in str(err.value)


def test_header_only_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [HEADER])
    with pytest.raises(EventsFormatError, match="no data rows"):
        read_events(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_events(tmp_path / "nope.csv")


def test_non_numeric_timestamp_names_row_and_column(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path, [HEADER, f"{T0_MS},1,view,10,", "2015-06-02 05:02:12,1,view,11,", "x,1,view,12,"]
    )
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = str(err.value)
    assert str(path) in message
    assert "'timestamp'" in message
    assert "data row 2" in message
    assert "2015-06-02 05:02:12" in message


def test_missing_timestamp_is_reported(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [HEADER, f"{T0_MS},1,view,10,", ",1,view,11,"])
    with pytest.raises(EventsFormatError, match=r"'timestamp'.*data row 2"):
        read_events(path)


@pytest.mark.parametrize("column", ["visitorid", "itemid"])
def test_missing_id_is_reported(tmp_path: Path, column: str) -> None:
    row = {"timestamp": str(T0_MS), "visitorid": "1", "event": "view", "itemid": "10"}
    row[column] = ""
    bad = ",".join([row["timestamp"], row["visitorid"], row["event"], row["itemid"], ""])
    path = write_csv(tmp_path, [HEADER, f"{T0_MS},1,view,10,", f"{T0_MS},1,view,10,", bad])
    with pytest.raises(EventsFormatError, match=rf"'{column}'.*data row 3") as err:
        read_events(path)
    assert str(path) in str(err.value)


def test_seconds_read_as_ms_is_rejected_with_unit_hint(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [HEADER, "1433221332,1,view,10,", "1433221333,1,view,11,"])
    with pytest.raises(EventsFormatError) as err:
        read_events(path, ts_unit="ms")
    message = str(err.value)
    assert "'timestamp'" in message and "data row 1" in message
    assert "ts_unit='s'" in message


def test_ms_read_as_seconds_is_rejected_with_unit_hint(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [HEADER, f"{T0_MS},1,view,10,"])
    with pytest.raises(EventsFormatError, match="ts_unit='ms'"):
        read_events(path, ts_unit="s")


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_csv(tmp_path, funnel_lines())
    with pytest.raises(ValueError, match="ts_unit"):
        read_events(path, ts_unit="us")
    with pytest.raises(ValueError, match="event_types"):
        read_events(path, event_types=())
