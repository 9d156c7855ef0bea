"""Property-based tests (hypothesis) for sessionization, splitting, encoding and the evaluator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqrec.constants import ITEM_ID, PAD_IDX, SESSION_ID, TS_MS, VISITOR_ID
from seqrec.data.dataset import TrainSessions, training_windows
from seqrec.data.sessionize import drop_consecutive_repeats, filter_min_support, sessionize
from seqrec.data.split import temporal_split
from seqrec.data.vocab import ItemVocab
from seqrec.metrics import evaluate_scorer, mrr_at_k, ndcg_at_k, recall_at_k, target_rank
from seqrec.resume import ResumableDataLoader
from seqrec.sequence import encode_prefix

T0_MS = 1_433_221_332_117
GAP_S = 1800
PROPERTY = settings(max_examples=60, deadline=None)

# Events: a few visitors and items, times on a coarse grid so exact ties and gaps of exactly
# gap_s (which must not split) both occur.
event_rows = st.lists(
    st.tuples(
        st.sampled_from(["u", "v", "w"]),
        st.sampled_from(["A", "B", "C", "D"]),
        st.integers(0, 40).map(lambda k: T0_MS + k * 450_000),  # 7.5 min grid; gap_s = 4 steps
    ),
    min_size=1,
    max_size=40,
)


def events_frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            VISITOR_ID: pd.Series([r[0] for r in rows], dtype=object),
            ITEM_ID: pd.Series([r[1] for r in rows], dtype=object),
            TS_MS: pd.Series([r[2] for r in rows], dtype="int64"),
            "event_no": np.arange(len(rows)),
        }
    )


# ------------------------------------------------------------------------------- sessionization


@PROPERTY
@given(rows=event_rows, seed=st.integers(0, 2**32 - 1))
def test_shuffling_rows_never_changes_sessions(rows: list, seed: int) -> None:
    events = events_frame(rows)
    shuffled = events.sample(frac=1.0, random_state=np.random.RandomState(seed))
    a, b = sessionize(events, GAP_S), sessionize(shuffled, GAP_S)
    assert dict(zip(a["event_no"], a[SESSION_ID], strict=True)) == dict(
        zip(b["event_no"], b[SESSION_ID], strict=True)
    )
    # within a session the order is by time; only rows with equal times may swap
    for frame in (a, b):
        for _, session in frame.groupby(SESSION_ID):
            assert session[TS_MS].is_monotonic_increasing


@PROPERTY
@given(rows=event_rows)
def test_gap_rule_and_partition(rows: list) -> None:
    sessions = sessionize(events_frame(rows), GAP_S)
    assert sorted(sessions["event_no"]) == list(range(len(rows)))  # every event, exactly once
    gap_ms = GAP_S * 1000
    for visitor, frame in sessions.groupby(VISITOR_ID, sort=False):
        ordered = frame.sort_values(TS_MS, kind="stable")
        assert all(sid.startswith(f"{visitor}:") for sid in ordered[SESSION_ID])
        gaps = np.diff(ordered[TS_MS].to_numpy())
        is_new = ordered[SESSION_ID].to_numpy()[1:] != ordered[SESSION_ID].to_numpy()[:-1]
        assert (gaps[is_new] > gap_ms).all() and (gaps[~is_new] <= gap_ms).all()


@PROPERTY
@given(rows=event_rows)
def test_collapse_repeats_is_idempotent_and_keeps_every_session(rows: list) -> None:
    sessions = sessionize(events_frame(rows), GAP_S)
    collapsed, num_dropped = drop_consecutive_repeats(sessions)
    assert len(collapsed) + num_dropped == len(sessions)
    assert set(collapsed[SESSION_ID]) == set(sessions[SESSION_ID])
    for _, session in collapsed.groupby(SESSION_ID, sort=False):
        items = session[ITEM_ID].tolist()
        assert all(x != y for x, y in zip(items, items[1:], strict=False))
    again, num_again = drop_consecutive_repeats(collapsed)
    assert num_again == 0 and again.equals(collapsed)


@PROPERTY
@given(rows=event_rows, min_len=st.integers(1, 3), min_support=st.integers(1, 4))
def test_min_support_filter_reaches_its_fixpoint(
    rows: list, min_len: int, min_support: int
) -> None:
    sessions = sessionize(events_frame(rows), GAP_S)
    kept, stats = filter_min_support(sessions, min_len, min_support)
    assert (kept.groupby(ITEM_ID).size() >= min_support).all()
    assert (kept.groupby(SESSION_ID).size() >= min_len).all()
    assert stats["num_events_rare_items"] + stats["num_events_short_sessions"] + len(kept) == len(
        sessions
    )
    again, _ = filter_min_support(kept, min_len, min_support)
    assert len(again) == len(kept)


@PROPERTY
@given(rows=event_rows, holdout_days=st.sampled_from([0.05, 0.1, 0.2]))
def test_temporal_split_never_leaks_or_cuts_a_session(rows: list, holdout_days: float) -> None:
    sessions = sessionize(events_frame(rows), GAP_S)
    before, after, stats = temporal_split(sessions, holdout_days)
    cut = stats["cutoff_ts_ms"]
    assert (before[TS_MS] < cut).all()
    assert not set(before[SESSION_ID]) & set(after[SESSION_ID])
    assert len(before) + len(after) == len(sessions)
    assert (after.groupby(SESSION_ID)[TS_MS].max() >= cut).all()


# ------------------------------------------------------------------------------------ encoding

raw_ids = st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30, unique=True)


@PROPERTY
@given(ids=raw_ids, unknown=st.text(min_size=1, max_size=6))
def test_vocab_round_trip(ids: list[str], unknown: str) -> None:
    vocab = ItemVocab.fit(ids)
    idxs = vocab.encode(ids)
    assert sorted(idxs.tolist()) == list(range(1, len(ids) + 1))
    assert vocab.decode(idxs) == ids
    if unknown not in ids:
        assert vocab.encode([unknown]).tolist() == [PAD_IDX]


@PROPERTY
@given(items=st.lists(st.integers(1, 99), max_size=80), max_len=st.integers(1, 50))
def test_encode_prefix_keeps_the_most_recent_items(items: list[int], max_len: int) -> None:
    out = encode_prefix(items, max_len)
    kept = items[-max_len:]
    assert out.shape == (max_len,) and out.dtype == np.int64
    assert out[max_len - len(kept) :].tolist() == kept
    assert (out[: max_len - len(kept)] == PAD_IDX).all()


@PROPERTY
@given(
    sessions=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=40), max_size=8),
    max_len=st.integers(1, 12),
)
def test_training_windows_cover_each_transition_once(sessions: list, max_len: int) -> None:
    windows = training_windows([np.array(s) for s in sessions], max_len)
    assert all(2 <= len(w) <= max_len + 1 for w in windows)
    want = sorted((s[i], s[i + 1], i) for s in sessions for i in range(len(s) - 1))
    assert sum(len(w) - 1 for w in windows) == len(want)
    if windows:
        batch = TrainSessions.collate(windows)
        assert ((batch["item_ids"] == PAD_IDX) == (batch["targets"] == PAD_IDX)).all()


# ------------------------------------------------------------------------------------ evaluator

score_rows = st.integers(2, 30).flatmap(
    lambda num_items: st.tuples(
        st.just(num_items),
        st.lists(
            st.tuples(
                st.lists(st.integers(-3, 3), min_size=num_items + 1, max_size=num_items + 1),
                st.integers(1, num_items),
            ),
            min_size=1,
            max_size=16,
        ),
    )
)


@PROPERTY
@given(data=score_rows)
def test_rank_is_one_plus_items_scored_at_least_as_high(data: tuple) -> None:
    num_items, rows = data
    scores = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    targets = torch.tensor([r[1] for r in rows])
    ranks = target_rank(scores, targets).tolist()
    for (row, target), rank in zip(rows, ranks, strict=True):
        others = [row[i] for i in range(1, num_items + 1) if i != target]
        assert rank == 1 + sum(s >= row[target] for s in others)  # ties count against
        assert 1 <= rank <= num_items
    # invariant to strictly increasing transforms and to the PAD column
    shifted = scores * 3.0 + 7.0
    shifted[:, PAD_IDX] = 1e9
    assert target_rank(shifted, targets).tolist() == ranks
    r = torch.tensor(ranks)
    for k in (1, 5, 10):
        assert (mrr_at_k(r, k) <= ndcg_at_k(r, k) + 1e-7).all()
        assert (ndcg_at_k(r, k) <= recall_at_k(r, k)).all()
        assert (recall_at_k(r, k) <= recall_at_k(r, k + 1)).all()


@PROPERTY
@given(
    num_items=st.integers(2, 60),
    targets=st.lists(st.integers(1, 60), min_size=1, max_size=40),
    batch_size=st.integers(1, 17),
    seed=st.integers(0, 1000),
)
def test_perfect_scorer_always_has_rank_one(
    num_items: int, targets: list[int], batch_size: int, seed: int
) -> None:
    targets_arr = np.array([min(t, num_items) for t in targets])
    noise = np.random.default_rng(seed).random((len(targets_arr), num_items + 1), dtype=np.float32)
    prefixes = [np.array([i]) for i in range(len(targets_arr))]  # prefix carries the row number

    def perfect(batch: list[np.ndarray]) -> np.ndarray:
        rows = np.array([int(p[0]) for p in batch])
        scores = noise[rows].copy()
        scores[np.arange(len(rows)), targets_arr[rows]] = 2.0  # strictly above every other item
        return scores

    out = evaluate_scorer(
        perfect, prefixes, targets_arr, batch_size=batch_size, ks=(1, 10), num_items=num_items
    )
    assert out["recall@1"] == out["mrr@10"] == out["ndcg@10"] == 1.0
    constant = evaluate_scorer(
        lambda b: np.zeros((len(b), num_items + 1), np.float32), prefixes, targets_arr, ks=(1,)
    )
    assert constant["recall@1"] == (1.0 if num_items == 1 else 0.0)


@PROPERTY
@given(
    num_items=st.integers(5, 40),
    targets=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    sizes=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 1000),
)
def test_metrics_do_not_depend_on_batch_size(
    num_items: int, targets: list[int], sizes: tuple, seed: int
) -> None:
    targets_arr = np.array([min(t, num_items) for t in targets])
    table = (
        np.random.default_rng(seed)
        .integers(0, 4, (len(targets_arr), num_items + 1))
        .astype(np.float32)
    )
    prefixes = [np.array([i]) for i in range(len(targets_arr))]

    def scorer(batch: list[np.ndarray]) -> np.ndarray:
        return table[[int(p[0]) for p in batch]]

    a = evaluate_scorer(scorer, prefixes, targets_arr, batch_size=sizes[0])
    b = evaluate_scorer(scorer, prefixes, targets_arr, batch_size=sizes[1])
    assert a == pytest.approx(b, abs=1e-12)


# ------------------------------------------------------------------------------------- resuming


@PROPERTY
@given(
    num_samples=st.integers(1, 60),
    batch_size=st.integers(1, 9),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_loader_resumes_with_exactly_the_remaining_batches(
    num_samples: int, batch_size: int, epoch: int, seed: int, data: st.DataObject
) -> None:
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(
            list(range(num_samples)), batch_size=batch_size, seed=seed, collate_fn=list
        )

    full = loader()
    full.sampler.set_epoch(epoch)
    batches = list(full)
    assert sorted(i for b in batches for i in b) == list(range(num_samples))  # a permutation
    done = data.draw(st.integers(0, len(batches)))

    first = loader()
    first.sampler.set_epoch(epoch)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(done)]
    state = first.state_dict()
    if done:  # before its first batch the loader still reports the epoch it iterated last
        assert state == {"epoch": epoch, "num_batches": done}

    resumed = loader()  # a new process: fresh objects, state from the checkpoint
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(epoch)
    assert seen + list(resumed) == batches
    resumed.sampler.set_epoch(epoch + 1)  # the following epoch starts from its first batch
    nxt = loader()
    nxt.sampler.set_epoch(epoch + 1)
    assert list(resumed) == list(nxt)
