import numpy as np
import pytest

from seqrec.filters import mask_scores, set_excluded


def test_pad_always_excluded_and_seen_items_on_request() -> None:
    scores = np.arange(21, dtype=np.float32)[None, :].repeat(2, axis=0)  # catalog 1..20
    prefixes = [np.array([5, 5, 7]), np.array([], dtype=np.int64)]
    plain = mask_scores(scores, prefixes)
    assert plain[:, 0].tolist() == [-np.inf, -np.inf]
    assert plain[0, 5] == 5.0
    masked = mask_scores(scores, prefixes, exclude_seen=True)
    top10 = np.argsort(-masked[0])[:10]
    assert 0 not in top10 and 5 not in top10 and 7 not in top10
    assert masked[0, 5] == -np.inf and masked[0, 7] == -np.inf
    assert np.isfinite(masked[1, 1:]).all()  # empty session: nothing but PAD excluded
    assert scores[0, 5] == 5.0  # input untouched


def test_allow_and_deny_lists() -> None:
    scores = np.ones((1, 6), dtype=np.float32)
    out = mask_scores(scores, [[1]], allow_idxs=np.array([2, 3, 4]), deny_idxs=np.array([3]))
    assert np.isfinite(out[0]).nonzero()[0].tolist() == [2, 4]


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="B=2"):
        mask_scores(np.zeros((1, 3)), [[1], [2]])


@pytest.mark.parametrize(
    "rule",
    [
        {"exclude_seen": True},
        {"deny_idxs": np.array([3, 3, 9])},
        {"allow_idxs": np.array([2, 4, 6])},
        {"exclude_seen": True, "allow_idxs": np.array([1, 5]), "deny_idxs": np.array([5])},
        {},
    ],
)
def test_set_excluded_is_the_rule_of_mask_scores_and_value_zero_takes_it_back(rule: dict) -> None:
    prefixes = [[5, 5, 7], [], [1, 9, 2, 9]]  # a repeat, an empty session
    scores = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    want = mask_scores(scores, prefixes, **rule)
    got = set_excluded(scores.copy(), prefixes, **rule)
    np.testing.assert_array_equal(got, want)
    mask = set_excluded(np.zeros((3, 10), dtype=np.float32), prefixes, **rule)
    np.testing.assert_array_equal(np.isneginf(mask), np.isneginf(want))
    assert set_excluded(mask, prefixes, **rule, value=0.0) is mask
    assert not mask.any()  # all zeros again, ready for the next request
