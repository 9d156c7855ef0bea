"""Bad input files, for both readers: the raw events reader (seqrec.data.events.read_events) and the
pre-split benchmark reader (seqrec.data.sources.read_benchmark).

Each bad file gets one clear error naming the file, the line (and data row) and the column, or is
read correctly where that is obviously right (compressed input whatever its name, a UTF-8 BOM,
CRLF line ends, blank lines).
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from seqrec.data.events import EventsFormatError, read_events
from seqrec.data.sources import SourceFormatError, read_benchmark
from seqrec.data.textfile import InputFormatError

T0_MS = 1_433_221_332_117  # 2015-06-02, a 13-digit RetailRocket timestamp
HEADER = "timestamp,visitorid,event,itemid,transactionid"
GOOD_EVENTS = [
    HEADER,
    f"{T0_MS},1,view,10,",
    f"{T0_MS + 1000},1,view,11,",
    f"{T0_MS + 2000},2,view,12,",
]

COMPRESSORS: dict[str, Callable[[bytes, str], bytes]] = {
    "gzip": lambda data, name: gzip.compress(data),
    "bz2": lambda data, name: bz2.compress(data),
    "xz": lambda data, name: lzma.compress(data),
    "zip": lambda data, name: _zip_one(data, name),
}
SUFFIX = {"gzip": ".gz", "bz2": ".bz2", "xz": ".xz", "zip": ".zip"}


def _zip_one(data: bytes, name: str) -> bytes:
    path = Path(f"/tmp/_seqrec_zip_{name}")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, data)
    out = path.read_bytes()
    path.unlink()
    return out


def write_bytes(tmp_path: Path, data: bytes, name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def lines_bytes(lines: list[str], end: str = "\n", final_newline: bool = True) -> bytes:
    return (end.join(lines) + (end if final_newline else "")).encode()


def assert_names(
    err: pytest.ExceptionInfo, path: Path, line: int | None = None, column: str | None = None
) -> str:
    """The message names the file and, when given, the 1-based line and the column."""
    message = str(err.value)
    assert str(path) in message, message
    if line is not None:
        assert re.search(rf"\bline {line}\b", message), message
    if column is not None:
        assert repr(column) in message or f"'{column}'" in message, message
    assert isinstance(err.value, InputFormatError) and isinstance(err.value, ValueError)
    return message


def reference_events(tmp_path: Path) -> pd.DataFrame:
    path = write_bytes(tmp_path, lines_bytes(GOOD_EVENTS), "reference.csv")
    events, _ = read_events(path)
    return events


# ------------------------------------------------------------------------------ raw events reader


def test_events_missing_column(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, lines_bytes(["timestamp,visitorid,event", f"{T0_MS},1,view"]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=1, column="itemid")
    assert "missing required column" in message and "header" in message


def test_events_wrong_header_names_are_hinted(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path,
        lines_bytes(["timestamp,visitor_id,event,item_id,transactionid", f"{T0_MS},1,view,10,"]),
    )
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=1, column="visitorid")
    assert "is 'visitor_id' meant?" in message and "is 'item_id' meant?" in message


def test_events_without_header_row(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, lines_bytes(GOOD_EVENTS[1:]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=1)
    assert "looks like a data row" in message and "needs a header row" in message


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        (f"{T0_MS},1,view,abc,", "itemid", "abc"),
        (f"{T0_MS},2015-06-02,view,10,", "visitorid", "2015-06-02"),
        (f"{T0_MS},1,view,view,", "itemid", "view"),  # shifted columns
    ],
)
def test_events_non_numeric_id(tmp_path: Path, row: str, column: str, value: str) -> None:
    path = write_bytes(tmp_path, lines_bytes([*GOOD_EVENTS, row]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=5, column=column)
    assert "data row 4" in message and repr(value) in message
    events, _ = read_events(path, id_pattern=None)  # opaque ids when the source allows them
    assert value in events[{"itemid": "item_id", "visitorid": "visitor_id"}[column]].tolist()


def test_events_non_numeric_timestamp(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, lines_bytes([*GOOD_EVENTS, "yesterday,1,view,10,"]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    assert "'yesterday'" in assert_names(err, path, line=5, column="timestamp")


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xef\xbb\xbf"])
def test_events_empty_file(tmp_path: Path, content: bytes) -> None:
    path = write_bytes(tmp_path, content)
    with pytest.raises(EventsFormatError, match="file is empty") as err:
        read_events(path)
    assert_names(err, path)


def test_events_header_only(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, lines_bytes([HEADER]))
    with pytest.raises(EventsFormatError, match="no data rows") as err:
        read_events(path)
    assert_names(err, path)


@pytest.mark.parametrize("last", [f"{T0_MS},3,vi", f"{T0_MS},3", "14332213", f"{T0_MS},3,view,13"])
def test_events_truncated_last_line(tmp_path: Path, last: str) -> None:
    path = write_bytes(tmp_path, lines_bytes([*GOOD_EVENTS, last], final_newline=False))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=5)
    assert "data row 4" in message and "but the header has 5" in message
    assert "looks truncated" in message


def test_events_short_row_in_the_middle(tmp_path: Path) -> None:
    lines = [*GOOD_EVENTS[:2], f"{T0_MS},1,view", *GOOD_EVENTS[2:]]
    path = write_bytes(tmp_path, lines_bytes(lines))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=3)
    assert "['itemid', 'transactionid'] are absent" in message


def test_events_row_with_extra_field(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, lines_bytes([*GOOD_EVENTS, f"{T0_MS},1,view,10,,x"]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    assert "has 6 field(s)" in assert_names(err, path, line=5)


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
def test_events_wrong_separator(tmp_path: Path, sep: str, name: str) -> None:
    path = write_bytes(tmp_path, lines_bytes([line.replace(",", sep) for line in GOOD_EVENTS]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    message = assert_names(err, path, line=1)
    assert f"seems {name}-separated, expected comma-separated" in message


def test_events_utf8_bom_is_read(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, codecs.BOM_UTF8 + lines_bytes(GOOD_EVENTS))
    events, stats = read_events(path)
    pd.testing.assert_frame_equal(events, reference_events(tmp_path))
    assert stats["num_rows_read"] == 3


def test_events_crlf_and_blank_lines_are_read(tmp_path: Path) -> None:
    lines = [GOOD_EVENTS[0], GOOD_EVENTS[1], "", GOOD_EVENTS[2], GOOD_EVENTS[3], ""]
    path = write_bytes(tmp_path, lines_bytes(lines, end="\r\n"))
    events, _ = read_events(path)
    pd.testing.assert_frame_equal(events, reference_events(tmp_path))


def test_events_blank_line_shifts_the_reported_line(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, lines_bytes([*GOOD_EVENTS[:2], "", "", f"{T0_MS},1,view,x,"]))
    with pytest.raises(EventsFormatError) as err:
        read_events(path)
    assert "line 5 (data row 2)" in assert_names(err, path, line=5, column="itemid")


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("named", [True, False])
def test_events_compressed_input_is_read(tmp_path: Path, kind: str, named: bool) -> None:
    name = "events.csv" + (SUFFIX[kind] if named else "")  # content decides, not the name
    path = write_bytes(tmp_path, COMPRESSORS[kind](lines_bytes(GOOD_EVENTS), "events.csv"), name)
    events, stats = read_events(path)
    pd.testing.assert_frame_equal(events, reference_events(tmp_path))
    assert stats["num_rows_read"] == 3


def test_events_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(lines_bytes(GOOD_EVENTS * 50))
    path = write_bytes(tmp_path, data[: len(data) // 2], "events.csv.gz")
    with pytest.raises(
        EventsFormatError, match="gzip-compressed file is damaged or truncated"
    ) as err:
        read_events(path)
    assert_names(err, path)


def test_events_not_utf8(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path, lines_bytes(GOOD_EVENTS) + f"{T0_MS},1,vi\xe9w,10,\n".encode("latin-1")
    )
    with pytest.raises(EventsFormatError, match="not UTF-8") as err:
        read_events(path)
    assert_names(err, path, line=5)


def test_events_utf16(tmp_path: Path) -> None:
    path = write_bytes(tmp_path, "\n".join(GOOD_EVENTS).encode("utf-16"))
    with pytest.raises(EventsFormatError, match="UTF-16") as err:
        read_events(path)
    assert_names(err, path)


# ----------------------------------------------------------------------- pre-split benchmark reader

TRAIN_LINES = ["session_idx\tn_items\titems", "0\t3\t1 2 1", "1\t2\t3 4", "2\t2\t4 5"]
TEST_LINES = [
    "orig_session_id\tprefix_items\ttarget_item\ttarget_timestamp_s",
    "100\t1 2\t3\t1441940543",
    "101\t4\t5\t1441940603",
]


def write_benchmark(
    root: Path,
    train: list[str] | bytes = TRAIN_LINES,
    test: list[str] | bytes = TEST_LINES,
    train_name: str = "train_sessions.tsv",
    test_name: str = "test_prefix_target.tsv",
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in ((train_name, train), (test_name, test)):
        data = content if isinstance(content, bytes) else lines_bytes(content)
        (root / name).write_bytes(data)
    return root


def reference_benchmark(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_benchmark(write_benchmark(tmp_path / "reference"))


def test_benchmark_reads_good_files(tmp_path: Path) -> None:
    train, test = reference_benchmark(tmp_path)
    assert train["session_id"].tolist() == ["0", "0", "0", "1", "1", "2", "2"]
    assert train["item_id"].tolist() == ["1", "2", "1", "3", "4", "4", "5"]
    assert test["prefix_item_ids"].tolist() == [["1", "2"], ["4"]]
    assert test["next_item_id"].tolist() == ["3", "5"]
    assert test["ts_ms"].tolist() == [1_441_940_543_000, 1_441_940_603_000]


def test_benchmark_missing_column(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b", train=["session_idx\tn_items", "0\t3"])
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    assert "missing required column" in assert_names(
        err, root / "train_sessions.tsv", line=1, column="items"
    )


def test_benchmark_wrong_header(tmp_path: Path) -> None:
    test = ["session\tprefix\ttarget", "100\t1 2\t3"]
    root = write_benchmark(tmp_path / "b", test=test)
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    assert_names(err, root / "test_prefix_target.tsv", line=1, column="prefix_items")


def test_benchmark_without_header_row(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b", train=TRAIN_LINES[1:])
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    message = assert_names(err, root / "train_sessions.tsv", line=1)
    assert "looks like a data row" in message


@pytest.mark.parametrize(
    ("which", "lines", "line", "column", "value"),
    [
        ("train", [*TRAIN_LINES, "3\t2\t6 x7"], 5, "items", "x7"),
        ("test", [*TEST_LINES, "102\t1 abc\t3\t1441940700"], 4, "prefix_items", "abc"),
        ("test", [*TEST_LINES, "102\t1\tnan\t1441940700"], 4, "target_item", "nan"),
        ("test", [*TEST_LINES, "102\t1\t2\tlater"], 4, "target_timestamp_s", "later"),
        ("test", [*TEST_LINES, "102\t1\t2\t1441940700000"], 4, "target_timestamp_s", None),
    ],
)
def test_benchmark_malformed_values(
    tmp_path: Path, which: str, lines: list[str], line: int, column: str, value: str | None
) -> None:
    root = write_benchmark(tmp_path / "b", **{which: lines})
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    name = "train_sessions.tsv" if which == "train" else "test_prefix_target.tsv"
    message = assert_names(err, root / name, line=line, column=column)
    if value is not None:
        assert repr(value) in message


def test_benchmark_item_count_mismatch(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b", train=[*TRAIN_LINES[:2], "1\t3\t3 4", TRAIN_LINES[3]])
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    message = assert_names(err, root / "train_sessions.tsv", line=3, column="n_items")
    assert "says '3' but the row has 2 item(s)" in message


def test_benchmark_repeated_session_id(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b", train=[*TRAIN_LINES, "1\t1\t7"])
    with pytest.raises(SourceFormatError, match="repeated") as err:
        read_benchmark(root)
    assert_names(err, root / "train_sessions.tsv", line=5, column="session_idx")


def test_benchmark_empty_session(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b", train=[*TRAIN_LINES, "3\t0\t "])
    with pytest.raises(SourceFormatError, match="need >= 1 item") as err:
        read_benchmark(root)
    assert_names(err, root / "train_sessions.tsv", line=5, column="items")


@pytest.mark.parametrize("which", ["train", "test"])
def test_benchmark_empty_file(tmp_path: Path, which: str) -> None:
    root = write_benchmark(tmp_path / "b", **{which: b""})
    with pytest.raises(SourceFormatError, match="file is empty"):
        read_benchmark(root)


def test_benchmark_header_only(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b", test=TEST_LINES[:1])
    with pytest.raises(SourceFormatError, match="no data rows") as err:
        read_benchmark(root)
    assert_names(err, root / "test_prefix_target.tsv")


@pytest.mark.parametrize("last", ["3\t2", "3\t2\t6 ", "3\t3\t6 7"])
def test_benchmark_truncated_last_line(tmp_path: Path, last: str) -> None:
    train = lines_bytes([*TRAIN_LINES, last], final_newline=False)
    root = write_benchmark(tmp_path / "b", train=train)
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    assert_names(err, root / "train_sessions.tsv", line=5)


def test_benchmark_wrong_separator(tmp_path: Path) -> None:
    train = [line.replace("\t", ",") for line in TRAIN_LINES]
    root = write_benchmark(tmp_path / "b", train=train)
    with pytest.raises(SourceFormatError) as err:
        read_benchmark(root)
    message = assert_names(err, root / "train_sessions.tsv", line=1)
    assert "seems comma-separated, expected tab-separated" in message


def test_benchmark_utf8_bom_is_read(tmp_path: Path) -> None:
    root = write_benchmark(
        tmp_path / "b",
        train=codecs.BOM_UTF8 + lines_bytes(TRAIN_LINES),
        test=codecs.BOM_UTF8 + lines_bytes(TEST_LINES),
    )
    train, test = read_benchmark(root)
    want_train, want_test = reference_benchmark(tmp_path)
    pd.testing.assert_frame_equal(train, want_train)
    pd.testing.assert_frame_equal(test, want_test)


@pytest.mark.parametrize("named", [True, False])
def test_benchmark_gzip_is_read(tmp_path: Path, named: bool) -> None:
    suffix = ".gz" if named else ""  # train_sessions.tsv.gz is found; gzip named .tsv is read
    root = write_benchmark(
        tmp_path / "b",
        train=gzip.compress(lines_bytes(TRAIN_LINES)),
        test=gzip.compress(lines_bytes(TEST_LINES)),
        train_name="train_sessions.tsv" + suffix,
        test_name="test_prefix_target.tsv" + suffix,
    )
    train, test = read_benchmark(root)
    want_train, want_test = reference_benchmark(tmp_path)
    pd.testing.assert_frame_equal(train, want_train)
    pd.testing.assert_frame_equal(test, want_test)


def test_benchmark_missing_file(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path / "b")
    (root / "test_prefix_target.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="test_prefix_target.tsv"):
        read_benchmark(root)
