"""Read raw RetailRocket events (Kaggle ``events.csv`` schema) into the canonical event frame.

Input schema (header row required, column order free, extra columns such as ``datetime`` ignored)::

    timestamp,visitorid,event,itemid,transactionid
    1433221332117,257597,view,355908,

``timestamp`` is an integer Unix time (milliseconds in the Kaggle file; ``ts_unit="s"`` reads
seconds), ``event`` is ``view`` / ``addtocart`` / ``transaction``. ``transactionid`` is optional
and not used. Files are read by :func:`seqrec.data.textfile.read_table`: gzip / bz2 / xz / zip
(/ zstd) compression is recognised from the content (``events.csv.gz`` or not), a UTF-8 BOM is
dropped, and every malformed file is rejected with an :class:`EventsFormatError` naming the file,
the line (header = line 1), the data row and the column.

Output (:func:`read_events`): one row per kept event, in file order, with columns exactly
``[VISITOR_ID, ITEM_ID, TS_MS, EVENT_TYPE]``; ids and event type are Python ``str`` in ``object``
columns (read as text, so ``00123`` stays ``00123`` and ids never become floats), ``TS_MS`` is
``int64`` milliseconds since the Unix epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from seqrec.constants import EVENT_TYPE, ITEM_ID, TS_MS, VISITOR_ID
from seqrec.data.textfile import ID_PATTERN_DIGITS, InputFormatError, Table, read_table

logger = logging.getLogger(__name__)

RAW_TIMESTAMP = "timestamp"
"""Raw column: event time, integer Unix time in ``ts_unit``."""
RAW_VISITOR_ID = "visitorid"
"""Raw column: visitor id."""
RAW_EVENT = "event"
"""Raw column: event kind (``view``, ``addtocart``, ``transaction``)."""
RAW_ITEM_ID = "itemid"
"""Raw column: item id."""
RAW_TRANSACTION_ID = "transactionid"
"""Raw column: transaction id, set on ``transaction`` rows only (optional, unused here)."""

REQUIRED_COLUMNS: tuple[str, ...] = (RAW_TIMESTAMP, RAW_VISITOR_ID, RAW_EVENT, RAW_ITEM_ID)
"""Raw columns that must be present; every other column is ignored."""

_MS_PER_UNIT: dict[str, int] = {"ms": 1, "s": 1000}
"""Milliseconds per timestamp unit accepted by ``ts_unit``."""

_VALID_RANGE: dict[str, tuple[float, float]] = {"ms": (1e11, 1e14), "s": (1e8, 1e11)}
"""Accepted ``[low, high)`` raw timestamp magnitude per unit: both cover about 1973..5138."""


class EventsFormatError(InputFormatError):
    """A raw events file is empty, lacks a column, or holds values that cannot be read."""


def read_events(
    path: str | Path,
    event_types: Sequence[str] | None = ("view",),
    ts_unit: str = "ms",
    drop_duplicates: bool = True,
    id_pattern: str | None = ID_PATTERN_DIGITS,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read a RetailRocket-schema events CSV into the canonical event frame.

    Rows are kept in file order. Filtering happens first by event type, then exact duplicates of
    ``(visitor, item, ts, event)`` are dropped (the first occurrence is kept), so
    ``num_rows_kept + num_rows_other_event_type + num_duplicate_rows == num_rows_read``.

    Args:
        path: CSV file; compression is recognised from the content (e.g. ``events.csv.gz``).
        event_types: event kinds to keep, e.g. ``("view",)``; ``None`` keeps every kind. A single
            string is treated as one kind.
        ts_unit: unit of the raw ``timestamp`` column: ``"ms"`` (Kaggle file; values must lie in
            ``[1e11, 1e14)``) or ``"s"`` (values in ``[1e8, 1e11)``, multiplied by 1000).
        drop_duplicates: drop exact duplicate ``(visitor, item, ts, event)`` rows.
        id_pattern: regular expression every ``visitorid`` / ``itemid`` must match in full
            (default: digits, as in the Kaggle file; ``None`` accepts any non-empty text). A
            column of words or dates where ids belong means a shifted or wrong file.

    Returns:
        ``(events, stats)``. ``events`` has columns ``[VISITOR_ID, ITEM_ID, TS_MS, EVENT_TYPE]``
        (``str``, ``str``, ``int64`` ms since epoch, ``str``) and a fresh ``RangeIndex``.
        ``stats`` holds ``num_rows_read``, ``num_rows_other_event_type``,
        ``num_duplicate_rows`` and ``num_rows_kept``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``ts_unit`` is unknown or ``event_types`` is empty.
        EventsFormatError: the file is empty (no header or no data rows), a required column is
            missing, the separator is not a comma, a line has more or fewer fields than the
            header (e.g. a truncated last line), the bytes are not UTF-8, an id / event value is
            missing, an id does not match ``id_pattern``, a timestamp is missing or not numeric,
            or the timestamp magnitude does not match ``ts_unit``. The message names the file
            and, where relevant, the column and the first offending line and 1-based data row.
    """
    path = Path(path)
    if ts_unit not in _MS_PER_UNIT:
        raise ValueError(f"ts_unit must be one of {sorted(_MS_PER_UNIT)}, got {ts_unit!r}")
    if isinstance(event_types, str):
        event_types = (event_types,)
    if event_types is not None and len(event_types) == 0:
        raise ValueError("event_types is empty; pass None to keep every event type")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: events file not found")

    table = read_table(
        path,
        sep=",",
        required=REQUIRED_COLUMNS,
        schema=f"the RetailRocket header {','.join(REQUIRED_COLUMNS + (RAW_TRANSACTION_ID,))}",
        error=EventsFormatError,
    )
    raw = table.frame
    num_rows_read = len(raw)

    for column in (RAW_VISITOR_ID, RAW_ITEM_ID, RAW_EVENT):
        table.check_not_empty(column)
    for column in (RAW_VISITOR_ID, RAW_ITEM_ID):
        table.check_pattern(column, id_pattern)
    ts_ms = _parse_timestamps_ms(table, ts_unit)

    events = pd.DataFrame(
        {
            VISITOR_ID: pd.Series(raw[RAW_VISITOR_ID].to_numpy(), dtype=object),
            ITEM_ID: pd.Series(raw[RAW_ITEM_ID].to_numpy(), dtype=object),
            TS_MS: ts_ms,
            EVENT_TYPE: pd.Series(raw[RAW_EVENT].to_numpy(), dtype=object),
        }
    )

    num_rows_other_event_type = 0
    if event_types is not None:
        wanted = list(dict.fromkeys(event_types))
        is_wanted = events[EVENT_TYPE].isin(wanted).to_numpy()
        num_rows_other_event_type = int((~is_wanted).sum())
        events = events.loc[is_wanted]
        absent = sorted(set(wanted) - set(events[EVENT_TYPE].unique()))
        if absent:
            logger.warning("%s: requested event type(s) %s do not occur", path, absent)

    num_duplicate_rows = 0
    if drop_duplicates:
        is_duplicate = events.duplicated(keep="first").to_numpy()
        num_duplicate_rows = int(is_duplicate.sum())
        events = events.loc[~is_duplicate]

    events = events.reset_index(drop=True)
    stats = {
        "num_rows_read": num_rows_read,
        "num_rows_other_event_type": num_rows_other_event_type,
        "num_duplicate_rows": num_duplicate_rows,
        "num_rows_kept": len(events),
    }
    if events.empty:
        logger.warning("%s: no rows kept (event_types=%s)", path, event_types)
    logger.info("read %s: %s", path, stats)
    return events, stats


