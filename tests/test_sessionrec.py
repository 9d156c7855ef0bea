"""Session-rec (``SessionId ItemId Time``) reader and the ``sessionrec`` prepare source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import DictConfig

from seqrec import pipeline
from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID, TS_MS
from seqrec.data.sources import SourceFormatError, read_sessionrec

PREFIX = "clicks"


def _write(path: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["SessionId\tItemId\tTime"] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _split_dir(root: Path) -> Path:
    """A tiny session-rec split: sessions 1-3 train_tr, 4 the validation day, 5-6 test."""
    tr = [
        ("1", "10", "1400000000.5"),
        ("1", "11", "1400000010"),
        ("1", "12", "1400000020"),
        ("2", "11", "1400000100"),
        ("2", "12", "1400000110"),
        ("3", "10", "1400000200"),
        ("3", "13", "1400000210"),
    ]
    valid_day = [("4", "12", "1400100000"), ("4", "14", "1400100010"), ("4", "10", "1400100020")]
    root.mkdir()
    _write(root / f"{PREFIX}_train_tr.txt", tr)
    _write(root / f"{PREFIX}_train_full.txt", tr + valid_day)
    # session-rec keeps only train_tr items in train_valid: item 14 is gone
    _write(root / f"{PREFIX}_train_valid.txt", [r for r in valid_day if r[1] != "14"])
    _write(
        root / f"{PREFIX}_test.txt",
        [
            ("5", "14", "1400200000"),
            ("5", "10", "1400200010"),
            ("5", "11", "1400200020"),
            ("6", "99", "1400200100"),
            ("6", "12", "1400200110"),  # 99 never trained: dropped
        ],
    )
    return root


def test_read_sessionrec_parses_ids_and_seconds(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    _write(path, [("7", "214536502", "1396860669.277"), ("7", "214536506", "1396860886.998")])
    frame = read_sessionrec(path)
    assert frame[SESSION_ID].tolist() == ["7", "7"]
    assert frame[ITEM_ID].tolist() == ["214536502", "214536506"]
    assert frame[TS_MS].tolist() == [1_396_860_669_277, 1_396_860_886_998]


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("1", "10", "abc")], "SessionId\tItemId\tTime", "column 'Time' has 1 non-numeric"),
        ([("1", "1x", "1400000000")], "SessionId\tItemId\tTime", "column 'ItemId' has 1 malformed"),
        ([("1", "10", "")], "SessionId\tItemId\tTime", "column 'Time' has 1 missing"),
        ([("", "10", "1400000000")], "SessionId\tItemId\tTime", "column 'SessionId' has 1 missing"),
        ([("1", "10", "1400000000")], "SessionId\tItemId\tTimestamp", "Time"),
        ([("1", "10", "14")], "SessionId\tItemId\tTime", "out-of-range"),
    ],
)
def test_read_sessionrec_rejects_bad_rows(
    tmp_path: Path, rows: list[tuple[str, str, str]], header: str, message: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(header + "\n" + "\n".join("\t".join(r) for r in rows) + "\n")
    with pytest.raises(SourceFormatError, match=message) as info:
        read_sessionrec(path)
    assert "bad.txt" in str(info.value)


def test_read_sessionrec_names_line_of_bad_time(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    _write(path, [("1", "10", "1400000000"), ("1", "11", "1400000010"), ("1", "12", "x")])
    with pytest.raises(SourceFormatError, match=r"line 4 \(data row 3\): 'x'"):
        read_sessionrec(path)


def test_prepare_sessionrec_split(tmp_path: Path, compose_cfg: Callable[..., DictConfig]) -> None:
    root = _split_dir(tmp_path / "split")
    cfg = compose_cfg(
        "prepare",
        ["data=yoochoose_rsc15_100k", f"data.sessionrec_dir={root}", f"data.file_prefix={PREFIX}"],
    )
    stats = pipeline.prepare(cfg)
    out = Path(cfg.data.processed_dir)
    train = pd.read_parquet(out / "train.parquet")
    valid = pd.read_parquet(out / "valid.parquet")
    assert sorted(train[SESSION_ID].unique()) == ["1", "2", "3"]
    # the refit's validation sessions are the full train_full sessions (item 14 kept)
    assert valid[ITEM_ID].tolist() == ["12", "14", "10"]
    assert stats["num_items"] == 5  # 10..14 from train_full
    valid_ex = pd.read_parquet(out / "valid_examples.parquet")
    assert [list(p) for p in valid_ex[PREFIX_ITEM_IDS]] == [["12"]]
    assert valid_ex[NEXT_ITEM_ID].tolist() == ["10"]
    test_ex = pd.read_parquet(out / "test_examples.parquet")
    assert [list(p) for p in test_ex[PREFIX_ITEM_IDS]] == [["14"], ["14", "10"]]
    assert test_ex[NEXT_ITEM_ID].tolist() == ["10", "11"]
    test_rows = stats["row_accounting"][str(root / f"{PREFIX}_test.txt")]
    assert test_rows["dropped"] == {"example_with_unknown_item": 1}
    assert test_rows["kept"] == {"examples": 2, "first_click_of_session": 2}
    assert test_rows["num_rows_read"] == 5


def test_prepare_sessionrec_refuses_mismatched_files(
    tmp_path: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    root = _split_dir(tmp_path / "split")
    _write(root / f"{PREFIX}_train_tr.txt", [("1", "10", "1400000000"), ("1", "11", "1400000010")])
    cfg = compose_cfg(
        "prepare",
        ["data=yoochoose_rsc15_100k", f"data.sessionrec_dir={root}", f"data.file_prefix={PREFIX}"],
    )
    with pytest.raises(ValueError, match="not one session-rec split"):
        pipeline.prepare(cfg)


def test_prepare_sessionrec_missing_file(
    tmp_path: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    root = _split_dir(tmp_path / "split")
    (root / f"{PREFIX}_test.txt").unlink()
    cfg = compose_cfg(
        "prepare",
        ["data=yoochoose_rsc15_100k", f"data.sessionrec_dir={root}", f"data.file_prefix={PREFIX}"],
    )
    with pytest.raises(FileNotFoundError, match="clicks_test.txt"):
        pipeline.prepare(cfg)


def test_benchmark_test_sessions_sorted_by_pos(tmp_path: Path) -> None:
    from seqrec.data.sources import read_benchmark_test_sessions

    assert read_benchmark_test_sessions(tmp_path) is None  # optional file
    (tmp_path / "test_sessions.tsv").write_text(
        "test_session_idx\tpos\titem_idx\ttimestamp_s\n"
        "7\t1\t20\t1441940365\n7\t0\t10\t1441939815\n3\t0\t30\t1441940546\n"
    )
    frame = read_benchmark_test_sessions(tmp_path)
    assert frame[SESSION_ID].tolist() == ["7", "7", "3"]
    assert frame[ITEM_ID].tolist() == ["10", "20", "30"]
    assert frame[TS_MS].tolist() == [1_441_939_815_000, 1_441_940_365_000, 1_441_940_546_000]


def test_benchmark_test_sessions_rejects_repeated_pos(tmp_path: Path) -> None:
    from seqrec.data.sources import read_benchmark_test_sessions

    (tmp_path / "test_sessions.tsv").write_text(
        "test_session_idx\tpos\titem_idx\ttimestamp_s\n7\t0\t20\t1441940365\n7\t0\t10\t1441939815\n"
    )
    with pytest.raises(SourceFormatError, match=r"column 'pos' has 1 repeated value.*line 3"):
        read_benchmark_test_sessions(tmp_path)


@pytest.mark.parametrize(
    ("part", "rows", "message"),
    [
        # same click count as session 1 in train_full, one item changed
        (
            "train_tr",
            [("1", "10", "1400000000.5"), ("1", "13", "1400000010"), ("1", "12", "1400000020"),
             ("2", "11", "1400000100"), ("2", "12", "1400000110"),
             ("3", "10", "1400000200"), ("3", "13", "1400000210")],
            "first differing session '1'",
        ),
        # a training session used for validation: a leak
        ("train_valid", [("1", "10", "1400000000.5"), ("1", "11", "1400000010")], "first '1'"),
        # a test session id that is also a training session
        ("test", [("2", "11", "1400200000"), ("2", "12", "1400200010")], "first '2'"),
        # test ends a year before training: not a time split
        ("test", [("9", "11", "1368000000"), ("9", "12", "1368000010")], "not a time split"),
    ],
)  # fmt: skip
def test_prepare_sessionrec_refuses_files_of_different_splits(
    tmp_path: Path,
    compose_cfg: Callable[..., DictConfig],
    part: str,
    rows: list[tuple[str, str, str]],
    message: str,
) -> None:
    root = _split_dir(tmp_path / "split")
    _write(root / f"{PREFIX}_{part}.txt", rows)
    cfg = compose_cfg(
        "prepare",
        ["data=yoochoose_rsc15_100k", f"data.sessionrec_dir={root}", f"data.file_prefix={PREFIX}"],
    )
    with pytest.raises(ValueError, match=message) as info:
        pipeline.prepare(cfg)
    assert f"{PREFIX}_{part}.txt" in str(info.value)
