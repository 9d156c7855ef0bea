"""Strict reading of delimited text inputs: one place for compression, encoding, header and rows.

Every input reader (raw events in :mod:`seqrec.data.events`, pre-split benchmark files in
:mod:`seqrec.data.sources`) goes through :func:`read_table`, so each bad file gets the same kind of
error: an :class:`InputFormatError` naming the file, the 1-based file line (the header is line 1
unless blank lines precede it), the data row and the column. What is obviously right is read
instead of rejected:

* compression is recognised from the first bytes (gzip, bz2, xz, zip with one member, zstd when
  the ``zstandard`` package is installed), whatever the file name says (``events.csv.gz`` and a
  gzip file named ``events.csv`` both work); a damaged or truncated archive is an error;
* a UTF-8 byte-order mark is dropped; other bytes that are not UTF-8 (or a UTF-16 file) are an error;
* blank lines are skipped, ``\\r\\n`` line ends are accepted.

Rejected with a clear message: an empty file or a header without data rows, a header that lacks a
required column (with a hint when line 1 looks like data or a column name is close to the expected
one), a file separated by another character than expected, a line with fewer or more fields than
the header (a truncated last line, a value containing the separator). Quote characters have no
special meaning (``csv.QUOTE_NONE``): none of these formats quotes fields.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import difflib
import gzip
import io
import lzma
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

ID_PATTERN_DIGITS = r"[0-9]+"
"""Default raw id pattern of the RetailRocket sources: non-negative integers written in digits."""

COMPRESSION_SUFFIXES: tuple[str, ...] = (".gz", ".bz2", ".xz", ".zip", ".zst")
"""Suffixes tried after a missing file name, e.g. ``train_sessions.tsv`` -> ``.tsv.gz``."""

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"PK\x03\x04", "zip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
"""Leading bytes of each supported compression format."""

_SEPARATOR_NAMES: dict[str, str] = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
"""Separators recognised when a file uses another one than expected."""


class InputFormatError(ValueError):
    """An input file cannot be read as the expected table; the message names file, line and column."""


@dataclass(frozen=True)
class Table:
    """A parsed delimited file.

    Attributes:
        path: the file.
        frame: one row per non-blank data line, in file order, fresh ``RangeIndex``; every cell is a
            Python ``str`` (empty fields are ``""``); column names are stripped of whitespace.
        line_numbers: (N,) int64 1-based file line of each data row.
        compression: detected compression (``"gzip"``, ...) or ``None``.
        error: exception class raised by the helpers (a subclass of :class:`InputFormatError`).
    """

    path: Path
    frame: pd.DataFrame
    line_numbers: np.ndarray
    compression: str | None
    error: type[InputFormatError] = InputFormatError

    def where(self, row: int, column: str | None = None) -> str:
        """Location of 0-based data ``row`` (and ``column``) for an error message."""
        place = f"line {int(self.line_numbers[row])} (data row {row + 1})"
        return f"{place}, column {column!r}" if column is not None else place

    def fail(
        self,
        is_bad: np.ndarray,
        column: str,
        problem: str,
        values: pd.Series | None = None,
        rule: str = "",
    ) -> InputFormatError:
        """Build the error for the first True entry of ``is_bad`` (N,) bool.

        Returns:
            An exception of type ``self.error`` (the caller raises it) such as
            ``events.csv: column 'itemid' has 2 non-numeric value(s); first at line 4 (data row 3): 'x'``.
        """
        rows = np.flatnonzero(is_bad)
        row = int(rows[0])
        shown = (values if values is not None else self.frame[column]).iloc[row]
        return self.error(
            f"{self.path}: column {column!r} has {rows.size} {problem} value(s){rule}; "
            f"first at {self.where(row)}: {shown!r}"
        )

    def check_not_empty(self, column: str) -> None:
        """Raise if a value of ``column`` is empty or whitespace only."""
        is_missing = is_blank(self.frame[column])
        if is_missing.any():
            raise self.fail(is_missing, column, "missing")

    def check_pattern(
        self, column: str, pattern: str | None, values: pd.Series | None = None
    ) -> None:
        """Raise if a value of ``column`` (or ``values``, aligned with the rows) does not fully
        match the regular expression ``pattern``; ``None`` checks nothing."""
        if pattern is None:
            return
        values = self.frame[column] if values is None else values
        is_bad = ~full_match(values, pattern)
        if is_bad.any():
            raise self.fail(is_bad, column, "malformed", values, f" (ids must match {pattern!r})")


def _to_arrow(values: pd.Series) -> pa.Array:
    return pa.array(values.to_numpy(dtype=object), type=pa.string())


def is_blank(values: pd.Series) -> np.ndarray:
    """(N,) bool: the str value is empty or whitespace only (vectorised; ~0.1 s per million)."""
    trimmed = pc.utf8_trim_whitespace(_to_arrow(values))
    return np.asarray(pc.equal(trimmed, "").to_numpy(zero_copy_only=False), dtype=bool)


def full_match(values: pd.Series, pattern: str) -> np.ndarray:
    """(N,) bool: the whole str value matches the regular expression ``pattern``.

    Runs in Arrow's RE2 engine (vectorised); a pattern RE2 cannot compile (look-arounds,
    back-references) falls back to Python's ``re``.
    """
    try:
        matches = pc.match_substring_regex(_to_arrow(values), f"^(?:{pattern})$")
    except pa.ArrowInvalid:
        return values.str.fullmatch(pattern).to_numpy(dtype=bool, na_value=False)
    return np.asarray(matches.to_numpy(zero_copy_only=False), dtype=bool)


def find_file(path: str | Path) -> Path:
    """Return ``path``, or ``path`` plus a compression suffix (``.gz``, ...) when only that exists.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(path)
    if path.is_file():
        return path
    for suffix in COMPRESSION_SUFFIXES:
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: file not found (also tried {', '.join(COMPRESSION_SUFFIXES)} suffixes)"
    )


