"""Readers for pre-split inputs into the canonical session / example frames.

Pre-split benchmark format (SR-GNN / GCE-GNN family, as laid out in ``$SEQREC_DATA_DIR``):

* ``train_sessions.tsv``: ``session_idx, n_items, items`` with ``items`` space-separated item ids
  in click order, sessions in chronological file order, no timestamps;
* ``test_prefix_target.tsv``: one row per test example with ``prefix_items`` (space-separated),
  ``target_item`` and, when present, ``target_timestamp_s``.

Any data set shipped in this layout is read by :func:`read_benchmark`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID, TS_MS


class SourceFormatError(ValueError):
    """A pre-split input file does not have the expected layout."""


def _read_tsv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise SourceFormatError(f"{path}: file is empty") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SourceFormatError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)} "
            "(expected a tab-separated file with a header row)"
        )
    return frame


def _split_items(path: Path, column: str, values: pd.Series, min_len: int) -> list[list[str]]:
    sessions = [v.split() for v in values.tolist()]
    for row, items in enumerate(sessions):
        if len(items) < min_len:
            raise SourceFormatError(
                f"{path}: data row {row + 1}, column {column!r}: {len(items)} item(s), need >= {min_len}"
            )
    return sessions


def read_benchmark(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a pre-split benchmark directory.

    Args:
        root: directory holding ``train_sessions.tsv`` and ``test_prefix_target.tsv``.

    Returns:
        ``(train, test_examples)``: ``train`` is a long frame ``session_id, item_id, ts_ms`` (one row
        per click, sessions contiguous in file order, ``ts_ms`` missing = <NA>); ``test_examples`` has
        ``session_id, prefix_item_ids, next_item_id, ts_ms`` with one row per shipped example, in
        file order.

    Raises:
        FileNotFoundError: a file is missing.
        SourceFormatError: a column is missing or a row is malformed (file, row and column named).
    """
    root = Path(root)
    train_path = root / "train_sessions.tsv"
    raw_train = _read_tsv(train_path, ["items"])
    train_items = _split_items(train_path, "items", raw_train["items"], min_len=1)
    lengths = np.fromiter((len(s) for s in train_items), dtype=np.int64, count=len(train_items))
    session_ids = (
        raw_train["session_idx"].to_numpy()
        if "session_idx" in raw_train
        else np.arange(len(raw_train)).astype(str)
    )
    train = pd.DataFrame(
        {
            SESSION_ID: np.repeat(np.asarray(session_ids, dtype=object), lengths),
            ITEM_ID: np.asarray([i for s in train_items for i in s], dtype=object),
            TS_MS: pd.array([pd.NA] * int(lengths.sum()), dtype="Int64"),
        }
    )

    test_path = root / "test_prefix_target.tsv"
    raw_test = _read_tsv(test_path, ["prefix_items", "target_item"])
    prefixes = _split_items(test_path, "prefix_items", raw_test["prefix_items"], min_len=1)
    targets = raw_test["target_item"].str.strip()
    if (targets == "").any():
        row = int(np.flatnonzero((targets == "").to_numpy())[0])
        raise SourceFormatError(f"{test_path}: data row {row + 1}, column 'target_item': empty")
    if "target_timestamp_s" in raw_test:
        ts_ms = (
            pd.to_numeric(raw_test["target_timestamp_s"], errors="coerce").astype("Int64") * 1000
        )
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
