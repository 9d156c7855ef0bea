import numpy as np
import pytest

from seqrec.filters import mask_scores


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
