"""Readers for pre-split inputs into the canonical session / example frames.

Pre-split benchmark format (SR-GNN / GCE-GNN family, as laid out in ``$SEQREC_DATA_DIR``):

* ``train_sessions.tsv``: ``session_idx, n_items, items`` with ``items`` space-separated item ids
  in click order, sessions in chronological file order, no timestamps;
* ``test_prefix_target.tsv``: one row per test example with ``prefix_items`` (space-separated),
  ``target_item`` and, when present, ``target_timestamp_s``.

Any data set shipped in this layout is read by :func:`read_benchmark`.

Session-rec format (session-rec / GRU4Rec, e.g. the YOOCHOOSE ``rsc15`` files): tab-separated
``SessionId ItemId Time`` with one row per click and ``Time`` in Unix seconds (float), one file per
split (``<prefix>_train_full.txt``, ``_train_tr.txt``, ``_train_valid.txt``, ``_test.txt``); read by
:func:`read_sessionrec` (Ludewig, Mauro, Latifi & Jannach, "Empirical analysis of session-based
recommendation algorithms", UMUAI 2021; https://github.com/rn5l/session-rec). Files are read by
:func:`seqrec.data.textfile.read_table` (tab-separated, header row required; compression
recognised from the content, so ``train_sessions.tsv.gz`` is found and read; UTF-8 BOM dropped);
every malformed file is rejected with a :class:`SourceFormatError` naming file, line, data row and
column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID, TS_MS
from seqrec.data.textfile import (
    ID_PATTERN_DIGITS,
    InputFormatError,
    Table,
    find_file,
    full_match,
    read_table,
)

TRAIN_FILE = "train_sessions.tsv"
"""Training sessions of a benchmark directory (a compressed ``.tsv.gz`` etc. is also found)."""
TEST_FILE = "test_prefix_target.tsv"
"""Shipped test examples of a benchmark directory."""
TEST_SESSIONS_FILE = "test_sessions.tsv"
"""Optional whole test sessions of a benchmark directory (``test_session_idx, pos, item_idx,
timestamp_s``): what the widget replay (``scripts/replay_widget.py``) plays click by click."""

_VALID_SECONDS = (1e8, 1e11)
"""Accepted ``[low, high)`` magnitude of ``target_timestamp_s`` (about 1973..5138 in seconds)."""


class SourceFormatError(InputFormatError):
    """A pre-split input file does not have the expected layout."""


def _read_tsv(path: Path, required: list[str], schema: str) -> Table:
    return read_table(find_file(path), "\t", required, schema, error=SourceFormatError)


def _split_items(table: Table, column: str, id_pattern: str | None) -> list[list[str]]:
    """Split a space-separated item column; every row needs >= 1 item matching ``id_pattern``."""
    sessions = [v.split() for v in table.frame[column].tolist()]
    lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
    is_empty = lengths == 0
    if is_empty.any():
        raise table.fail(is_empty, column, "empty", rule=" (need >= 1 item)")
    if id_pattern is not None:
        tokens = pd.Series([i for s in sessions for i in s], dtype=object)
        is_bad_token = ~full_match(tokens, id_pattern)
        if is_bad_token.any():
            row_of_token = np.repeat(np.arange(len(sessions)), lengths)
            is_bad = np.zeros(len(sessions), dtype=bool)
            is_bad[row_of_token[is_bad_token]] = True
            raise table.fail(
                is_bad,
                column,
                "malformed",
                rule=f" (space-separated ids must match {id_pattern!r}; first bad id "
                f"{tokens.iloc[int(np.flatnonzero(is_bad_token)[0])]!r})",
            )
    return sessions


def _check_lengths(table: Table, column: str, lengths: np.ndarray) -> None:
    """Raise if the declared ``column`` (e.g. ``n_items``) differs from the item count."""
    declared = pd.to_numeric(table.frame[column], errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    is_bad = ~(declared == lengths)  # NaN (non-numeric) compares unequal
    if is_bad.any():
        row = int(np.flatnonzero(is_bad)[0])
        raise table.error(
            f"{table.path}: {table.where(row, column)}: says {table.frame[column].iloc[row]!r} but "
            f"the row has {int(lengths[row])} item(s) ({int(is_bad.sum())} such row(s); a truncated "
            "or damaged row?)"
        )


def _check_unique(table: Table, column: str) -> None:
    """Raise if a value of ``column`` repeats (two sessions would merge into one)."""
    is_repeat = table.frame[column].duplicated(keep="first").to_numpy(dtype=bool)
    if is_repeat.any():
        raise table.fail(is_repeat, column, "repeated", rule=" (ids must be unique)")


def read_benchmark(
    root: str | Path, id_pattern: str | None = ID_PATTERN_DIGITS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a pre-split benchmark directory.

    Args:
        root: directory holding ``train_sessions.tsv`` and ``test_prefix_target.tsv`` (each may be
            compressed, e.g. ``train_sessions.tsv.gz``).
        id_pattern: regular expression every item id must match in full (default: digits);
            ``None`` accepts any token.

    Returns:
        ``(train, test_examples)``: ``train`` is a long frame ``session_id, item_id, ts_ms`` (one row
        per click, sessions contiguous in file order, ``ts_ms`` missing = <NA>); ``test_examples`` has
        ``session_id, prefix_item_ids, next_item_id, ts_ms`` with one row per shipped example, in
        file order.

    Raises:
        FileNotFoundError: a file is missing.
        SourceFormatError: the file is empty, a column is missing, the separator is not a tab, a
            line has more or fewer fields than the header, ``n_items`` differs from the number of
            items, ``session_idx`` repeats, an id or a timestamp is malformed (file, line, data
            row and column named).
    """
    root = Path(root)
    train_table = _read_tsv(root / TRAIN_FILE, ["items"], "session_idx<TAB>n_items<TAB>items")
    raw_train = train_table.frame
    train_items = _split_items(train_table, "items", id_pattern)
    lengths = np.fromiter((len(s) for s in train_items), dtype=np.int64, count=len(train_items))
    if "n_items" in raw_train:
        _check_lengths(train_table, "n_items", lengths)
    if "session_idx" in raw_train:
        train_table.check_not_empty("session_idx")
        _check_unique(train_table, "session_idx")
        session_ids = raw_train["session_idx"].str.strip().to_numpy(dtype=object)
    else:
        session_ids = np.arange(len(raw_train)).astype(str)
    train = pd.DataFrame(
        {
            SESSION_ID: np.repeat(np.asarray(session_ids, dtype=object), lengths),
            ITEM_ID: np.asarray([i for s in train_items for i in s], dtype=object),
            TS_MS: pd.array([pd.NA] * int(lengths.sum()), dtype="Int64"),
        }
    )

    test_table = _read_tsv(
        root / TEST_FILE,
        ["prefix_items", "target_item"],
        "[orig_session_id<TAB>]prefix_items<TAB>target_item[<TAB>target_timestamp_s]",
    )
    raw_test = test_table.frame
    prefixes = _split_items(test_table, "prefix_items", id_pattern)
    test_table.check_not_empty("target_item")
    targets = raw_test["target_item"].str.strip()
    test_table.check_pattern("target_item", id_pattern, targets)
    if "target_timestamp_s" in raw_test:
        ts_ms = _parse_seconds_to_ms(test_table, "target_timestamp_s")
    else:
        ts_ms = pd.array([pd.NA] * len(raw_test), dtype="Int64")
    sid_col = "orig_session_id" if "orig_session_id" in raw_test else None
    test = pd.DataFrame(
        {
            SESSION_ID: raw_test[sid_col].to_numpy()
            if sid_col
            else np.arange(len(raw_test)).astype(str),
            PREFIX_ITEM_IDS: prefixes,
            NEXT_ITEM_ID: targets.to_numpy(dtype=object),
            TS_MS: ts_ms,
        }
    )
    return train, test