def read_bytes(
    path: Path, error: type[InputFormatError] = InputFormatError
) -> tuple[bytes, str | None]:
    """Read a file and decompress it according to its first bytes.

    Returns:
        ``(data, compression)``: the decompressed bytes and the detected format (or ``None``).

    Raises:
        error: the archive is damaged or truncated, a zip holds other than one file, or the
            file is zstd-compressed and ``zstandard`` is not installed.
    """
    raw = path.read_bytes()
    kind = next((name for magic, name in _MAGIC if raw.startswith(magic)), None)
    if kind is None:
        return raw, None
    try:
        if kind == "gzip":
            return gzip.decompress(raw), kind
        if kind == "bz2":
            return bz2.decompress(raw), kind
        if kind == "xz":
            return lzma.decompress(raw), kind
        if kind == "zip":
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                members = [m for m in archive.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise error(f"{path}: zip archive must hold exactly one file, found {members}")
                return archive.read(members[0]), kind
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as err:
            raise error(
                f"{path}: file is zstd-compressed; install 'zstandard' or decompress it first"
            ) from err
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw), kind
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zipfile.BadZipFile) as err:
        if isinstance(err, InputFormatError):
            raise
        raise error(f"{path}: {kind}-compressed file is damaged or truncated ({err})") from err


