"""Non-neural baselines with the model's scoring contract.

Every baseline has ``fit(train_sessions, num_items)`` and ``score(prefixes) -> (B, C) float32``
where ``prefixes`` are item-index arrays (oldest first) and column PAD_IDX is never ranked.
Scores are ranked by :func:`seqrec.metrics.evaluate_scorer` exactly like the model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from seqrec.constants import PAD_IDX

_NEVER = np.float32(np.finfo(np.float32).min)


def item_counts(train_sessions: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Training-event count per item index.

    Returns:
        (C,) int64 counts; entry PAD_IDX is 0.
    """
    if not train_sessions:
        return np.zeros(num_items + 1, dtype=np.int64)
    counts = np.bincount(np.concatenate(train_sessions), minlength=num_items + 1).astype(np.int64)
    counts[PAD_IDX] = 0
    return counts


class Pop:
    """Global popularity: every session gets the items with the most training events.

    Ties (items with equal counts) share a score and so count against this baseline.
    """

    name = "Pop"

    def fit(self, train_sessions: Sequence[np.ndarray], num_items: int) -> Pop:
        counts = item_counts(train_sessions, num_items).astype(np.float32)
        counts[PAD_IDX] = _NEVER
        self.scores_ = counts
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32 training counts (same row for every session)."""
        return np.broadcast_to(self.scores_, (len(prefixes), self.scores_.shape[0])).copy()


class RepeatPop:
    """Repeat-aware popularity: items of the prefix first, most recent first, then popular items.

    The usual "session popularity + recency" heuristic of session-based recommendation
    (e.g. Ludewig & Jannach, "Evaluation of session-based recommendation algorithms", 2018):
    score = 1 + (last position in prefix + 1) / (len + 1) for items seen in the session, and
    count / (max count + 1) < 1 for all others.
    """

    name = "RepeatPop"

    def fit(self, train_sessions: Sequence[np.ndarray], num_items: int) -> RepeatPop:
        counts = item_counts(train_sessions, num_items).astype(np.float64)
        base = (counts / (counts.max() + 1.0)).astype(np.float32)
        base[PAD_IDX] = _NEVER
        self.base_ = base
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32 scores; prefix items above 1, others below."""
        scores = np.broadcast_to(self.base_, (len(prefixes), self.base_.shape[0])).copy()
        for row, prefix in enumerate(prefixes):
            prefix = np.asarray(prefix, dtype=np.int64)
            prefix = prefix[prefix != PAD_IDX]
            # later occurrences overwrite earlier ones, so each item keeps its last position
            scores[row, prefix] = 1.0 + (np.arange(len(prefix)) + 1.0) / (len(prefix) + 1.0)
        return scores


# ------------------------------------------------------------------------------ shared structures


class _SessionIndex:
    """Training sessions in CSR form (click order kept) plus a binary session x item matrix.

    Sessions must be given in chronological order: a larger session index means more recent.
    """

    def __init__(self, train_sessions: Sequence[np.ndarray], num_items: int) -> None:
        lengths = np.fromiter(
            (len(s) for s in train_sessions), dtype=np.int64, count=len(train_sessions)
        )
        self.num_sessions = len(train_sessions)
        self.num_items = num_items
        self.ptr = np.concatenate([[0], np.cumsum(lengths)])  # (S+1,)
        self.items = (
            np.concatenate(train_sessions).astype(np.int64)
            if len(train_sessions)
            else np.zeros(0, np.int64)
        )  # (E,)
        self.session_of_event = np.repeat(np.arange(self.num_sessions), lengths)  # (E,)
        self.position = np.arange(len(self.items)) - self.ptr[self.session_of_event]  # (E,) 0-based
        incidence = sparse.csr_matrix(
            (np.ones(len(self.items), dtype=np.float32), (self.session_of_event, self.items)),
            shape=(self.num_sessions, num_items + 1),
        )
        incidence.data[:] = 1.0  # duplicates summed by csr construction: back to binary
        self.incidence = incidence  # (S, C) binary
        self.incidence_t = incidence.T.tocsr()  # (C, S)
        self.num_unique = np.diff(incidence.indptr).astype(np.float32)  # (S,) distinct items


