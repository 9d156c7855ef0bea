"""Torch-free session recommender over an export directory (numpy + onnxruntime only).

Load once with :meth:`SessionRecommender.from_dir`, then call :meth:`SessionRecommender.recommend`
from any number of threads: what calls share (the session-state cache, the memo of sessions'
item indices) is locked, each thread has its own scratch memory for stacking cached states, and
onnxruntime's ``run`` is thread-safe. ``from_dir`` checks the sha256 of the model and
vocabulary files recorded in ``export_meta.json`` and refuses a pair that does not belong together. Both graph layouts of
``seqrec.export`` are served (full scores + numpy top-k, or top-k in the graph); result filters
(``exclude_seen``, allow-list, deny-list) always go through ``seqrec.filters.mask_scores``, the
function offline evaluation uses.

Incremental exports (``ExportVariant(incremental=True)``, the served default) come with a step
graph: the recommender keeps each session's transformer states in a bounded LRU cache
(``seqrec.kv_cache``) and, when a request is a session it saw one item earlier (the widget asks
after every click), computes only the new item's position. Results are the same either way; a
cache miss runs the whole session, except a first click (one item), which the step graph scores
with no past.

Only the standard library, numpy, onnxruntime, cachetools and the numpy-only ``seqrec.sequence`` /
``seqrec.kv_cache`` / ``seqrec.constants`` may be imported here (a test checks that torch and
pandas stay unloaded); ``onnx`` is imported by ``from_dir`` for incremental exports, to cut the
prefill graph's states part out (:func:`prefill_states_graph`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import logging
import math
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn

import numpy as np
import onnxruntime as ort

from seqrec.constants import (
    BLOCK_TOP_K_MIN_WIDTH,
    FORMAT_VERSION,
    GRAPH_OPTIMIZATION_LEVELS,
    INT8_PRECISIONS,
    INT8_SATURATION_SAFE,
    INT8_SCORE_ATOL,
    PAD_IDX,
    PRECISIONS,
)
from seqrec.filters import mask_scores, set_excluded
from seqrec.kv_cache import (
    SessionState,
    StackScratch,
    StateCache,
    past_kv_feed,
    stack_past,
    state_bytes_per_item,
    states_from_prefill,
)
from seqrec.sequence import encode_prefixes, first_repeat

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
VOCAB_FILE = "item_vocab.json"
META_FILE = "export_meta.json"
_REQUIRED_META_KEYS = (
    "max_len",
    "num_items",
    "pad_idx",
    "input_name",
    "output_name",
    "fallback_items",
)

MOST_MAX_LEN = 1 << 16
"""Largest ``max_len`` the predictor accepts (far above any session model's context; attention
memory grows with its square)."""

STEP_CHECK_K = 10
"""Top-k scores compared between the step graph and the whole-session graph at load."""

STEP_CHECK_TOLERANCE = 1e-3
"""Largest gap allowed at load between the states (keys, values, pointer keys) and the top-k
scores a step graph computes and those of the whole-session graph for the same session,
relative to 1 + the largest |value| (both graphs compute the same float32 arithmetic; measured
gaps are below 1e-6). The scores of int8-catalog exports may differ by up to
:data:`~seqrec.constants.INT8_SCORE_ATOL` (one int8 rounding step), as at export."""

ENCODING_MEMO_SESSIONS = 4096
"""Sessions of string ids whose item indices a recommender remembers at most (see
``SessionRecommender._encode``): one entry per visit (each click replaces its session's previous
entry)."""

ENCODING_MEMO_BYTES = 32 * 2**20
"""Memory the remembered sessions may hold, all together, in bytes (the oldest sessions are
forgotten first), counted as :data:`MEMO_BYTES_PER_ID` per id plus one byte per character of
each id: 4,096 visits of 50 clicks with 6-character ids take about 14 MiB, whatever the ids'
lengths the bound holds."""

MEMO_BYTES_PER_ID = 72
"""What one remembered id costs besides its characters: its slot in the session's tuple and in
the tuple of indices (8 bytes each) and the string object's header (about 49 bytes)."""

ID_ARRAY_MAX_BYTES = 64 * 2**20
"""Largest numpy copy of the catalog's ids a recommender keeps for gathering top-k ids (4 bytes
per character of the longest id, per item); above it the ids are looked up one by one."""

_ONLY_STR = {str}
_STR_OR_INT = frozenset((str, int))


def _id_types(items: Sequence[Any]) -> set[type] | None:
    """The set of the ids' exact types; None when a type cannot be hashed (a metaclass with
    ``__hash__ = None``), which :func:`_check_item_ids` then names."""
    try:
        return set(map(type, items))
    except TypeError:
        return None


FALLBACK_SCORE = 0.0
"""Score given to popularity-fallback recommendations; their order is their rank."""


class Recommendation(NamedTuple):
    """One recommended item (an immutable named tuple: a batch of 64 sessions builds 1,280 of
    them, and a tuple is built in half the time of a frozen dataclass).

    Attributes:
        item_id: raw item id (str), as in the training data.
        score: model score (higher is better; comparable only within one response), or
            :data:`FALLBACK_SCORE` (0.0) for popularity-fallback items.
        source: ``"model"`` or ``"fallback"`` (the session had no known item).
    """

    item_id: str
    score: float
    source: Literal["model", "fallback"] = "model"


@dataclass(frozen=True, slots=True)
class RecommendInfo:
    """How a session was handled.

    Attributes:
        num_known: session items found in the catalog (all of them, before truncation to
            ``max_len``).
        num_unknown: session items not in the catalog (skipped).
        used_fallback: True when no item was known and the popularity fallback was returned.
        num_unknown_filter_items: entries of ``allow_items`` and ``deny_items`` not in the
            catalog (ignored: an allow-list of only such items leaves nothing to recommend).
    """

    num_known: int
    num_unknown: int
    used_fallback: bool
    num_unknown_filter_items: int = 0


def _require_file(path: Path) -> None:
    """Refuse a path that is not a readable regular file, saying what it is instead.

    Raises:
        FileNotFoundError: missing, a directory, a broken or looping symbolic link, or not a
            regular file (a FIFO, a device); the message names the path and which.
    """
    if path.is_file():
        return
    if path.is_dir():
        raise FileNotFoundError(f"export file {path} is a directory, expected a file")
    if os.path.lexists(path):
        kind = (
            "a symbolic link to no regular file (broken, looping, or to a device)"
            if path.is_symlink()
            else "not a regular file"
        )
        raise FileNotFoundError(f"export file {path} is {kind}")
    raise FileNotFoundError(f"missing export file: {path}")


def _not_json_constant(name: str) -> Any:
    """``json.loads``'s ``parse_constant``: NaN and Infinity are not JSON (Python's reader takes
    them, and a later JSON writer refuses them, e.g. the service's ``/readyz``)."""
    raise ValueError(f"{name} is not a JSON value")