def _decode_check(path: Path, data: bytes, error: type[InputFormatError]) -> bytes:
    """Drop a UTF-8 byte-order mark and check that the rest is UTF-8."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise error(f"{path}: file is UTF-16 encoded; save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(
            f"{path}: line {line}: bytes {data[err.start : err.end]!r} are not UTF-8 "
            f"(byte offset {err.start}); save the file as UTF-8"
        ) from err
    return data


def _line_fields(data: bytes, sep: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``data`` into lines and count separators per line (vectorised).

    Returns:
        ``(line_start, line_end, num_fields)``, each (num_lines,) int64: byte offsets of each line
        without its ``\\n`` (and trailing ``\\r``), and the number of fields (separators + 1; 0 for a
        blank line).
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    newline_pos = np.flatnonzero(arr == ord("\n"))
    if len(data) and data[-1:] != b"\n":
        newline_pos = np.append(newline_pos, len(data))  # last line without a newline
    line_start = np.concatenate([[0], newline_pos[:-1] + 1]).astype(np.int64)
    line_end = newline_pos.astype(np.int64)
    has_cr = (line_end > line_start) & (arr[np.maximum(line_end - 1, 0)] == ord("\r"))
    line_end = line_end - has_cr
    sep_pos = np.flatnonzero(arr == ord(sep))
    num_seps = np.searchsorted(sep_pos, line_end) - np.searchsorted(sep_pos, line_start)
    num_fields = np.where(line_end > line_start, num_seps + 1, 0).astype(np.int64)
    return line_start, line_end, num_fields


def _separator_hint(text: str, sep: str) -> str:
    """' the line contains ';': the file seems semicolon-separated' or ''."""
    found = [s for s in _SEPARATOR_NAMES if s != sep and s in text]
    if not found:
        return ""
    return (
        f"; the line contains {found[0]!r}: the file seems {_SEPARATOR_NAMES[found[0]]}-separated, "
        f"expected {_SEPARATOR_NAMES.get(sep, repr(sep))}-separated"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _looks_like_data(cells: Sequence[str]) -> bool:
    """True when most header cells are numbers (a data row where the header should be)."""
    filled = [c for c in cells if c.strip()]
    return bool(filled) and 2 * sum(_is_number(c) for c in filled) >= len(filled)


def read_table(
    path: str | Path,
    sep: str,
    required: Sequence[str],
    schema: str,
    error: type[InputFormatError] = InputFormatError,
) -> Table:
    """Read a delimited text file strictly (see the module docstring for what is checked).

    Args:
        path: the file (any supported compression, detected from its content).
        sep: the field separator, e.g. ``","`` or ``"\\t"``.
        required: columns that must be in the header; other columns are kept.
        schema: expected header for messages, e.g. ``"timestamp,visitorid,event,itemid"``.
        error: exception class to raise (a subclass of :class:`InputFormatError`).

    Returns:
        The parsed :class:`Table` with at least one data row.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        error: the file is empty, has no data rows, lacks a required column, uses another
            separator, has a line whose field count differs from the header's, or is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    data, compression = read_bytes(path, error)
    data = _decode_check(path, data, error)
    line_start, line_end, num_fields = _line_fields(data, sep)
    non_blank = np.flatnonzero(num_fields > 0)  # (num_non_blank,) 0-based line indices
    if non_blank.size == 0:
        raise error(f"{path}: file is empty (no header row; expected {schema})")

    def text(line: int) -> str:
        return data[line_start[line] : line_end[line]].decode("utf-8")

    header = int(non_blank[0])
    header_cells = [c.strip() for c in text(header).split(sep)]
    missing = [c for c in required if c not in header_cells]
    if missing:
        hints = []
        for column in missing:
            close = difflib.get_close_matches(column, header_cells, n=1, cutoff=0.6)
            if close:
                hints.append(f"{column!r} (is {close[0]!r} meant?)")
        message = (
            f"{path}: line {header + 1} (header): missing required column(s) {missing}; "
            f"present: {header_cells} (expected {schema})"
        )
        if len(header_cells) == 1:
            message += _separator_hint(header_cells[0], sep)
        if _looks_like_data(header_cells):
            message += f"; line {header + 1} looks like a data row: the file needs a header row"
        if hints:
            message += "; " + ", ".join(hints)
        raise error(message)
    data_lines = non_blank[1:]
    if data_lines.size == 0:
        raise error(f"{path}: file is empty (header only, no data rows)")

    expected = len(header_cells)
    is_wrong = num_fields[data_lines] != expected
    if is_wrong.any():
        line = int(data_lines[np.flatnonzero(is_wrong)[0]])
        got = int(num_fields[line])
        row = int(np.flatnonzero(is_wrong)[0])
        where = f"line {line + 1} (data row {row + 1})"
        if got < expected:
            absent = header_cells[got:]
            reason = f"column(s) {absent} are absent"
            if line == len(num_fields) - 1 and not data.endswith(b"\n"):
                reason += "; the last line has no newline: the file looks truncated"
        else:
            reason = "a value contains the separator or the row has extra fields"
        raise error(
            f"{path}: {where} has {got} field(s) but the header has {expected}: {reason}"
            f"{_separator_hint(text(line), sep) if got == 1 else ''}: {text(line)[:80]!r}"
        )

    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            sep=sep,
            dtype=object,
            keep_default_na=False,
            na_filter=False,
            quoting=csv.QUOTE_NONE,
            encoding="utf-8",
        )
    except (pd.errors.ParserError, ValueError) as err:  # the checks above should prevent this
        raise error(f"{path}: cannot parse ({err})") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame) != data_lines.size:
        raise error(
            f"{path}: parsed {len(frame)} data rows but the file has {data_lines.size} data lines"
        )
    return Table(
        path=path,
        frame=frame,
        line_numbers=(data_lines + 1).astype(np.int64),
        compression=compression,
        error=error,
    )
