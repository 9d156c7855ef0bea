import numpy as np
import pytest

from seqrec.sequence import encode_prefix, encode_prefixes, first_repeat


def test_keeps_most_recent_and_left_pads() -> None:
    out = encode_prefix([3, 4, 5], max_len=5)
    assert out.dtype == np.int64
    assert out.tolist() == [0, 0, 3, 4, 5]
    assert encode_prefix(list(range(1, 61)), max_len=50).tolist() == list(range(11, 61))
    assert encode_prefix([], max_len=3).tolist() == [0, 0, 0]


def test_batch_pads_to_longest_or_max_len() -> None:
    batch = encode_prefixes([[1], [2, 3, 4]], max_len=10)
    assert batch.tolist() == [[0, 0, 1], [2, 3, 4]]
    assert encode_prefixes([[1]], max_len=4, pad_to_longest=False).tolist() == [[0, 0, 0, 1]]
    assert encode_prefixes([list(range(1, 9))], max_len=4).tolist() == [[5, 6, 7, 8]]


def test_rejects_bad_max_len() -> None:
    with pytest.raises(ValueError, match="max_len"):
        encode_prefix([1], max_len=0)
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):
        encode_prefixes([[1]], max_len=0)


def test_batch_accepts_tuples_arrays_and_empty_sessions() -> None:
    rows = [(7, 8, 9), np.array([1, 2, 3, 4, 5, 6], dtype=np.int64), [], [4]]
    batch = encode_prefixes(rows, max_len=4)
    assert batch.dtype == np.int64
    assert batch.tolist() == [[0, 7, 8, 9], [3, 4, 5, 6], [0, 0, 0, 0], [0, 0, 0, 4]]
    assert encode_prefixes([], max_len=3).shape == (0, 1)


def test_first_repeat_gives_the_positions_of_the_first_id_seen_twice() -> None:
    assert first_repeat(["a", "b", "c"]) is None and first_repeat([]) is None
    assert first_repeat(["a", "b", "c", "b", "a"]) == (1, 3)  # "b" repeats before "a" does
    assert first_repeat(["x", "x"]) == (0, 1)