def _query_matrix(prefixes: Sequence[np.ndarray], num_items: int, weights_fn) -> sparse.csr_matrix:  # noqa: ANN001
    """(B, C) sparse query weights; an item repeated in the prefix keeps its last (largest) weight."""
    rows, cols, vals = [], [], []
    for row, prefix in enumerate(prefixes):
        prefix = np.asarray(prefix, dtype=np.int64)
        prefix = prefix[prefix != PAD_IDX]
        if not len(prefix):
            continue
        weights = weights_fn(len(prefix))  # (n,) by position, oldest first
        last = {int(item): w for item, w in zip(prefix.tolist(), weights.tolist(), strict=True)}
        rows.extend([row] * len(last))
        cols.extend(last.keys())
        vals.extend(last.values())
    return sparse.csr_matrix(
        (
            np.asarray(vals, dtype=np.float32),
            (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)),
        ),
        shape=(len(prefixes), num_items + 1),
    )


def _select_neighbors(
    sims: sparse.csr_matrix,
    k: int,
    sample_size: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: keep the ``sample_size`` most recent candidate sessions, then the top ``k`` by score.

    Returns:
        ``(row, session, score)`` flat arrays over the selected (query, neighbour) pairs.
    """
    out_rows, out_sessions, out_scores = [], [], []
    for row in range(sims.shape[0]):
        start, end = sims.indptr[row], sims.indptr[row + 1]
        sessions = sims.indices[start:end]
        scores = sims.data[start:end]
        if sample_size is not None and len(sessions) > sample_size:
            recent = np.argpartition(-sessions, sample_size - 1)[:sample_size]
            sessions, scores = sessions[recent], scores[recent]
        if len(sessions) > k:
            # order by score, ties to the more recent session
            order = np.lexsort((-sessions, -scores))[:k]
            sessions, scores = sessions[order], scores[order]
        out_rows.append(np.full(len(sessions), row, dtype=np.int64))
        out_sessions.append(sessions.astype(np.int64))
        out_scores.append(scores.astype(np.float32))
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_rows), np.concatenate(out_sessions), np.concatenate(out_scores)


def _finish(scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float32, copy=False)
    scores[:, PAD_IDX] = _NEVER
    return scores


# ------------------------------------------------------------------------------------------- SR


class SR:
    """Sequential Rules (SR): Ludewig & Jannach, "Evaluation of session-based recommendation
    algorithms", User Modeling and User-Adapted Interaction 28, 2018 (session-rec ``rules/sr.py``).

    For every training pair (a at t, b at t + g) in a session with 1 <= g <= ``steps``, the rule
    a -> b gains 1/g. A session is scored with the rules of its last item.

    Args:
        steps: largest gap g between the two items of a rule.
        pruning: keep only the strongest ``pruning`` rules per item (0 keeps all).
    """

    name = "SR"

    def __init__(self, steps: int = 10, pruning: int = 20) -> None:
        self.steps = steps
        self.pruning = pruning

    def fit(self, train_sessions: Sequence[np.ndarray], num_items: int) -> SR:
        index = _SessionIndex(train_sessions, num_items)
        rows, cols, vals = [], [], []
        for gap in range(1, self.steps + 1):
            same = index.session_of_event[gap:] == index.session_of_event[:-gap]
            rows.append(index.items[:-gap][same])
            cols.append(index.items[gap:][same])
            vals.append(np.full(int(same.sum()), 1.0 / gap, dtype=np.float32))
        rules = sparse.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(num_items + 1, num_items + 1),
        ).tocsr()  # duplicates summed
        if self.pruning:
            rules = _prune_rows(rules, self.pruning)
        self.rules_ = rules
        self.num_items_ = num_items
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32: rule weights from each prefix's last item."""
        last = np.array(
            [int(np.asarray(p)[-1]) if len(p) else PAD_IDX for p in prefixes], dtype=np.int64
        )
        return _finish(self.rules_[last].toarray())


def _prune_rows(matrix: sparse.csr_matrix, keep: int) -> sparse.csr_matrix:
    """Keep the ``keep`` largest entries of each row (ties: lower column)."""
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows, cols, data = coo.row[order], coo.col[order], coo.data[order]
    row_start = np.searchsorted(rows, rows, side="left")
    is_kept = (np.arange(len(rows)) - row_start) < keep
    return sparse.csr_matrix((data[is_kept], (rows[is_kept], cols[is_kept])), shape=matrix.shape)


# --------------------------------------------------------------------------------------- V-SKNN


class VSKNN:
    """Vector-multiplication session kNN (V-SKNN): Ludewig & Jannach 2018 (see :class:`SR`),
    session-rec ``knn/vsknn.py``.

    The current session is a vector with linearly decaying weights (item at position p of n gets
    p / n, most recent = 1); its similarity to a past session is the dot product with that
    session's binary item vector. Among the ``sample_size`` most recent sessions that share an
    item, the ``k`` most similar are neighbours; item score = sum of neighbour similarities over
    neighbours containing the item.

    Args:
        k: neighbours per session.
        sample_size: most recent candidate sessions considered (None = all).
        idf: weight query items by log(S / sessions containing the item) (idf weighting).
    """

    name = "V-SKNN"

    def __init__(self, k: int = 100, sample_size: int | None = 1000, idf: bool = False) -> None:
        self.k = k
        self.sample_size = sample_size
        self.idf = idf

    def fit(self, train_sessions: Sequence[np.ndarray], num_items: int) -> VSKNN:
        self.index_ = _SessionIndex(train_sessions, num_items)
        counts = np.diff(self.index_.incidence_t.indptr).astype(np.float64)  # sessions per item
        self.idf_ = np.log(max(self.index_.num_sessions, 1) / np.maximum(counts, 1.0)).astype(
            np.float32
        )
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32 neighbourhood scores."""
        index = self.index_
        query = _query_matrix(
            prefixes, index.num_items, lambda n: np.arange(1, n + 1) / n
        )  # (B, C)
        if self.idf:
            query = query.multiply(self.idf_[None, :]).tocsr()
        sims = (query @ index.incidence_t).tocsr()  # (B, S)
        rows, sessions, weights = _select_neighbors(sims, self.k, self.sample_size)
        neighbours = sparse.csr_matrix(
            (weights, (rows, sessions)), shape=(len(prefixes), index.num_sessions)
        )
        return _finish((neighbours @ index.incidence).toarray())  # (B, C)


# ----------------------------------------------------------------------------------------- STAN


class STAN:
    """Sequence and Time Aware Neighbourhood (STAN): Garg, Gupta, Malhotra, Vig, Shroff,
    "Sequence and Time Aware Neighborhood for Session-based Recommendations", SIGIR 2019.

    Three decays on top of session kNN:

    1. item recency in the current session: item at position p of n weighs exp((p - n) / lambda_1);
       similarity to a past session = sum of weights of shared items / sqrt(n * |past session|);
    2. neighbour recency: similarity times exp(-(t_now - t_past) / lambda_2) with t the session
       order (larger = more recent; test sessions come after all training sessions), or the session
       start time in seconds when ``session_times_s`` is given to :meth:`fit`;
    3. position in the neighbour: an item at position q of a neighbour whose most recent shared
       item is at position l gets exp(-|q - l| / lambda_3).

    Item score = sum over the ``k`` best neighbours of similarity x decay 3.

    Args:
        k: neighbours per session.
        sample_size: most recent candidate sessions considered (None = all).
        lambda_1, lambda_2, lambda_3: decay constants (positions; sessions or seconds; positions).
            ``lambda_2 = None`` disables the neighbour-recency decay.
    """

    name = "STAN"

    def __init__(
        self,
        k: int = 100,
        sample_size: int | None = 1000,
        lambda_1: float = 2.0,
        lambda_2: float | None = None,
        lambda_3: float = 2.0,
        batch_size: int = 256,
    ) -> None:
        self.k = k
        self.sample_size = sample_size
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.lambda_3 = lambda_3
        self.batch_size = batch_size

    def fit(
        self,
        train_sessions: Sequence[np.ndarray],
        num_items: int,
        session_times_s: np.ndarray | None = None,
    ) -> STAN:
        self.index_ = _SessionIndex(train_sessions, num_items)
        times = (
            np.asarray(session_times_s, dtype=np.float64)
            if session_times_s is not None
            else np.arange(self.index_.num_sessions, dtype=np.float64)
        )
        self.session_times_ = times
        self.now_ = float(times.max()) if len(times) else 0.0
        return self

    def score(self, prefixes: Sequence[np.ndarray]) -> np.ndarray:
        """(B prefixes) -> (B, C) float32 STAN scores."""
        out = np.zeros((len(prefixes), self.index_.num_items + 1), dtype=np.float32)
        for start in range(0, len(prefixes), self.batch_size):
            part = list(prefixes[start : start + self.batch_size])
            out[start : start + len(part)] = self._score_batch(part)
        return _finish(out)

    def _score_batch(self, prefixes: list[np.ndarray]) -> np.ndarray:
        index = self.index_
        num_cols = index.num_items + 1
        lambda_1 = self.lambda_1
        query = _query_matrix(
            prefixes, index.num_items, lambda n: np.exp((np.arange(1, n + 1) - n) / lambda_1)
        )
        lengths = np.array([max(len(p), 1) for p in prefixes], dtype=np.float32)
        sims = (query @ index.incidence_t).tocsr()  # (B, S) shared-item weight sums
        sims = sims.multiply(1.0 / np.sqrt(lengths)[:, None]).tocsr()
        sims = sims.multiply(1.0 / np.sqrt(np.maximum(index.num_unique, 1.0))[None, :]).tocsr()
        if self.lambda_2 is not None:
            decay = np.exp(-(self.now_ - self.session_times_) / self.lambda_2).astype(np.float32)
            sims = sims.multiply(decay[None, :]).tocsr()
        rows, sessions, weights = _select_neighbors(sims, self.k, self.sample_size)
        if not len(rows):
            return np.zeros((len(prefixes), num_cols), dtype=np.float32)

        # Expand every selected neighbour into its events (pair p, item, position q).
        starts, ends = index.ptr[sessions], index.ptr[sessions + 1]
        pair_len = ends - starts
        pair_of_event = np.repeat(np.arange(len(rows)), pair_len)
        event_idx = (
            np.arange(pair_len.sum())
            - np.repeat(np.cumsum(pair_len) - pair_len, pair_len)
            + np.repeat(starts, pair_len)
        )
        items = index.items[event_idx]
        positions = index.position[event_idx].astype(np.float32)
        query_dense = query.toarray()  # (B, C) item -> recency weight in the current session
        shared_weight = query_dense[rows[pair_of_event], items]  # 0 where the item is not shared
        # l = position in the neighbour of its most recent shared item (largest recency weight).
        best = np.full(len(rows), -1.0, dtype=np.float32)
        np.maximum.at(best, pair_of_event, shared_weight)
        is_anchor = (shared_weight == best[pair_of_event]) & (shared_weight > 0)
        anchor_pos = np.full(len(rows), -1.0, dtype=np.float32)
        np.maximum.at(anchor_pos, pair_of_event[is_anchor], positions[is_anchor])
        decay3 = np.exp(-np.abs(positions - anchor_pos[pair_of_event]) / self.lambda_3)
        contrib = weights[pair_of_event] * decay3
        flat = rows[pair_of_event] * num_cols + items
        return (
            np.bincount(flat, weights=contrib, minlength=len(prefixes) * num_cols)
            .reshape(len(prefixes), num_cols)
            .astype(np.float32)
        )
