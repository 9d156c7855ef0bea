"""Session baselines on hand-made sessions with answers worked out by hand."""

import numpy as np
import pytest

from seqrec.baselines import SR, STAN, VSKNN

S = [np.array(s) for s in ([1, 2, 3], [1, 2, 4], [5, 6], [2, 3, 1])]  # chronological


def ranked(scores: np.ndarray) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order if scores[i] > 0]


def test_sr_rules_weight_by_gap() -> None:
    sr = SR(steps=2, pruning=0).fit(S, num_items=6)
    scores = sr.score([np.array([1])])[0]  # last item 1
    # rules from 1: 1->2 (gap 1) twice = 2.0; 1->3 (gap 2) = 0.5; 1->4 (gap 2) = 0.5
    assert scores[2] == pytest.approx(2.0)
    assert scores[3] == pytest.approx(0.5) and scores[4] == pytest.approx(0.5)
    assert scores[5] == 0 and scores[0] < -1e30
    pruned = SR(steps=2, pruning=1).fit(S, num_items=6).score([np.array([1])])[0]
    assert ranked(pruned) == [2]


def test_vsknn_neighbours_and_scores() -> None:
    model = VSKNN(k=2, sample_size=None).fit(S, num_items=6)
    # prefix [5, 1]: weights 5 -> 0.5, 1 -> 1.0. Similarities: s0 = 1, s1 = 1, s2 = 0.5, s3 = 1.
    # k = 2 keeps the two most similar, ties to the more recent: s3 (1.0) and s1 (1.0).
    scores = model.score([np.array([5, 1])])[0]
    assert scores[1] == pytest.approx(2.0)  # in s3 and s1
    assert scores[2] == pytest.approx(2.0)
    assert scores[3] == pytest.approx(1.0)  # s3
    assert scores[4] == pytest.approx(1.0)  # s1
    assert scores[5] == 0 and scores[6] == 0  # s2 not a neighbour


def test_vsknn_sample_keeps_most_recent_candidates() -> None:
    model = VSKNN(k=10, sample_size=1).fit(S, num_items=6)
    scores = model.score([np.array([1])])[0]  # candidates s0, s1, s3: only s3 (most recent) kept
    assert ranked(scores) == [1, 2, 3] and scores[4] == 0


def test_stan_position_decay_prefers_items_near_the_match() -> None:
    sessions = [np.array([1, 2, 3, 4, 5])]
    model = STAN(k=5, sample_size=None, lambda_1=1.0, lambda_3=1.0).fit(sessions, num_items=6)
    scores = model.score([np.array([3])])[0]
    sim = 1.0 / np.sqrt(1 * 5)
    # anchor = position of item 3 (index 2); item at index q gets exp(-|q - 2|)
    for item, pos in ((1, 0), (2, 1), (3, 2), (4, 3), (5, 4)):
        assert scores[item] == pytest.approx(sim * np.exp(-abs(pos - 2)), rel=1e-5)
    assert scores[6] == 0


def test_stan_recency_weights_of_current_session() -> None:
    sessions = [np.array([1, 6]), np.array([2, 5])]
    model = STAN(k=5, sample_size=None, lambda_1=1.0, lambda_3=100.0).fit(sessions, num_items=6)
    scores = model.score([np.array([1, 2])])[0]
    # item 2 is most recent (weight 1), item 1 older (exp(-1)): its neighbour's items score lower
    assert scores[5] > scores[6] > 0
    assert scores[5] / scores[6] == pytest.approx(np.exp(1.0), rel=1e-3)


def test_stan_neighbour_recency_decay() -> None:
    sessions = [np.array([1, 6]), np.array([1, 5])]  # session 1 is more recent
    model = STAN(k=5, sample_size=None, lambda_2=1.0, lambda_3=100.0).fit(sessions, num_items=6)
    scores = model.score([np.array([1])])[0]
    assert scores[5] / scores[6] == pytest.approx(np.e, rel=1e-3)
