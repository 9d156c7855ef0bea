"""Torch-free session recommender over an export directory (numpy + onnxruntime only).

Load once with :meth:`SessionRecommender.from_dir`, then call :meth:`SessionRecommender.recommend`
from any number of threads: the object holds no per-call state and onnxruntime's ``run`` is
thread-safe.

Only the standard library, numpy, onnxruntime and the numpy-only ``seqrec.sequence`` /
``seqrec.constants`` may be imported here (a test checks that torch and pandas stay unloaded).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from seqrec.constants import PAD_IDX
from seqrec.filters import mask_scores
from seqrec.sequence import encode_prefixes

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

FALLBACK_SCORE = 0.0
"""Score given to popularity-fallback recommendations; their order is their rank."""


@dataclass(frozen=True)
class Recommendation:
    """One recommended item.

    Attributes:
        item_id: raw item id (str), as in the training data.
        score: model score (higher is better; comparable only within one response), or
            :data:`FALLBACK_SCORE` (0.0) for popularity-fallback items.
        source: ``"model"`` or ``"fallback"`` (the session had no known item).
    """

    item_id: str
    score: float
    source: Literal["model", "fallback"] = "model"


@dataclass(frozen=True)
class RecommendInfo:
    """How a session was handled.

    Attributes:
        num_known: session items found in the catalog (all of them, before truncation to
            ``max_len``).
        num_unknown: session items not in the catalog (skipped).
        used_fallback: True when no item was known and the popularity fallback was returned.
    """

    num_known: int
    num_unknown: int
    used_fallback: bool


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing export file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


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


class SessionRecommender:
    """Next-item recommendations for sessions of raw item ids, from an ONNX export directory."""

    def __init__(
        self,
        session: ort.InferenceSession,
        item_ids: list[str],
        meta: dict[str, Any],
    ) -> None:
        """Wrap a loaded graph; prefer :meth:`from_dir`.

        Args:
            session: onnxruntime session of ``model.onnx``.
            item_ids: raw ids in index order (``item_ids[i - 1]`` has index i).
            meta: contents of ``export_meta.json`` (validated by :meth:`from_dir`).
        """
        self._session = session
        self._item_ids = list(item_ids)
        self._index = {item_id: idx for idx, item_id in enumerate(self._item_ids, start=1)}
        self._meta = meta
        self._max_len = int(meta["max_len"])
        self._input_name = str(meta["input_name"])
        self._output_name = str(meta["output_name"])
        self._fallback_ids = [str(i) for i in meta["fallback_items"]]

    @classmethod
    def from_dir(cls, path: str | Path, num_threads: int = 1) -> SessionRecommender:
        """Load ``model.onnx``, ``item_vocab.json`` and ``export_meta.json`` from ``path``.

        Args:
            path: export directory written by ``seqrec.export.export_onnx``.
            num_threads: onnxruntime intra-op threads (keep 1 when several recommenders share a
                process; inter-op threads are always 1).

        Raises:
            FileNotFoundError: the directory or one of the three files is missing.
            ValueError: a file is malformed: missing keys, PAD index not 0, vocab size differs
                from ``num_items`` in the metadata, fallback items outside the vocab, or graph
                input/output names that do not match the metadata.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"export directory not found: {directory}")
        meta_path, vocab_path, model_path = (
            directory / META_FILE,
            directory / VOCAB_FILE,
            directory / MODEL_FILE,
        )
        meta = _read_json(meta_path)
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object")
        missing = [key for key in _REQUIRED_META_KEYS if key not in meta]
        if missing:
            raise ValueError(f"{meta_path}: missing keys {missing}")
        if meta["pad_idx"] != PAD_IDX:
            raise ValueError(f"{meta_path}: pad_idx is {meta['pad_idx']}, expected {PAD_IDX}")

        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict) or not isinstance(vocab.get("item_ids"), list):
            raise ValueError(f"{vocab_path}: missing key 'item_ids' (a list of raw ids)")
        if vocab.get("pad_idx") != PAD_IDX:
            raise ValueError(f"{vocab_path}: pad_idx is {vocab.get('pad_idx')}, expected {PAD_IDX}")
        item_ids = [str(i) for i in vocab["item_ids"]]
        if len(item_ids) != int(meta["num_items"]):
            raise ValueError(
                f"{vocab_path} has {len(item_ids)} items but {meta_path} says "
                f"num_items={meta['num_items']}"
            )
        if len(set(item_ids)) != len(item_ids):
            raise ValueError(f"{vocab_path}: duplicate item ids")
        known = set(item_ids)
        unknown_fallback = [str(i) for i in meta["fallback_items"] if str(i) not in known]
        if unknown_fallback:
            raise ValueError(
                f"{meta_path}: fallback_items not in the vocab: {unknown_fallback[:5]}"
            )

        if not model_path.is_file():
            raise FileNotFoundError(f"missing export file: {model_path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [meta["input_name"]] or meta["output_name"] not in outputs:
            raise ValueError(
                f"{model_path}: graph has inputs {inputs} / outputs {outputs}, but {meta_path} "
                f"names {meta['input_name']!r} -> {meta['output_name']!r}"
            )
        logger.info(
            "loaded %s: %d items, max_len %d, exporter %s",
            directory,
            len(item_ids),
            int(meta["max_len"]),
            meta.get("exporter", "?"),
        )
        return cls(session, item_ids, meta)

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

    def recommend(
        self, session: Sequence[str | int], k: int = 20, exclude_seen: bool = False
    ) -> list[Recommendation]:
        """Recommend the next items for one session.

        Args:
            session: raw item ids, oldest first (ints are converted with ``str``). Unknown ids are
                skipped; the most recent ``max_len`` known items are used.
            k: number of items wanted (>= 1); fewer come back if the catalog (after exclusions)
                is smaller.
            exclude_seen: drop every item of the session from the results.

        Returns:
            Up to k recommendations, best first; PAD never appears. A session with no known item
            gets the popularity fallback (``source="fallback"``, score 0.0).

        Raises:
            ValueError: if k < 1.
            TypeError: if a session is a single string instead of a sequence of ids.
        """
        return self.recommend_with_info(session, k=k, exclude_seen=exclude_seen)[0]

    def recommend_with_info(
        self, session: Sequence[str | int], k: int = 20, exclude_seen: bool = False
    ) -> tuple[list[Recommendation], RecommendInfo]:
        """Like :meth:`recommend`, and also say how many items were known and whether the
        fallback was used.

        Raises:
            ValueError: if k < 1.
            TypeError: if a session is a single string instead of a sequence of ids.
        """
        return self.recommend_batch_with_info([session], k=k, exclude_seen=exclude_seen)[0]

    def recommend_batch(
        self,
        sessions: Sequence[Sequence[str | int]],
        k: int = 20,
        exclude_seen: bool = False,
    ) -> list[list[Recommendation]]:
        """Recommend for many sessions with one onnxruntime call; see :meth:`recommend`.

        Returns:
            One list per session, in input order; identical to calling :meth:`recommend` on each.

        Raises:
            ValueError: if k < 1.
            TypeError: if a session is a single string instead of a sequence of ids.
        """
        return [recs for recs, _ in self.recommend_batch_with_info(sessions, k, exclude_seen)]

    def recommend_batch_with_info(
        self,
        sessions: Sequence[Sequence[str | int]],
        k: int = 20,
        exclude_seen: bool = False,
    ) -> list[tuple[list[Recommendation], RecommendInfo]]:
        """Batch version of :meth:`recommend_with_info`.

        Sessions with at least one known item are left-padded to the longest of them (at most
        ``max_len``) with ``encode_prefixes`` and scored in one (B, L') int64 -> (B, C) float32
        onnxruntime call; the others get the fallback.

        Raises:
            ValueError: if k < 1.
            TypeError: if a session is a single string instead of a sequence of ids.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(sessions, str):
            raise TypeError("sessions must be a sequence of sessions, not a string")
        encoded: list[list[int]] = []
        infos: list[RecommendInfo] = []
        for session in sessions:
            if isinstance(session, str | bytes):
                raise TypeError("a session must be a sequence of item ids, not a single string")
            idxs = [self._index.get(str(item), PAD_IDX) for item in session]
            known = [i for i in idxs if i != PAD_IDX]
            encoded.append(known)
            infos.append(
                RecommendInfo(
                    num_known=len(known),
                    num_unknown=len(idxs) - len(known),
                    used_fallback=not known,
                )
            )

        model_rows = [row for row, known in enumerate(encoded) if known]
        scores = self._score([encoded[row] for row in model_rows])  # (B', C) float32
        score_of_row = dict(zip(model_rows, scores, strict=True))

        results: list[tuple[list[Recommendation], RecommendInfo]] = []
        for row, (known, info) in enumerate(zip(encoded, infos, strict=True)):
            if info.used_fallback:
                seen = {str(item) for item in sessions[row]} if exclude_seen else set()
                recs = self._fallback(k, seen)
            else:
                recs = self._rank(score_of_row[row], known, k, exclude_seen)
            results.append((recs, info))
        return results

    def _score(self, prefixes: list[list[int]]) -> np.ndarray:
        """Run the graph on known-item prefixes.

        Args:
            prefixes: B sessions of item indices (each non-empty), oldest first.

        Returns:
            (B, C) float32 scores; PAD column is the float32 minimum. (0, C) for B = 0.
        """
        if not prefixes:
            return np.empty((0, self.num_items + 1), dtype=np.float32)
        item_ids = encode_prefixes(prefixes, self._max_len)  # (B, L') int64, left-padded
        return self._session.run([self._output_name], {self._input_name: item_ids})[0]

    def _rank(
        self, scores: np.ndarray, known: list[int], k: int, exclude_seen: bool
    ) -> list[Recommendation]:
        """Top-k of one (C,) float32 score row, PAD (and the session if asked) excluded."""
        masked = mask_scores(scores[None, :], [known], exclude_seen=exclude_seen)[0]  # (C,)
        top = _top_k(masked, k)
        return [
            Recommendation(self._item_ids[idx - 1], float(scores[idx]), "model")
            for idx in top.tolist()
        ]

    def _fallback(self, k: int, exclude: set[str]) -> list[Recommendation]:
        """The first k popularity-fallback items whose raw id is not in ``exclude``."""
        kept = [item_id for item_id in self._fallback_ids if item_id not in exclude]
        return [Recommendation(item_id, FALLBACK_SCORE, "fallback") for item_id in kept[:k]]