def _read_json(path: Path) -> Any:
    _require_file(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_not_json_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    except RecursionError as exc:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _check_meta(meta: Any, path: Path) -> None:
    """Refuse an ``export_meta.json`` whose values the predictor cannot use, naming the key, the
    value and the type wanted (rather than failing later inside numpy or onnxruntime, or serving
    a graph the metadata describes wrongly).

    Raises:
        ValueError: not a JSON object; a required key missing; a value of the wrong type or out
            of range (``pad_idx`` not 0, ``max_len`` / ``num_items`` not an integer >= 1, a
            ``format_version`` newer than this seqrec reads, an unknown ``variant.precision``,
            ``variant.top_k_in_graph`` not true/false, an ``incremental`` section without its
            step graph, ...).
    """
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [key for key in _REQUIRED_META_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")

    def refuse(key: str, want: str) -> NoReturn:
        section, _, sub_key = key.partition(".")
        value = meta.get(section) if not sub_key else (meta.get(section) or {}).get(sub_key)
        raise ValueError(f"{path}: {key} is {value!r:.80}, expected {want}")

    def is_int(value: Any, minimum: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    def is_str_list(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if meta["pad_idx"] != PAD_IDX or type(meta["pad_idx"]) is not int:  # not False, not 0.0
        refuse("pad_idx", str(PAD_IDX))
    for key in ("max_len", "num_items"):
        if not is_int(meta[key], 1):
            refuse(key, "an integer >= 1")
    if meta["max_len"] > MOST_MAX_LEN:
        refuse("max_len", f"at most {MOST_MAX_LEN:,} (a session model's context)")
    if "format_version" in meta and not is_int(meta["format_version"], 1):
        refuse("format_version", "an integer >= 1")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        refuse(
            "format_version",
            f"at most {FORMAT_VERSION}: the export was written by a newer seqrec; upgrade seqrec "
            "to load it",
        )
    for key in ("input_name", "output_name"):
        if not isinstance(meta[key], str):
            refuse(key, "a string")
    if "model_version" in meta and not (
        isinstance(meta["model_version"], str) and 0 < len(meta["model_version"]) <= 64
    ):
        refuse("model_version", "a string of 1 to 64 characters")
    if not isinstance(meta.get(INT8_SATURATION_SAFE, False), bool):
        refuse(INT8_SATURATION_SAFE, "true or false")
    for key in ("input_names", "output_names"):
        if key in meta and not is_str_list(meta[key]):
            refuse(key, "a list of strings")
    if not isinstance(meta["fallback_items"], list) or not all(
        isinstance(i, str | int) and not isinstance(i, bool) for i in meta["fallback_items"]
    ):
        refuse("fallback_items", "a list of item ids")
    for key in ("n_layers", "d_model"):
        if key in meta and not is_int(meta[key], 1):
            refuse(key, "an integer >= 1")
    variant = meta.get("variant", {})
    if not isinstance(variant, dict):
        refuse("variant", "an object")
    for key in ("top_k_in_graph", "incremental"):
        if not isinstance(variant.get(key, False), bool):
            refuse(f"variant.{key}", "true or false")
    if variant.get("precision", "fp32") not in PRECISIONS:
        refuse("variant.precision", f"one of {list(PRECISIONS)}")
    if variant.get("graph_optimization_level", "all") not in GRAPH_OPTIMIZATION_LEVELS:
        refuse("variant.graph_optimization_level", f"one of {list(GRAPH_OPTIMIZATION_LEVELS)}")
    if not isinstance(meta.get("sha256", {}), dict):
        refuse("sha256", "an object of file name -> hex digest")
    if not isinstance(meta.get("empty_score_mask", False), bool):
        refuse("empty_score_mask", "true or false")
    if meta.get("top_k_block_size") is not None and not is_int(meta["top_k_block_size"], 2):
        refuse("top_k_block_size", "null or an integer >= 2")
    if meta.get("format_version", 1) < 2 and ("variant" in meta or "incremental" in meta):
        refuse(
            "format_version",
            "2: variants and step graphs came with format 2, whose sha256 section is required "
            "(a format 1 export is loaded without integrity check)",
        )
    incremental = meta.get("incremental")
    if incremental is None:
        if variant.get("incremental"):
            refuse("incremental", "an object naming the step graph (variant.incremental is true)")
        return
    if not isinstance(incremental, dict):
        refuse("incremental", "an object")
    if not isinstance(incremental.get("step_file"), str):
        refuse("incremental.step_file", "a file name")
    if not is_str_list(incremental.get("step_input_names")):
        refuse("incremental.step_input_names", "a list of strings")
    step_file = incremental["step_file"]
    if (
        not step_file
        or Path(step_file).name != step_file
        or step_file in (".", "..", META_FILE, MODEL_FILE, VOCAB_FILE)
    ):
        refuse(
            "incremental.step_file",
            f"the file name of the step graph in the export directory (no path; not {META_FILE}, "
            f"{MODEL_FILE} or {VOCAB_FILE})",
        )
    for key in ("n_layers", "d_model"):
        if key not in meta:
            refuse(key, "an integer >= 1 (an incremental export)")
    if "output_names" not in meta:
        refuse("output_names", "a list of strings (an incremental export)")
    if variant.get("incremental") is False:
        refuse("variant.incremental", "true (the metadata has an incremental section)")
    if variant.get("precision", "fp32") not in ("fp32", "int8_catalog"):  # what export writes
        refuse("variant.precision", "'fp32' or 'int8_catalog' (an incremental export)")


_ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    error
    for name in (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    if isinstance(error := getattr(ort.capi.onnxruntime_pybind11_state, name, None), type)
)
"""onnxruntime's own exception classes (they derive from Exception only)."""


def _load_graph(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session of the ONNX file ``path``.

    Raises:
        OSError: the file cannot be read (e.g. PermissionError).
        ValueError: onnxruntime cannot load the file (damaged, truncated, not ONNX, or an
            operator this onnxruntime lacks); the message names the file and onnxruntime's
            error.
    """
    path.open("rb").close()  # an unreadable file: PermissionError naming it, not "damaged"
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        raise ValueError(
            f"{path}: onnxruntime {ort.__version__} cannot load this model ({_reason(exc)}); the "
            "file is damaged or not an ONNX model from seqrec's export: copy the export directory "
            "again or re-export"
        ) from exc


def prefill_states_graph(
    path: Path,
    options: ort.SessionOptions,
    input_name: str,
    state_names: Sequence[str],
    model: Any = None,
) -> ort.InferenceSession:
    """An onnxruntime session of the part of the prefill graph ``path`` (``model.onnx`` of an
    incremental export) that computes the states: ``input_name`` (B, L) int64 in, the outputs
    ``state_names`` (``present_kv`` and, for copy models, ``present_copy_keys``) out, without
    the scoring nodes and the catalog table they read.

    onnxruntime runs every node of a graph whatever outputs are fetched, so the subgraph is cut
    out with ``onnx.utils.Extractor`` (the ``onnx`` package, imported here only, at load). Its
    nodes and weights are the prefill graph's own, so it returns the prefill graph's states, up
    to float32 rounding where onnxruntime fuses its nodes differently (1 ulp seen). ``model``:
    the file's ``ModelProto`` when the caller has read it already (None: read here).

    Raises:
        ValueError: the file has no such inputs and outputs (the message names the file).
    """
    import onnx
    import onnx.utils
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path)) if model is None else model
        states = onnx.utils.Extractor(model).extract_model([input_name], list(state_names))
        return ort.InferenceSession(
            states.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except (*_ORT_ERRORS, ValueError, KeyError, DecodeError, onnx.checker.ValidationError) as exc:
        raise ValueError(
            f"{path}: cannot cut the states graph ({input_name} -> {list(state_names)}) out of "
            f"this prefill graph ({_reason(exc)}); re-export the model"
        ) from exc


def onnx_graphs(graph: Any) -> list[Any]:
    """An ONNX ``GraphProto`` and every subgraph in it (``If`` branches), depth first."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                found += onnx_graphs(attr.g)
    return found


def _check_finite_weights(paths: Sequence[Path]) -> dict[Path, Any]:
    """Refuse graphs whose floating-point weights hold NaN or infinity.

    The load check scores one session and refuses a model that scores NaN or +inf, because
    ``TopK`` ranks a NaN score first. A top-k over blocks of items
    (``seqrec.incremental.block_top_k``, ``top_k_block_size`` in the metadata) may leave a NaN
    out instead, so for exports whose catalog is large enough to get one
    (:data:`~seqrec.constants.BLOCK_TOP_K_MIN_WIDTH` items or more, whatever the metadata says:
    it has no hash) the weights themselves are checked: only damaged weights
    (a bad training run, a broken copy with its hash regenerated) make seqrec's graphs score
    NaN. Reads each file with the ``onnx`` package (imported here only).

    Returns:
        ``{path: ModelProto}`` of the files read (the states graph is cut from it).

    Raises:
        ValueError: a weight (initializer) holds NaN or infinity; the message names the file,
            the initializer and the count.
    """
    import onnx
    from onnx import numpy_helper

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    models = {path: onnx.load(str(path)) for path in paths}
    for path, model in models.items():
        for graph in onnx_graphs(model.graph):
            for tensor in graph.initializer:
                if tensor.data_type not in floats:
                    continue
                bad = int(np.count_nonzero(~np.isfinite(numpy_helper.to_array(tensor))))
                if bad:
                    raise ValueError(
                        f"{path}: the weights {tensor.name!r} hold {bad} NaN or infinite "
                        "values, so the model would return NaN or infinite scores; it is damaged "
                        "(a diverged training run, or a broken file whose hash was regenerated): "
                        "re-export it from a good checkpoint"
                    )
    return models


def _check_catalog_width(
    session: ort.InferenceSession, path: Path, num_items: int, vocab_path: Path
) -> None:
    """Refuse a graph whose score columns (its ``score_mask`` input or ``scores`` output, where
    the width is fixed) are not ``num_items + 1`` (the padding index 0 and each item).

    Raises:
        ValueError: naming both files and both counts.
    """
    widths = [i.shape[-1] for i in session.get_inputs() if i.name == "score_mask"]
    widths += [o.shape[-1] for o in session.get_outputs() if o.name == "scores"]
    for width in widths:
        if isinstance(width, int) and width != num_items + 1:
            raise ValueError(
                f"{path} scores {width - 1} items (and the padding index 0), but {vocab_path} "
                f"lists {num_items}: the two files come from different exports; re-export"
            )


def _reason(exc: BaseException) -> str:
    """``"<exception type>: <first line of its message>"`` (at most 300 characters of it)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else '(no message)'}"


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, skipping columns set to ``-inf``.

    Args:
        scores: (C,) float scores; excluded columns hold ``-inf``.
        k: number wanted (>= 1).

    Returns:
        (K,) int64 item indices, K = min(k, number of non-excluded columns), by descending score;
        ties go to the lower index so results are deterministic.
    """
    num_available = int(np.count_nonzero(scores > -np.inf))
    k = min(k, num_available)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    cut = scores[part].min()
    candidates = np.flatnonzero(scores >= cut)  # every item tied with the k-th best is included
    order = np.lexsort((candidates, -scores[candidates]))  # primary: score desc, then index asc
    return candidates[order[:k]].astype(np.int64)


class ArtifactIntegrityError(ValueError):
    """The files of an export directory do not belong together (sha256 mismatch)."""


class NonFiniteScoresError(RuntimeError):
    """The model scored a session NaN or +inf (damaged or overflowing weights): no ranking of
    such scores is meaningful, and JSON cannot carry them. ``from_dir`` checks one session at
    load; a model that fails only on some sessions raises this at call time."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_hashes(directory: Path, meta: dict[str, Any], with_step: bool = True) -> None:
    """Refuse model / step graph / vocabulary files whose sha256 differs from ``export_meta.json``.

    Exports of format 1 carry no hashes: they load with a warning. ``with_step=False`` skips the
    step graph of an incremental export (not loaded when the state cache is off).

    Raises:
        FileNotFoundError: a hashed file is missing.
        ArtifactIntegrityError: a recorded hash does not match, or a format >= 2 export has none.
    """
    hashes = meta.get("sha256")
    if not hashes:
        if int(meta.get("format_version", 1)) >= 2:
            raise ArtifactIntegrityError(
                f"{directory / META_FILE}: no 'sha256' section; cannot check that "
                f"{MODEL_FILE} and {VOCAB_FILE} belong together (re-export the model)"
            )
        logger.warning("%s: format 1 export without sha256; integrity not checked", directory)
        return
    step_file = (meta.get("incremental") or {}).get("step_file")
    names = (MODEL_FILE, VOCAB_FILE) + ((step_file,) if step_file and with_step else ())
    for name in names:
        _require_file(directory / name)
        want = hashes.get(name)
        got = file_sha256(directory / name)
        if want != got:
            raise ArtifactIntegrityError(
                f"artifact integrity check failed in {directory}: {name} has sha256 {got[:16]}..., "
                f"but {META_FILE} records {str(want)[:16]}...; the files are not from the same "
                f"export. Copy {', '.join(names)} and {META_FILE} together from one export "
                "directory (or re-export)."
            )


def _check_item_ids(items: Sequence[Any], what: str) -> None:
    """Refuse ids that are neither strings nor integers (a float id such as 1001.0, e.g. from a
    pandas column with missing values, would otherwise become the unknown id "1001.0", and a
    catalog id "1.0" or "True" would take the float 1.0 or the bool True). Called before the
    catalog lookup when some id is not exactly a ``str`` or an ``int`` (numpy ids, bools,
    floats...), so sessions of plain strings or ints pay one ``set(map(type, ...))``.

    Raises:
        TypeError: naming ``what``, the position and the value.
        ValueError: an integer id too long for ``str`` (more than 4,300 digits).
    """
    for position, item in enumerate(items):
        if type(item) is str:  # the common case, checked first
            continue
        if isinstance(item, bool | np.bool_) or not isinstance(item, str | int | np.integer):
            raise TypeError(
                f"{what}: item ids must be strings or integers, got {type(item).__name__} "
                f"{item!r:.40} at position {position}"
            )
        try:
            str(item)
        except ValueError as exc:  # Python refuses str() of integers of > 4,300 digits
            raise ValueError(
                f"{what}: the item id at position {position} is an integer of "
                f"{item.bit_length()} bits, too long to be an id ({exc})"
            ) from exc


@functools.lru_cache(maxsize=64)
def _k_input(k: int) -> np.ndarray:
    """The top-k graphs' ``k`` input: (1,) int64, read-only, made once per k (a new array per
    call cost about 8 us right after a graph call on the AMD VM)."""
    k_arr = np.array([k], dtype=np.int64)
    k_arr.flags.writeable = False
    return k_arr


def _filter_list(items: Any, what: str) -> list[Any] | None:
    """``allow_items`` or ``deny_items`` (named by ``what``) as a list (read once, even from a
    generator); None stays None.

    Raises:
        TypeError: a single string, or not a collection of ids (e.g. a bare id), naming ``what``.
    """
    if items is None:
        return None
    if isinstance(items, str | bytes):
        raise TypeError(f"{what} must be a sequence of item ids, not a string")
    if isinstance(items, Mapping):
        raise TypeError(f"{what} must be a collection of item ids, not a mapping: {items!r:.80}")
    if not hasattr(items, "__iter__"):
        raise TypeError(f"{what} must be a collection of item ids, got {items!r:.80}")
    try:
        return list(items)
    except TypeError as exc:  # e.g. a 0-d numpy array, which has __iter__ but cannot iterate
        raise TypeError(
            f"{what} must be a collection of item ids, got {items!r:.80} ({exc})"
        ) from None


def _session_list(session: Any) -> list[Any]:
    """One session of a batch as a list (read once, even from a generator).

    Raises:
        TypeError: a string, a set or dict (no "oldest first"), or not a sequence of ids (a bare
            id, a 0-d numpy array).
    """
    if isinstance(session, str | bytes | AbstractSet | Mapping) or not hasattr(
        session, "__iter__"
    ):  # an unordered set or dict has no "oldest first"
        hint = (
            " (ids oldest first: a set or dict has no order)"
            if isinstance(session, AbstractSet | Mapping)
            else " (a session is a list of ids; recommend_batch takes a list of sessions)"
        )
        raise TypeError(f"a session must be a sequence of item ids, got {session!r:.80}{hint}")
    try:
        return list(session)
    except TypeError as exc:  # e.g. a 0-d numpy array: __iter__, but no iteration
        raise TypeError(
            f"a session must be a sequence of item ids, got {session!r:.80} ({exc})"
        ) from None


def _graph_optimization_level(name: str) -> ort.GraphOptimizationLevel:
    """onnxruntime's level for one of :data:`GRAPH_OPTIMIZATION_LEVELS`.

    Raises:
        ValueError: any other value (the message lists the names).
    """
    if not isinstance(name, str) or name not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(
            f"graph_optimization_level must be one of {list(GRAPH_OPTIMIZATION_LEVELS)}, got "
            f"{name!r:.80}"
        )
    levels = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    )
    return levels[GRAPH_OPTIMIZATION_LEVELS.index(name)]


class SessionRecommender:
    """Next-item recommendations for sessions of raw item ids, from an ONNX export directory.

    One instance is safe to share between threads: the only per-call state is the session-state
    cache (locked, immutable arrays) and the memo of sessions' item indices (locked, immutable
    tuples); the masks are read-only and ``InferenceSession.run`` is thread-safe.
    """

    top_k_max_seen = 64
    """``exclude_seen`` without allow/deny lists, on a top-k export, asks the graph for the
    unmasked top (k + the most distinct items a session of the batch has seen) and drops each
    row's seen items, which ranks as the -inf mask does, when no session of the batch has seen
    more than this many distinct items; otherwise the mask is sent. Measured on the 37,000-item
    export (AMD VM, one thread): without the mask one session took 2.60 against 2.77 ms (5 seen
    items) and 3.93 against 4.04 ms (200), and a batch of 64 sessions of 10 items 30.1 against
    34.6 ms; but one session of 200 distinct items in a batch of 64 made the batch 28-30 ms
    against 25-26 ms with the mask (the top-k and the dropping grow with k + seen for every
    row)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        item_ids: list[str],
        meta: dict[str, Any],
        step_session: ort.InferenceSession | None = None,
        state_cache: StateCache | None = None,
        prefill_states: ort.InferenceSession | None = None,
    ) -> None:
        """Wrap a loaded graph; prefer :meth:`from_dir`.

        Args:
            session: onnxruntime session of ``model.onnx``.
            item_ids: raw ids in index order (``item_ids[i - 1]`` has index i).
            meta: contents of ``export_meta.json`` (validated by :meth:`from_dir`).
            step_session: onnxruntime session of the step graph of an incremental export.
            state_cache: where session states are kept between calls (incremental exports);
                None runs every session whole.
            prefill_states: the states part of ``model.onnx`` (:func:`prefill_states_graph`):
                in a batch that mixes cached and new sessions, the new ones' states before
                their newest item come from it and every session is scored in one step-graph
                call. None: such a batch runs both graphs, each on its sessions.
        """
        self._session = session
        self._step_session = step_session
        self._step_input_names = (
            () if step_session is None else tuple(arg.name for arg in step_session.get_inputs())
        )
        self._state_cache = state_cache if step_session is not None else None
        self._scratch = StackScratch()  # per-thread memory of the stacked states
        self._is_copy = "present_copy_keys" in (meta.get("output_names") or [])
        self._empty_state: SessionState | None = None  # see _no_past
        self._prefill_states = prefill_states
        # one new session: the states graph, then the step graph (see _run_incremental); the
        # load check turns it off to run the whole graph on one session
        self._split_new_session = True
        self._item_ids = list(item_ids)
        # the raw id of each item index (PAD_IDX has none), for the top-k rows
        self._id_of_index: tuple[str | None, ...] = (None, *self._item_ids)
        # the same as a numpy string array, when it is small and keeps every id (numpy's
        # fixed-width strings drop trailing NUL characters): gathering a top-k's ids from it
        # reads one compact array instead of one scattered string object per item (64 x 20 ids
        # right after streaming 40 MB: 0.23 against 0.72 ms, AMD VM)
        longest = max(map(len, self._item_ids), default=0)
        self._id_array: np.ndarray | None = None
        if 4 * max(longest, 1) * (len(self._item_ids) + 1) <= ID_ARRAY_MAX_BYTES and not any(
            item_id.endswith("\0") for item_id in self._item_ids
        ):  # (sized before it is built: one very long id would make it huge)
            self._id_array = np.array(["", *self._item_ids], dtype=np.str_)
        self._index = {item_id: idx for idx, item_id in enumerate(self._item_ids, start=1)}
        # session of string ids -> (its known item indices, its number of unknown ids)
        # (and the entry's size, counted as ENCODING_MEMO_BYTES says)
        self._encoding_memo: OrderedDict[tuple[str, ...], tuple[tuple[int, ...], int, int]] = (
            OrderedDict()
        )
        self._memo_bytes = 0  # what the memo holds, counted as ENCODING_MEMO_BYTES says
        self._memo_lock = threading.Lock()
        self._meta = meta
        self._max_len = int(meta["max_len"])
        self._input_name = str(meta["input_name"])
        self._output_name = str(meta["output_name"])
        self._top_k_in_graph = bool(meta.get("variant", {}).get("top_k_in_graph", False))
        self._fallback_ids = [str(i) for i in meta["fallback_items"]]
        num_columns = len(self._item_ids) + 1
        # the score mask of requests without filters (read-only, shared): (0, C) where the
        # export's top-k graphs skip an empty mask (seqrec.incremental.skip_empty_score_mask),
        # else (1, C) excluding PAD only
        if meta.get("empty_score_mask", False):
            self._unfiltered_mask = np.zeros((0, num_columns), dtype=np.float32)
        else:
            self._unfiltered_mask = mask_scores(np.zeros((1, num_columns), dtype=np.float32), [[]])
        self._unfiltered_mask.flags.writeable = False
        self._run_options: ort.RunOptions | None = None  # the load check runs quietly
        self._non_finite_message = (
            f"the model (version {meta.get('model_version', 'unknown')}) returned NaN or "
            "infinite scores: its weights are damaged or overflow; re-export it"
        )

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        num_threads: int = 1,
        graph_optimization_level: str | None = None,
        verify_integrity: bool = True,
        state_cache_mb: float = 256.0,
    ) -> SessionRecommender:
        """Load ``model.onnx``, ``item_vocab.json`` and ``export_meta.json`` from ``path``.

        Args:
            path: export directory written by ``seqrec.export.export_onnx``.
            num_threads: onnxruntime intra-op threads (keep 1 when several recommenders or worker
                processes share the cores; inter-op threads are always 1).
            graph_optimization_level: ``disable`` / ``basic`` / ``extended`` / ``all``; ``None``
                takes the level recorded at export (``variant.graph_optimization_level``, else
                ``all``).
            verify_integrity: check the sha256 of ``model.onnx`` and ``item_vocab.json`` (and the
                step graph) against the metadata (a few ms per 10 MB).
            state_cache_mb: memory bound of the session-state cache of an incremental export, in
                MiB (finite, >= 0; 0 = no cache: every session runs whole and the step graph is
                not loaded). One state is kept per visit: n * (2 * n_layers + 1) * d_model
                float32 values for n items (without the copy mechanism n * 2 * n_layers *
                d_model), e.g. 62.5 KiB for 25 items at d_model 128 with 2 layers; the least
                recently used are evicted. Ignored for other exports.

        Raises:
            FileNotFoundError: the directory (or an empty path) or one of the three files is
                missing.
            OSError: a file exists but cannot be read (PermissionError names it).
            ArtifactIntegrityError: (a ValueError) the model or vocabulary file is not the one
                the metadata was written for.
            ValueError: a file is malformed: not UTF-8 JSON, missing keys, metadata values of
                the wrong type or range (see ``_check_meta``), PAD index not 0, vocab size
                differs from ``num_items`` in the metadata, fallback items outside the vocab, a
                graph onnxruntime cannot load (damaged file), graph input/output names that do
                not match the metadata, metadata the graphs cannot run with, or a model that
                scores NaN or +inf (a session of ``max_len`` items is scored at load; exports
                of 20,000 items or more also have their weights checked for NaN and
                infinity); a thread
                count below 1 or above max(64, 8 per core), or a bad level; ``state_cache_mb``
                not a finite number >= 0 or too small for one item's state.
        """
        if isinstance(num_threads, bool) or not isinstance(num_threads, int | np.integer):
            raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        most_threads = max(64, 8 * (os.cpu_count() or 1))
        if num_threads > most_threads:
            raise ValueError(
                f"num_threads={num_threads} is more than {most_threads} (64, or 8 per core of "
                "this machine if that is more); onnxruntime would start that many threads"
            )
        if (
            isinstance(state_cache_mb, bool)
            or not isinstance(state_cache_mb, numbers.Real)
            or not 0 <= state_cache_mb < float("inf")
        ):
            raise ValueError(f"state_cache_mb must be a finite number >= 0, got {state_cache_mb!r}")
        if isinstance(path, str) and not path.strip():  # Path("") is the working directory
            raise FileNotFoundError(
                f"export directory not given (the path is {path!r}); pass the directory that "
                f"holds {MODEL_FILE}, {VOCAB_FILE} and {META_FILE}"
            )
        directory = Path(path)
        if directory.is_file():
            raise FileNotFoundError(
                f"not an export directory: {directory} is a file; pass the directory that "
                f"holds {MODEL_FILE}, {VOCAB_FILE} and {META_FILE} ({directory.parent})"
            )
        if not directory.is_dir():
            raise FileNotFoundError(f"export directory not found: {directory}")
        meta_path, vocab_path, model_path = (
            directory / META_FILE,
            directory / VOCAB_FILE,
            directory / MODEL_FILE,
        )
        meta = _read_json(meta_path)
        _check_meta(meta, meta_path)
        _require_file(model_path)
        _require_file(vocab_path)
        if verify_integrity:
            _verify_hashes(directory, meta, with_step=state_cache_mb > 0)

        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict):
            raise ValueError(
                f"{vocab_path}: expected a JSON object with pad_idx and item_ids, got "
                f"{type(vocab).__name__} {vocab!r:.40}"
            )
        if not isinstance(vocab.get("item_ids"), list):
            raise ValueError(f"{vocab_path}: missing key 'item_ids' (a list of raw ids)")
        if vocab.get("pad_idx") != PAD_IDX or type(vocab.get("pad_idx")) is not int:
            raise ValueError(
                f"{vocab_path}: pad_idx is {vocab.get('pad_idx')!r}, expected {PAD_IDX}"
            )
        for position, item in enumerate(vocab["item_ids"]):
            if not (isinstance(item, str) and item) and (
                isinstance(item, bool) or not isinstance(item, int)
            ):
                raise ValueError(
                    f"{vocab_path}: item_ids[{position}] is {item!r:.80}, expected a non-empty "
                    "string or an integer"
                )
        item_ids = [str(i) for i in vocab["item_ids"]]
        if len(item_ids) != int(meta["num_items"]):
            raise ValueError(
                f"{vocab_path} has {len(item_ids)} items but {meta_path} says "
                f"num_items={meta['num_items']}"
            )
        repeat = first_repeat(item_ids)  # of the str ids: 1001 and "1001" are one id
        if repeat is not None:
            first, second = repeat
            raise ValueError(
                f"{vocab_path}: duplicate item id {item_ids[second]!r:.80} at item_ids[{first}] "
                f"and item_ids[{second}]"
            )
        known = set(item_ids)
        unknown_fallback = [str(i) for i in meta["fallback_items"] if str(i) not in known]
        if unknown_fallback:
            raise ValueError(
                f"{meta_path}: fallback_items not in the vocab: {unknown_fallback[:5]}"
            )

        precision = meta.get("variant", {}).get("precision", "fp32")
        if precision in INT8_PRECISIONS and meta.get(INT8_SATURATION_SAFE) is not True:
            logger.warning(
                "%s: this %s export was made before seqrec kept one side of its integer "
                "products at 7 bits; on x86 CPUs without VNNI (AVX2 only, e.g. many AMD EPYC and "
                "older Intel Xeon) onnxruntime's kernel can saturate and return wrong scores. "
                "Re-export the model with this version.",
                meta_path,
                precision,
            )
        # the file's level was checked by _check_meta; the caller's is checked here
        level = graph_optimization_level
        if level is None:  # "" is the caller's (refused below), not "take the file's"
            level = meta.get("variant", {}).get("graph_optimization_level", "all")
        optimization = _graph_optimization_level(level)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = optimization
        session = _load_graph(model_path, options)
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        want_inputs = list(meta.get("input_names", [meta["input_name"]]))
        want_outputs = meta.get("output_names", outputs)
        if inputs != want_inputs or meta["output_name"] != outputs[0] or outputs != want_outputs:
            raise ValueError(
                f"{model_path}: graph has inputs {inputs} / outputs {outputs}, but {meta_path} "
                f"names {want_inputs} -> {meta['output_name']!r}"
                + (f" (output_names {want_outputs})" if outputs != want_outputs else "")
            )
        _check_catalog_width(session, model_path, len(item_ids), vocab_path)
        step_session, state_cache, prefill_states = None, None, None
        incremental = meta.get("incremental")
        if incremental and state_cache_mb > 0:
            step_path = directory / str(incremental.get("step_file", ""))
            _require_file(step_path)
            step_session = _load_graph(step_path, options)
            step_inputs = [i.name for i in step_session.get_inputs()]
            if step_inputs != list(incremental.get("step_input_names", [])):
                raise ValueError(
                    f"{step_path}: graph has inputs {step_inputs}, but {meta_path} names "
                    f"{incremental.get('step_input_names')}"
                )
            _check_catalog_width(step_session, step_path, len(item_ids), vocab_path)
        models: dict[Path, Any] = {}  # graphs read with onnx, each once
        # a top-k over blocks may leave a NaN out; the catalog size, not the unhashed metadata,
        # says whether the export may have one
        if len(item_ids) >= BLOCK_TOP_K_MIN_WIDTH or meta.get("top_k_block_size") is not None:
            models = _check_finite_weights([model_path, *([step_path] if step_session else [])])
        if step_session is not None:
            state_names = [n for n in outputs if n in ("present_kv", "present_copy_keys")]
            prefill_states = prefill_states_graph(
                model_path, options, str(meta["input_name"]), state_names, models.get(model_path)
            )
            state_cache = StateCache(max(1, int(state_cache_mb * 2**20)))  # size checked below
        recommender = cls(session, item_ids, meta, step_session, state_cache, prefill_states)
        recommender._self_check(meta_path)
        if state_cache is not None:  # n_layers and d_model were checked against the graph
            one_item_bytes = state_bytes_per_item(
                int(meta["n_layers"]),
                int(meta["d_model"]),
                "present_copy_keys" in meta["output_names"],
            )
            if state_cache_mb * 2**20 < one_item_bytes:
                raise ValueError(
                    f"state_cache_mb={state_cache_mb!r} cannot hold the state of a single item "
                    f"({one_item_bytes} bytes for n_layers={meta['n_layers']}, d_model="
                    f"{meta['d_model']} in {meta_path}); use 0 to turn the cache off"
                )
        logger.info(
            "loaded %s: %d items, max_len %d, exporter %s, variant %s, %d thread(s), level %s, "
            "state cache %s",
            directory,
            len(item_ids),
            int(meta["max_len"]),
            meta.get("exporter", "?"),
            meta.get("variant", "fp32 scores"),
            num_threads,
            level,
            f"{state_cache_mb:g} MiB" if state_cache else "off",
        )
        return recommender

    def _self_check(self, meta_path: Path) -> None:
        """Check at load that the metadata fits the graphs and the model scores finite numbers,
        instead of failing on the first request (or serving sessions cut short):

        - ``model.onnx`` scores one item; for an incremental export its ``present_kv`` must
          have the ``n_layers`` and ``d_model`` of the metadata;
        - it must refuse a session of ``max_len + 1`` items: ``max_len`` is the model's context
          (a smaller value would silently drop the oldest items of longer sessions);
        - a session of ``max_len`` items is recommended for (and, with a state cache, its step
          from ``max_len - 1`` items), with finite scores;
        - with a state cache (and ``max_len >= 3``), a session of ``max_len - 1`` items
          computed by the step graph and computed whole gives the same states and top-k scores
          (see :meth:`_compare_step`; a step graph copied from another export would answer the
          second click of every session differently from the first).

        onnxruntime's own error log lines are silenced for these calls (the raised error carries
        the same message).

        Raises:
            ValueError: a graph refused a call, or accepted the longer session, or returned NaN
                / infinite scores; the message names the file.
        """
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # fatal only
        self._run_options = quiet
        self._split_new_session = False  # a new session's first call: the whole graph
        # the check keeps its states in a cache of its own: the caller's may be too small for
        # one (that is refused after the check, with its own message)
        callers_cache = self._state_cache
        if callers_cache is not None:
            self._state_cache = StateCache(1 << 30)
        meta, model_path = self._meta, meta_path.parent / MODEL_FILE
        stepped = False
        try:
            present_kv_shape: tuple[int, ...] = ()
            if meta.get("incremental"):
                one = self._run_raw(1)
                present_kv_shape = one[2].shape
                if self._state_cache is not None:  # the first click's past, from this run
                    self._no_past(one)
            try:
                self._run_raw(self._max_len + 1)
                longer_scored = True
            except _ORT_ERRORS:  # the model's context ends at max_len, as the metadata says
                longer_scored = False
            # distinct items (as many as the catalog has), ending with the first item of the
            # vocabulary twice: it is the newest item of both graphs' calls
            n, last = self.num_items, self._max_len - 2
            session = [self._item_ids[(i - last) % n] for i in range(self._max_len - 1)]
            session.append(self._item_ids[0])
            k, scored_by = min(STEP_CHECK_K, n), model_path
            step_path = meta_path.parent / str(meta.get("incremental", {}).get("step_file", ""))
            stepped = self._state_cache is not None and self._max_len > 2
            if stepped:  # a step from max_len - 2 items, kept to compare with the whole session
                self.recommend_batch([session[:-2]], k=1)
                scored_by = step_path
                step_top = self.recommend_batch([session[:-1]], k=k)[0]
                step_state = self._state_cache.lookup(self._window(session))  # type: ignore[union-attr]
            else:
                self.recommend_batch([session[:-1]] if self._max_len > 1 else [], k=1)
                if self._state_cache is not None and self._max_len > 1:  # the step graph's turn
                    scored_by = step_path
            self.recommend_batch([session], k=1)
            if stepped:  # the same max_len - 1 items whole, without cached states
                self.clear_state_cache()
                scored_by = model_path
                whole_top = self.recommend_batch([session[:-1]], k=k)[0]
                whole_state = self._state_cache.lookup(self._window(session))  # type: ignore[union-attr]
        except NonFiniteScoresError as exc:
            raise ValueError(f"{scored_by}: {exc}") from exc
        except (*_ORT_ERRORS, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{meta_path} does not fit its graphs: scoring a session of max_len="
                f"{self._max_len} items failed ({_reason(exc)}); re-export the model"
            ) from exc
        finally:
            self._run_options = None
            self._split_new_session = True
            self._state_cache = callers_cache
        if stepped:
            precision = meta.get("variant", {}).get("precision", "fp32")
            self._compare_step(step_top, whole_top, step_state, whole_state, precision, step_path)
        if present_kv_shape:  # (2 * n_layers, B, H, 1, Dh)
            layers2, _, heads, _, head_dim = present_kv_shape
            if (layers2, heads * head_dim) != (2 * meta["n_layers"], meta["d_model"]):
                raise ValueError(
                    f"{meta_path}: n_layers is {meta['n_layers']} and d_model {meta['d_model']}, "
                    f"but {model_path} has {layers2 // 2} block(s) of width {heads * head_dim}"
                )
            if "n_heads" in meta and meta["n_heads"] != heads:
                raise ValueError(
                    f"{meta_path}: n_heads is {meta['n_heads']!r:.80}, but {model_path} has "
                    f"{heads} attention heads"
                )
        if longer_scored:
            raise ValueError(
                f"{meta_path}: max_len is {self._max_len}, but {model_path} also scores sessions "
                f"of {self._max_len + 1} items: the model's context is longer, and longer "
                "sessions would be cut short; correct max_len or re-export"
            )

    def _window(self, session: list[str]) -> tuple[int, ...]:
        """The state-cache key of ``session`` (known raw ids, at most ``max_len``)."""
        return tuple(self._index[item] for item in session)

    def _compare_step(
        self,
        step_top: list[Recommendation],
        whole_top: list[Recommendation],
        step_state: SessionState | None,
        whole_state: SessionState | None,
        precision: str,
        step_path: Path,
    ) -> None:
        """The load check's comparison of one session of ``max_len - 1`` items computed by the
        step graph (from the whole graph's ``max_len - 2``) and by the whole graph: states
        within :data:`STEP_CHECK_TOLERANCE`, top-k scores within it too, or within
        :data:`~seqrec.constants.INT8_SCORE_ATOL` for int8 catalogs.

        Raises:
            ValueError: the two graphs disagree (they come from different exports).
        """
        model_path = step_path.parent / MODEL_FILE

        def agree(what: str, got: np.ndarray, want: np.ndarray, bound: float) -> None:
            gap = float(np.max(np.abs(got - want)))
            if not gap <= bound:
                raise ValueError(
                    f"{step_path} and {model_path} come from different exports: a session of "
                    f"{self._max_len - 1} items computed by the step graph from its first "
                    f"{self._max_len - 2} differs from the same session computed whole by up "
                    f"to {gap:.3g} in its {what} (at most {bound:.3g} expected); re-export "
                    "the model"
                )

        if step_state is None or whole_state is None:  # both graphs stored a state above
            raise ValueError(f"{step_path}: the state cache kept no state in the load check")
        pairs = [(step_state.kv, whole_state.kv), (step_state.copy_keys, whole_state.copy_keys)]
        for got, want in pairs:
            if got is not None and want is not None:
                bound = STEP_CHECK_TOLERANCE * (1.0 + float(np.abs(want).max()))
                agree("states (keys and values)", got, want, bound)
        got, want = (np.array([r.score for r in top]) for top in (step_top, whole_top))
        bound = STEP_CHECK_TOLERANCE * (1.0 + float(np.abs(want).max()))
        if precision in INT8_PRECISIONS:
            bound = max(bound, INT8_SCORE_ATOL)
        agree(f"top-{len(want)} scores", got, want, bound)

    def _run_raw(self, length: int) -> list[np.ndarray]:
        """``model.onnx``'s outputs for one session of ``length`` copies of item index 1,
        without the predictor's truncation to ``max_len`` (the load check)."""
        feed = {
            self._input_name: np.full((1, length), PAD_IDX + 1, dtype=np.int64),
            "score_mask": self._unfiltered_mask,
            "k": np.array([1], dtype=np.int64),
        }
        names = [i.name for i in self._session.get_inputs()]
        return self._session.run(
            None, {name: feed[name] for name in names if name in feed}, self._run_options
        )

    @property
    def num_items(self) -> int:
        """Catalog size (excludes PAD)."""
        return len(self._item_ids)

    @property
    def max_len(self) -> int:
        """Model context L: only the most recent ``max_len`` known items are used."""
        return self._max_len

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of ``export_meta.json``."""
        return copy.deepcopy(self._meta)

    @property
    def model_version(self) -> str:
        """``model_version`` of the metadata (sha256 prefix of model.onnx), or ``"unknown"``."""
        return str(self._meta.get("model_version", "unknown"))

    @property
    def item_ids(self) -> list[str]:
        """The catalog's raw item ids in index order (a copy)."""
        return list(self._item_ids)

    @property
    def fallback_items(self) -> list[str]:
        """Popularity fallback, best first (a copy)."""
        return list(self._fallback_ids)

    @property
    def incremental(self) -> bool:
        """Whether sessions seen one item earlier are scored from cached states."""
        return self._state_cache is not None

    def state_cache_info(self) -> dict[str, int] | None:
        """``{"hits", "misses", "entries", "bytes", "max_bytes"}`` of the session-state cache,
        or None without one (see :meth:`from_dir`)."""
        return None if self._state_cache is None else self._state_cache.info()

    def clear_state_cache(self) -> None:
        """Forget every cached session state (and reset the counters) and every remembered
        session's item indices (``_encode``)."""
        with self._memo_lock:
            self._encoding_memo.clear()
            self._memo_bytes = 0
        if self._state_cache is not None:
            self._state_cache.clear()

    @property
    def session_options(self) -> ort.SessionOptions:
        """The onnxruntime session options in use (thread counts, optimisation level)."""
        return self._session.get_session_options()

    def recommend(
        self,
        session: Sequence[str | int],
        k: int = 20,
        exclude_seen: bool = False,
        allow_items: Sequence[str | int] | None = None,
        deny_items: Sequence[str | int] | None = None,
    ) -> list[Recommendation]:
        """Recommend the next items for one session.

        Args:
            session: raw item ids (str or int), oldest first (ints are converted with ``str``;
                floats, bytes, bools and None are refused with a TypeError). Unknown ids are
                skipped; the most recent ``max_len`` known items are used.
            k: number of items wanted (>= 1); fewer come back if the catalog (after exclusions)
                is smaller.
            exclude_seen: drop every item of the session from the results.
            allow_items: raw ids; when given, only these items may be recommended (unknown ids
                are ignored, so an allow-list of unknown ids returns nothing).
            deny_items: raw ids never recommended (e.g. out of stock).

        Filters go through ``seqrec.filters.mask_scores``, the function offline evaluation uses
        with the same flags, and also apply to the popularity fallback.

        Returns:
            Up to k recommendations, best first; PAD never appears. A session with no known item
            gets the popularity fallback (``source="fallback"``, score 0.0).

        Raises:
            ValueError: if k < 1, or an integer id has more than 4,300 digits.
            TypeError: if a session is a single string instead of a sequence of ids, or an id
                is not a string or an integer (the message names its position).
            NonFiniteScoresError: (a RuntimeError) the model scored NaN or +inf: its weights are
                damaged (``from_dir`` checks one session at load, so this means a model that
                fails only on some sessions).
        """
        return self.recommend_with_info(session, k, exclude_seen, allow_items, deny_items)[0]

    def recommend_with_info(
        self,
        session: Sequence[str | int],
        k: int = 20,
        exclude_seen: bool = False,
        allow_items: Sequence[str | int] | None = None,
        deny_items: Sequence[str | int] | None = None,
    ) -> tuple[list[Recommendation], RecommendInfo]:
        """Like :meth:`recommend`, and also say how many items were known and whether the
        fallback was used.

        Raises:
            ValueError, TypeError, NonFiniteScoresError: as :meth:`recommend_batch_with_info`.
        """
        if isinstance(session, str | bytes):
            raise TypeError("a session must be a sequence of item ids, not a single string")
        return self.recommend_batch_with_info([session], k, exclude_seen, allow_items, deny_items)[
            0
        ]

    def recommend_batch(
        self,
        sessions: Sequence[Sequence[str | int]],
        k: int = 20,
        exclude_seen: bool = False,
        allow_items: Sequence[str | int] | None = None,
        deny_items: Sequence[str | int] | None = None,
    ) -> list[list[Recommendation]]:
        """Recommend for many sessions with one onnxruntime call; see :meth:`recommend`.

        Returns:
            One list per session, in input order; the items of calling :meth:`recommend` on
            each, with the same scores up to float32 rounding (a batched matrix product may
            round its last bits differently, about 1e-6).

        Raises:
            ValueError, TypeError, NonFiniteScoresError: as :meth:`recommend_batch_with_info`.
        """
        results = self.recommend_batch_with_info(sessions, k, exclude_seen, allow_items, deny_items)
        return [recs for recs, _ in results]

    def _encode(self, session: list[Any]) -> tuple[list[int], int]:
        """The item indices of a session's known ids (oldest first) and the number of its
        unknown ids (left out).

        A session of string ids is remembered (:data:`ENCODING_MEMO_SESSIONS` sessions and
        :data:`ENCODING_MEMO_BYTES` at most, the oldest forgotten first) with its indices, so
        the next click of the same session (the widget sends the whole session every time) maps only its newest id: the catalog's dict
        of ids is large and its entries are out of the CPU caches after each graph call (on the
        AMD VM, 64 sessions of 50 string ids: 1.7 ms through the dict, 0.4 ms from the memo,
        both right after streaming 40 MB, with fresh string objects as from an HTTP body).
        Sessions with any id that is not exactly a ``str`` (ints, numpy strings) take the dict
        path every time: ``1 == 1.0 == True`` as tuple keys, so such a key could match a session
        whose ids must be refused or converted differently.

        Raises:
            TypeError, ValueError: an id that is neither a string nor an integer
                (:func:`_check_item_ids`).
        """
        index_get = self._index.get
        memo = self._encoding_memo
        types = _id_types(session)
        if not session or types != _ONLY_STR:
            if types is None or not types <= _STR_OR_INT:
                # bool, float, numpy ids...: refused or accepted here, before the lookup, so a
                # catalog id "True" or "1.0" cannot take the id True or 1.0
                _check_item_ids(session, "session")
            try:
                idxs = list(map(index_get, map(str, session), itertools.repeat(PAD_IDX)))
            except ValueError:  # str() of an integer of more than 4,300 digits
                _check_item_ids(session, "session")
                raise
            if PAD_IDX not in idxs:
                return idxs, 0
            known = [i for i in idxs if i != PAD_IDX]
            return known, len(idxs) - len(known)
        key = tuple(session)
        with self._memo_lock:
            # the previous click (dropped: this session takes its place), or the same session
            # again (a page reload)
            hit = memo.pop(key[:-1], None) if len(key) > 1 else None
            if hit is not None:
                self._memo_bytes -= hit[2]
            else:
                hit = memo.get(key)
                if hit is not None:
                    memo.move_to_end(key)
                    return list(hit[0]), hit[1]
        if hit is not None:  # the parent's size plus the newest id's: no pass over the session
            known_tuple, num_unknown, size = hit
            size += MEMO_BYTES_PER_ID + len(key[-1])
            newest = index_get(key[-1], PAD_IDX)
            if newest == PAD_IDX:
                num_unknown += 1
            else:
                known_tuple = (*known_tuple, newest)
        else:
            idxs = list(map(index_get, key, itertools.repeat(PAD_IDX)))
            known_tuple = tuple(i for i in idxs if i != PAD_IDX)
            num_unknown = len(idxs) - len(known_tuple)
            size = MEMO_BYTES_PER_ID * len(key) + sum(map(len, key))
        with self._memo_lock:
            replaced = memo.get(key)  # (another thread may have stored it meanwhile)
            if replaced is not None:
                self._memo_bytes -= replaced[2]
            memo[key] = (known_tuple, num_unknown, size)
            self._memo_bytes += size
            while memo and (
                len(memo) > ENCODING_MEMO_SESSIONS or self._memo_bytes > ENCODING_MEMO_BYTES
            ):
                self._memo_bytes -= memo.popitem(last=False)[1][2]
        return list(known_tuple), num_unknown

    def _idxs(self, items: Sequence[str | int] | None, what: str) -> np.ndarray | None:
        """(N,) int64 indices of the known raw ids in ``items`` (errors name ``what``); None
        stays None."""
        if items is None:
            return None
        types = _id_types(items)
        if types is None or not types <= _STR_OR_INT:
            _check_item_ids(items, what)  # before the lookup, as in _encode
        try:
            idxs = [self._index.get(str(item), PAD_IDX) for item in items]
        except ValueError:  # str() of an integer of more than 4,300 digits
            _check_item_ids(items, what)
            raise
        return np.array([i for i in idxs if i != PAD_IDX], dtype=np.int64)

    def recommend_batch_with_info(
        self,
        sessions: Sequence[Sequence[str | int]],
        k: int = 20,
        exclude_seen: bool = False,
        allow_items: Sequence[str | int] | None = None,
        deny_items: Sequence[str | int] | None = None,
    ) -> list[tuple[list[Recommendation], RecommendInfo]]:
        """Batch version of :meth:`recommend_with_info`.

        Sessions with at least one known item are left-padded to the longest of them (at most
        ``max_len``) with ``encode_prefixes`` and scored in one (B, L') int64 onnxruntime call;
        the others get the (filtered) fallback.

        Raises:
            ValueError: if k < 1, or an integer id has more than 4,300 digits.
            TypeError: if a session is a single string instead of a sequence of ids, or an id
                is not a string or an integer (the message names ``session``, ``allow_items``
                or ``deny_items``, the position and, in a batch of several sessions, the
                session: ``sessions[2]: ...``).
            NonFiniteScoresError: the model scored NaN or +inf (see :meth:`recommend`).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        k = int(k)
        if not isinstance(exclude_seen, bool | np.bool_):
            raise TypeError(f"exclude_seen must be a bool, got {exclude_seen!r}")
        if isinstance(sessions, str | bytes | AbstractSet | Mapping) or not hasattr(
            sessions, "__iter__"
        ):
            raise TypeError(f"sessions must be a sequence of sessions, got {sessions!r:.80}")
        sessions = list(sessions)  # read once, even from a generator
        allow_items = _filter_list(allow_items, "allow_items")
        deny_items = _filter_list(deny_items, "deny_items")
        allow_idxs = self._idxs(allow_items, "allow_items")
        deny_idxs = self._idxs(deny_items, "deny_items")
        unknown_filter_items = sum(
            len(items) - len(idxs)
            for items, idxs in ((allow_items, allow_idxs), (deny_items, deny_idxs))
            if items is not None and idxs is not None
        )
        encoded: list[list[int]] = []
        infos: list[RecommendInfo] = []
        for row, session in enumerate(sessions):
            try:
                session = sessions[row] = _session_list(session)  # iterators are read once
                known, num_unknown = self._encode(session)
            except (TypeError, ValueError) as exc:
                if len(sessions) == 1:
                    raise
                # which session of the batch: "sessions[2]: session: ... at position 1"
                kind = TypeError if isinstance(exc, TypeError) else ValueError
                raise kind(f"sessions[{row}]: {exc}") from None
            encoded.append(known)
            infos.append(
                RecommendInfo(
                    num_known=len(known),
                    num_unknown=num_unknown,
                    used_fallback=not known,
                    num_unknown_filter_items=unknown_filter_items,
                )
            )

        model_rows = [row for row, known in enumerate(encoded) if known]
        ranked = self._rank_model_rows(
            [encoded[row] for row in model_rows], k, exclude_seen, allow_idxs, deny_idxs
        )
        recs_of_row = dict(zip(model_rows, ranked, strict=True))

        results: list[tuple[list[Recommendation], RecommendInfo]] = []
        for row, info in enumerate(infos):
            if info.used_fallback:
                seen = {str(item) for item in sessions[row]} if exclude_seen else set()
                recs = self._fallback(k, seen, allow_items, deny_items)
            else:
                recs = recs_of_row[row]
            results.append((recs, info))
        return results

    def _rank_model_rows(
        self,
        prefixes: list[list[int]],
        k: int,
        exclude_seen: bool,
        allow_idxs: np.ndarray | None,
        deny_idxs: np.ndarray | None,
    ) -> list[list[Recommendation]]:
        """Score known-item prefixes and return each row's filtered top-k.

        Args:
            prefixes: B sessions of item indices (each non-empty), oldest first.

        Returns:
            B lists of up to k recommendations, best first.
        """
        if not prefixes:
            return []
        has_filter = exclude_seen or allow_idxs is not None or deny_idxs is not None
        if self._top_k_in_graph:
            k_arr = _k_input(min(k, self.num_items))
            if not has_filter:  # no mask, or the (1, C) PAD mask broadcast over the batch
                top_scores, top_idx = self._run_top_k(prefixes, self._unfiltered_mask, k_arr)
                return self._recommendation_rows(top_idx, top_scores)
            if allow_idxs is None and deny_idxs is None:  # exclude_seen alone (the widget's)
                seen = [set(prefix) for prefix in prefixes]
                most_seen = max(map(len, seen))
                wanted = k + most_seen
                if wanted <= self.num_items and most_seen <= self.top_k_max_seen:
                    # the unmasked top (k + seen items), seen items dropped: the masked top-k
                    # (TopK breaks ties by the lower index, masked or not) without sending or
                    # adding a (B, C) mask
                    k_arr = _k_input(wanted)
                    top_scores, top_idx = self._run_top_k(prefixes, self._unfiltered_mask, k_arr)
                    return self._recommendation_rows(top_idx, top_scores, (k, seen))
            # (B, C): 0 keeps an item, -inf excludes it, by the offline evaluator's rule
            # (filters.set_excluded, which mask_scores applies); this thread's zero mask is
            # reused and its exclusions are taken back out after the call
            mask = self._scratch.zeros((len(prefixes), self.num_items + 1), slot=2)
            rule = (prefixes, exclude_seen, allow_idxs, deny_idxs)
            set_excluded(mask, *rule)
            try:
                top_scores, top_idx = self._run_top_k(prefixes, mask, k_arr)
            finally:
                set_excluded(mask, *rule, value=0.0)
            return self._recommendation_rows(top_idx, top_scores)
        item_ids = encode_prefixes(prefixes, self._max_len)  # (B, L') int64, left-padded
        scores = self._session.run(
            [self._output_name], {self._input_name: item_ids}, self._run_options
        )[0]  # (B, C)
        if not scores.max() < np.inf:  # NaN or +inf anywhere (max propagates NaN)
            raise NonFiniteScoresError(self._non_finite_message)
        masked = mask_scores(scores, prefixes, exclude_seen, allow_idxs, deny_idxs)  # (B, C)
        tops = [_top_k(row_masked, k) for row_masked in masked]  # B x (K,) int64
        return [
            self._recommendations(top.tolist(), row_scores[top].tolist())
            for top, row_scores in zip(tops, scores, strict=True)
        ]

    def _run_top_k(
        self, prefixes: list[list[int]], mask: np.ndarray, k_arr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, K) float32 scores and (B, K) int64 item indices (best first) of the top-k graph:
        from cached states when the export has a step graph, else the whole sessions."""
        if self._state_cache is not None:
            return self._run_incremental(prefixes, mask, k_arr)
        item_ids = encode_prefixes(prefixes, self._max_len)  # (B, L') int64, left-padded
        top_scores, top_idx = self._session.run(
            ["top_scores", "top_idx"],
            {self._input_name: item_ids, "score_mask": mask, "k": k_arr},
            self._run_options,
        )
        return top_scores, top_idx

    def _run_incremental(
        self, prefixes: list[list[int]], mask: np.ndarray, k_arr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of B sessions, each from its cached states when the cache holds the session
        minus its newest item (step graph), else from scratch (the prefill graph, or its
        states part and the step graph: see below); every path stores the session's states for
        its next click. A one-item session the cache does not hold goes to the step graph with
        no past states (:meth:`_no_past`): a shopper's first click. So a widget's visit (first
        click, then one more item per request) only ever runs the step graph and reads its copy
        of the catalog table (the prefill graph holds a copy of its own, which a call of it
        would bring into the CPU cache in place of the step graph's).

        A batch of two or more new sessions (two items or more each) runs the prefill graph
        alone: one call. A batch mixing them with cached sessions (the service's dynamic
        batches) gets the new sessions' states before their newest item from the prefill states
        graph (no scoring) and scores every session in one step-graph call, instead of scoring
        the new sessions in the prefill graph and the others in the step graph (two passes over
        the catalog). A single new session is split the same way, so that serving one session
        at a time only ever reads the step graph's copy of the catalog: a prefill call would
        bring its own copy into the CPU cache in place of the step graph's, and the next
        shopper's click would read the step graph's copy from memory. On the AMD VM (37k items,
        int8 catalog, sessions of 5 and 50 items, two interleaved runs) the split made the new
        session's call 0.05-0.10 ms slower and the next click after it 0.18-0.24 ms faster
        (50 items: 0.65-0.71 instead of 0.88-0.93 ms). For batches of new sessions the split
        was slower (64 sessions of 50 items: 74 instead of 70 ms) and the next click no faster,
        so they keep the one prefill call.

        Args:
            prefixes: B non-empty sessions of item indices; only the last ``max_len`` count.
            mask: (0, 1 or B, C) float32 score mask; k_arr: (1,) int64.

        Returns:
            (B, K) float32 scores and (B, K) int64 item indices, best first.
        """
        cache = self._state_cache
        assert cache is not None and self._step_session is not None
        windows = [tuple(p[-self._max_len :]) for p in prefixes]
        states = [
            state or (self._no_past() if len(w) == 1 else None)
            for state, w in zip(cache.lookup_many(windows), windows, strict=True)
        ]
        step_rows = [row for row, state in enumerate(states) if state is not None]
        full_rows = [row for row, state in enumerate(states) if state is None]
        one_new = len(windows) == 1 and self._split_new_session  # split when it can be
        whole = not step_rows and (not one_new or self._prefill_states is None)
        if not full_rows or whole:  # one graph answers every row, in order
            return self._run_graph(windows, states, mask, k_arr, whole=whole)
        if self._prefill_states is not None:  # new sessions' earlier items, then one step call
            heads = [windows[row][:-1] for row in full_rows]  # each of 1 item or more
            outputs = self._prefill_states.run(
                None, {self._input_name: encode_prefixes(heads, self._max_len)}, self._run_options
            )  # present_kv (2 * layers, B', H, L', Dh)[, present_copy_keys (B', L', D)]
            copy_keys = outputs[1] if self._is_copy else None
            computed = states_from_prefill(outputs[0], copy_keys, [len(h) for h in heads])
            for row, state in zip(full_rows, computed, strict=True):
                states[row] = state
            return self._run_graph(windows, states, mask, k_arr, whole=False)
        top_scores = np.empty((len(windows), int(k_arr[0])), dtype=np.float32)
        top_idx = np.empty((len(windows), int(k_arr[0])), dtype=np.int64)
        for rows, whole in ((full_rows, True), (step_rows, False)):
            top_scores[rows], top_idx[rows] = self._run_graph(
                [windows[r] for r in rows],
                [states[r] for r in rows],
                mask if len(mask) <= 1 else mask[rows],
                k_arr,
                whole,
            )
        return top_scores, top_idx

    def _run_graph(
        self,
        windows: list[tuple[int, ...]],
        states: list[SessionState | None],
        mask: np.ndarray,
        k_arr: np.ndarray,
        whole: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run one graph for all of ``windows`` and keep each window's new state: the prefill
        graph on the whole windows (``whole``), else the step graph on the cached ``states`` of
        each window minus its newest item. Returns (B, K) float32 scores and (B, K) int64 item
        indices."""
        if whole:
            outputs = self._session.run(
                None,
                {
                    self._input_name: encode_prefixes(windows, self._max_len),
                    "score_mask": mask,
                    "k": k_arr,
                },
                self._run_options,
            )  # top_scores, top_idx, present_kv (2 * layers, B, H, L', Dh)[, copy keys]
            new_states = states_from_prefill(
                outputs[2], outputs[3] if self._is_copy else None, [len(w) for w in windows]
            )
            self._keep(windows, new_states)
            return outputs[0], outputs[1]
        past: list[SessionState] = states  # type: ignore[assignment]
        past_kv, past_copy_keys = stack_past(past, self._scratch)
        feed = {
            self._input_name: (  # one session: its window as it is (nothing to pad)
                np.array(windows, dtype=np.int64)
                if len(windows) == 1
                else encode_prefixes(windows, self._max_len)
            ),
            **past_kv_feed(past_kv, self._step_input_names),
            "score_mask": mask,
            "k": k_arr,
        }
        if self._is_copy:
            feed["past_copy_keys"] = past_copy_keys
        # present: (2 * layers, B, H, 1, Dh)
        outputs = self._step_session.run(None, feed, self._run_options)
        present, max_len = outputs[2], self._max_len
        copy_keys = outputs[3] if self._is_copy else itertools.repeat(None)
        self._keep(
            windows,
            [
                # a window of max_len items: its next click slides it, so its state is not built
                state.extended(present[:, j], key, max_len) if len(window) < max_len else None
                # (strict=False: copy_keys may be an endless repeat of None)
                for j, (window, state, key) in enumerate(
                    zip(windows, past, copy_keys, strict=False)
                )
            ],
        )
        return outputs[0], outputs[1]

    def _no_past(self, one: list[np.ndarray] | None = None) -> SessionState:
        """The past of a session's first item: the states of no position, (2 * n_layers, H, 0,
        Dh) float32 keys and values [and (0, D) pointer keys], cut once from ``one`` (the
        prefill graph's outputs for one item: the load check's) or, for a recommender built
        without the load check, from a run of its own. The step graph takes a past of length 0
        (onnxruntime's products over an empty axis give zeros; ``validate_incremental`` checks
        the step graph on one-item sessions this way against the prefill graph)."""
        if self._empty_state is None:  # two threads may both build it: the same value
            one = one or self._run_raw(1)  # top_scores, top_idx, present_kv[, present_copy_keys]
            copy_keys = one[3] if self._is_copy else None
            self._empty_state = states_from_prefill(one[2], copy_keys, [0])[0]
        return self._empty_state

    def _keep(self, windows: list[tuple[int, ...]], states: list[SessionState | None]) -> None:
        """Cache each window's state for its next click, unless the window is already
        ``max_len`` long: then the next click slides the window, every position changes, and no
        request can use it (only the parent state is dropped)."""
        assert self._state_cache is not None
        max_len = self._max_len
        self._state_cache.store_many(
            windows,
            [s if len(w) < max_len else None for w, s in zip(windows, states, strict=True)],
        )

    def _recommendation_rows(
        self,
        top_idx: np.ndarray,
        top_scores: np.ndarray,
        drop_seen: tuple[int, list[set[int]]] | None = None,
    ) -> list[list[Recommendation]]:
        """Recommendations of a batch from the (B, K) int64 item indices and (B, K) float32
        scores of a top-k (best first); items scored
        -inf (excluded by the score mask, when fewer than k were left) are left out.
        ``drop_seen`` = (k, B sets of item indices): each row keeps its first k items outside
        its set (a top-k taken unmasked, k + the largest set long)."""
        # Python lists from here: two tolist() calls instead of a handful of numpy operations,
        # each of which costs 10-25 us right after a graph call (the catalog product has
        # pushed numpy's code and data out of the CPU caches; AMD VM, one-session click stream)
        scores = top_scores.tolist()  # B lists of K floats
        # NaN or +inf anywhere: then and only then is the float sum NaN or +inf (K float32
        # scores sum far below the float64 overflow)
        if not sum(map(sum, scores)) < math.inf:
            raise NonFiniteScoresError(self._non_finite_message)
        idx_rows = top_idx.tolist()  # B lists of K item indices
        if drop_seen is not None:  # each row: its first k items outside its set
            k, seen = drop_seen
            pairs = [
                [pair for pair in zip(idx_row, score_row, strict=True) if pair[0] not in row_seen]
                for idx_row, score_row, row_seen in zip(idx_rows, scores, seen, strict=True)
            ]
            idx_rows = [[idx for idx, _ in row[:k]] for row in pairs]
            scores = [[score for _, score in row[:k]] for row in pairs]
        if self._id_array is not None and drop_seen is None:  # item index -> raw id: one gather
            id_rows = self._id_array[top_idx].tolist()
        elif self._id_array is not None:  # the rows kept, gathered as one flat list
            flat = self._id_array[list(itertools.chain.from_iterable(idx_rows))].tolist()
            ends = itertools.accumulate(map(len, idx_rows))
            id_rows = [flat[end - len(row) : end] for row, end in zip(idx_rows, ends, strict=True)]
        else:
            id_of = self._id_of_index.__getitem__
            id_rows = [list(map(id_of, idx_row)) for idx_row in idx_rows]
        # tuple.__new__ builds each named tuple from C (what Recommendation._make does), about
        # half the cost of calling the class: 1,280 of them per batch of 64 at k = 20
        new, cls, model = tuple.__new__, itertools.repeat(Recommendation), itertools.repeat("model")
        rows = [  # (zip stops at the row's end: ``model`` is endless)
            list(map(new, cls, zip(id_row, score_row, model, strict=False)))
            for id_row, score_row in zip(id_rows, scores, strict=True)
        ]
        for row, score_row in enumerate(scores):
            # rows are sorted best first: a row holds -inf exactly when its last score is -inf
            if score_row and score_row[-1] == -math.inf:
                rows[row] = [r for r in rows[row] if r.score > -math.inf]
        return rows

    def _recommendations(self, idxs: list[int], scores: list[float]) -> list[Recommendation]:
        """Recommendations for K item indices ``idxs`` (best first) with their K scores; items
        scored -inf (excluded by the score mask) are left out."""
        item_ids = self._item_ids
        return [
            Recommendation(item_ids[idx - 1], score, "model")
            for idx, score in zip(idxs, scores, strict=True)
            if score > -math.inf
        ]

    def _fallback(
        self,
        k: int,
        exclude: set[str],
        allow_items: Sequence[str | int] | None,
        deny_items: Sequence[str | int] | None,
    ) -> list[Recommendation]:
        """The first k items that pass the same filters as model results: the stored
        popularity fallback list (``num_fallback_items`` at export), then, with an allow-list,
        its other known items in allow-list order, so an allow-list outside the popular items
        does not empty the strip."""
        allowed = None if allow_items is None else {str(i) for i in allow_items}
        denied = exclude | {str(i) for i in deny_items or ()}
        kept: list[str] = []
        seen: set[str] = set()
        more = [] if allow_items is None else [str(i) for i in allow_items]
        for item_id in itertools.chain(self._fallback_ids, more):
            if len(kept) == k:
                break
            if item_id in seen or item_id in denied or item_id not in self._index:
                continue
            if allowed is None or item_id in allowed:
                kept.append(item_id)
                seen.add(item_id)
        return [Recommendation(item_id, FALLBACK_SCORE, "fallback") for item_id in kept]
