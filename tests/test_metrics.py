import math

import numpy as np
import pytest
import torch

from seqrec.baselines import Pop, RepeatPop
from seqrec.metrics import (
    NextItemMetrics,
    evaluate_scorer,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    target_rank,
)

NEG = torch.finfo(torch.float32).min


def test_hand_computed_ranks_with_ties() -> None:
    # columns: PAD, items 1..5
    scores = torch.tensor(
        [
            [NEG, 0.9, 0.1, 0.2, 0.3, 0.4],  # item 1 best -> rank 1
            [NEG, 0.5, 0.5, 0.5, 0.1, 0.0],  # item 2 tied with two others -> rank 3
            [NEG, 0.5, 0.4, 0.3, 0.2, 0.1],  # item 5 worst -> rank 5
            [NEG, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied -> rank 5
        ]
    )
    ranks = target_rank(scores, torch.tensor([1, 2, 5, 3]))
    assert ranks.tolist() == [1, 3, 5, 5]
    assert recall_at_k(ranks, 3).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert mrr_at_k(ranks, 3).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert ndcg_at_k(ranks, 3).tolist() == pytest.approx([1.0, 1 / math.log2(4), 0.0, 0.0])


def test_pad_column_is_ignored_even_if_high() -> None:
    scores = torch.tensor([[100.0, 0.2, 0.1]])
    assert target_rank(scores, torch.tensor([1])).tolist() == [1]


def test_all_zero_scorer_ranks_last() -> None:
    scores = torch.zeros(3, 51)
    ranks = target_rank(scores, torch.tensor([1, 20, 50]))
    assert ranks.tolist() == [50, 50, 50]
    metrics = NextItemMetrics((10,))
    metrics.update(scores, torch.tensor([1, 20, 50]))
    out = metrics.compute()
    assert out["recall@10"] == 0.0 and out["mrr@10"] == 0.0


def test_nan_scores_raise() -> None:
    scores = torch.zeros(2, 4)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN scores in rows \\[1\\]"):
        target_rank(scores, torch.tensor([1, 1]))


def test_random_scorer_recall_is_k_over_catalog() -> None:
    rng = np.random.default_rng(0)
    num_items, num_examples = 1000, 2000
    next_items = rng.integers(1, num_items + 1, size=num_examples)

    def random_scores(batch: list) -> np.ndarray:
        return rng.random((len(batch), num_items + 1), dtype=np.float32)

    out = evaluate_scorer(random_scores, [np.array([1])] * num_examples, next_items, batch_size=500)
    assert out["num_examples"] == num_examples
    assert abs(out["recall@10"] - 0.01) < 0.006


def test_metric_accumulates_across_batches() -> None:
    metrics = NextItemMetrics((1, 2))
    scores = torch.tensor([[NEG, 3.0, 2.0, 1.0]] * 3)
    metrics.update(scores[:2], torch.tensor([1, 2]))  # ranks 1, 2
    metrics.update(scores[2:], torch.tensor([3]))  # rank 3
    out = metrics.compute()
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["mrr@2"] == pytest.approx((1 + 0.5) / 3)


def test_pop_and_repeat_pop_on_hand_made_sessions() -> None:
    train = [np.array([1, 2, 1]), np.array([1, 3]), np.array([2, 4])]  # counts: 1:3, 2:2, 3:1, 4:1
    pop = Pop().fit(train, num_items=5)
    scores = pop.score([np.array([4])])
    ranks = target_rank(torch.from_numpy(scores), torch.tensor([1]))
    assert ranks.tolist() == [1]
    # item 5 never seen: tied with nobody else at 0 -> rank 5 (last)
    assert target_rank(torch.from_numpy(scores), torch.tensor([5])).tolist() == [5]
    # items 3 and 4 tie with count 1 -> both rank 4
    assert target_rank(torch.from_numpy(pop.score([[1], [1]])), torch.tensor([3, 4])).tolist() == [
        4,
        4,
    ]

    rpop = RepeatPop().fit(train, num_items=5)
    prefix = [
        np.array([4, 3, 4])
    ]  # last occurrences: 3 at pos 1, 4 at pos 2 -> 4 first, then 3, then pop
    scores = torch.from_numpy(rpop.score(prefix))
    order = torch.argsort(scores[0, 1:], descending=True) + 1
    assert order.tolist()[:4] == [4, 3, 1, 2]