def _parse_seconds_to_ms(table: Table, column: str) -> pd.arrays.IntegerArray:
    """Parse a column of Unix seconds (empty = missing) into nullable int64 milliseconds."""
    values = table.frame[column].str.strip()
    is_blank = (values == "").to_numpy(dtype=bool)
    numeric = pd.to_numeric(values.where(~is_blank, None), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    is_bad = ~is_blank & ~np.isfinite(numeric)
    if is_bad.any():
        raise table.fail(is_bad, column, "non-numeric")
    low, high = _VALID_SECONDS
    is_out = ~is_blank & ((numeric < low) | (numeric >= high))
    if is_out.any():
        raise table.fail(
            is_out, column, "out-of-range", rule=f" (Unix seconds in [{low:.0e}, {high:.0e}))"
        )
    ms = np.rint(np.where(is_blank, 0.0, numeric) * 1000).astype(np.int64)
    out = pd.array(ms, dtype="Int64")
    out[is_blank] = pd.NA
    return out


def split_last_sessions(train: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out the last ``fraction`` of sessions (file order = time order) as validation.

    Args:
        train: long frame with contiguous sessions in chronological order.
        fraction: share of sessions in (0, 1) that go to the second part.

    Returns:
        ``(train_part, valid_part)``, both long frames.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"valid fraction must be in (0, 1), got {fraction}")
    session_order = pd.unique(train[SESSION_ID])
    num_valid = max(1, round(len(session_order) * fraction))
    valid_ids = set(session_order[len(session_order) - num_valid :].tolist())
    is_valid = train[SESSION_ID].isin(valid_ids).to_numpy()
    return train[~is_valid].reset_index(drop=True), train[is_valid].reset_index(drop=True)


SESSIONREC_SCHEMA = "SessionId<TAB>ItemId<TAB>Time"
"""Header of a session-rec click file (other columns are allowed and ignored)."""


def read_sessionrec(path: str | Path, id_pattern: str | None = ID_PATTERN_DIGITS) -> pd.DataFrame:
    """Read one session-rec click file into the canonical long frame.

    Args:
        path: a ``SessionId<TAB>ItemId<TAB>Time`` file (any supported compression).
        id_pattern: regular expression every item id must match in full (default: digits);
            ``None`` accepts any token.

    Returns:
        Long frame ``session_id`` (str), ``item_id`` (str), ``ts_ms`` (Int64 ms), one row per click,
        in file order (callers order events within a session by ``ts_ms``).

    Raises:
        FileNotFoundError: the file is missing.
        SourceFormatError: empty file, missing column, wrong separator, ragged line, empty session
            id, malformed item id, or a ``Time`` that is not Unix seconds (file, line, data row and
            column named).
    """
    table = _read_tsv(Path(path), ["SessionId", "ItemId", "Time"], SESSIONREC_SCHEMA)
    table.check_not_empty("SessionId")
    table.check_not_empty("ItemId")
    item_ids = table.frame["ItemId"].str.strip()
    table.check_pattern("ItemId", id_pattern, item_ids)
    is_blank_time = (table.frame["Time"].str.strip() == "").to_numpy(dtype=bool)
    if is_blank_time.any():
        raise table.fail(is_blank_time, "Time", "missing")
    return pd.DataFrame(
        {
            SESSION_ID: table.frame["SessionId"].str.strip().to_numpy(dtype=object),
            ITEM_ID: item_ids.to_numpy(dtype=object),
            TS_MS: _parse_seconds_to_ms(table, "Time"),
        }
    )


def read_benchmark_test_sessions(
    root: str | Path, id_pattern: str | None = ID_PATTERN_DIGITS
) -> pd.DataFrame | None:
    """Read the optional ``test_sessions.tsv`` of a benchmark directory.

    Args:
        root: the benchmark directory.
        id_pattern: regular expression every item id must match in full; ``None`` accepts any.

    Returns:
        Long frame ``session_id`` (str), ``item_id`` (str), ``ts_ms`` (Int64) sorted by session
        (file order of first appearance) and ``pos``; ``None`` when the file is absent.

    Raises:
        SourceFormatError: malformed file (missing column, non-numeric ``pos`` or timestamp,
            malformed item id, repeated ``(test_session_idx, pos)``), with file, line and column.
    """
    try:
        path = find_file(Path(root) / TEST_SESSIONS_FILE)
    except FileNotFoundError:
        return None
    table = _read_tsv(
        path,
        ["test_session_idx", "pos", "item_idx", "timestamp_s"],
        "test_session_idx<TAB>pos<TAB>item_idx<TAB>timestamp_s",
    )
    table.check_not_empty("test_session_idx")
    items = table.frame["item_idx"].str.strip()
    table.check_not_empty("item_idx")
    table.check_pattern("item_idx", id_pattern, items)
    pos = pd.to_numeric(table.frame["pos"].str.strip(), errors="coerce")
    is_bad_pos = pos.isna().to_numpy() | (pos.to_numpy(dtype=np.float64, na_value=0) < 0)
    if is_bad_pos.any():
        raise table.fail(is_bad_pos, "pos", "non-numeric or negative")
    sessions = table.frame["test_session_idx"].str.strip()
    is_repeat = pd.DataFrame({"s": sessions, "p": pos}).duplicated().to_numpy(dtype=bool)
    if is_repeat.any():
        raise table.fail(is_repeat, "pos", "repeated", rule=" (pos repeats within a session)")
    frame = pd.DataFrame(
        {
            SESSION_ID: sessions.to_numpy(dtype=object),
            ITEM_ID: items.to_numpy(dtype=object),
            TS_MS: _parse_seconds_to_ms(table, "timestamp_s"),
            "_pos": pos.to_numpy(dtype=np.int64),
            "_order": pd.factorize(sessions, sort=False)[0],
        }
    )
    frame = frame.sort_values(["_order", "_pos"], kind="stable")
    return frame.drop(columns=["_pos", "_order"]).reset_index(drop=True)