def _parse_timestamps_ms(table: Table, ts_unit: str) -> np.ndarray:
    """Parse raw timestamps, check their magnitude and convert them to milliseconds.

    Args:
        table: the read file (its ``timestamp`` column is str).
        ts_unit: ``"ms"`` or ``"s"``.

    Returns:
        (N,) int64 milliseconds since the Unix epoch (fractional values rounded to the nearest ms).
    """
    values = table.frame[RAW_TIMESTAMP]
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    is_bad = ~np.isfinite(numeric)
    if is_bad.any():
        raise table.fail(is_bad, RAW_TIMESTAMP, "missing or non-numeric")
    low, high = _VALID_RANGE[ts_unit]
    is_out = (numeric < low) | (numeric >= high)
    if is_out.any():
        row = int(np.flatnonzero(is_out)[0])
        other_unit = "s" if ts_unit == "ms" else "ms"
        other_low, other_high = _VALID_RANGE[other_unit]
        looks_like_other = bool(other_low <= numeric[row] < other_high)
        hint = (
            f"the values look like {other_unit!r}; pass ts_unit={other_unit!r} (Hydra override: data.ts_unit={other_unit})"
            if looks_like_other
            else f"check the unit (ts_unit={other_unit!r} expects [{other_low:.0e}, {other_high:.0e}))"
        )
        raise EventsFormatError(
            f"{table.path}: column {RAW_TIMESTAMP!r} has {int(is_out.sum())} value(s) outside "
            f"[{low:.0e}, {high:.0e}) expected for ts_unit={ts_unit!r}; first at "
            f"{table.where(row)}: {values.iloc[row]!r}; {hint}"
        )
    # Values are < 1e14, so float64 holds them (and x1000 seconds) exactly to the millisecond.
    return np.rint(numeric * _MS_PER_UNIT[ts_unit]).astype(np.int64)
