from pathlib import Path

import numpy as np
import pytest

from seqrec.constants import PAD_IDX
from seqrec.data.vocab import ItemVocab


def test_indices_start_at_one_by_frequency(tmp_path: Path) -> None:
    vocab = ItemVocab.fit(["b", "a", "b", "c", "b", "a"])
    assert vocab.num_items == 3
    assert vocab.item_ids == ["b", "a", "c"]  # by count, ties by id
    assert vocab.encode(["b", "a", "c", "zzz"]).tolist() == [1, 2, 3, PAD_IDX]
    assert vocab.decode([1, 2, 3]) == ["b", "a", "c"]
    path = vocab.save(tmp_path / "v.json")
    again = ItemVocab.load(path)
    assert again.item_ids == vocab.item_ids


def test_round_trip_and_reserved_index() -> None:
    vocab = ItemVocab.fit(["1001", "1002", "1003"])
    idx = vocab.encode(["1003", "1001", "1002"])
    assert vocab.decode(idx) == ["1003", "1001", "1002"]
    assert set(idx.tolist()) == {1, 2, 3}
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode(np.array([0]))
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode([4])


def test_ids_stay_strings() -> None:
    vocab = ItemVocab.fit(["007", "7"])
    assert vocab.num_items == 2
    assert vocab.encode([7]).tolist() == [vocab.item_ids.index("7") + 1]


def test_load_rejects_other_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"items": []}')
    with pytest.raises(ValueError, match="not an item vocabulary"):
        ItemVocab.load(path)


def test_empty_ids_are_refused_with_their_position() -> None:
    """An export's item_vocab.json may not hold "", so a vocab with it could be trained on but
    never served: refused where it is made."""
    with pytest.raises(
        ValueError, match=r"ItemVocab: the item id at position 1 \(0-based\) is the empty"
    ):
        ItemVocab(["7", "", "8"])
    with pytest.raises(ValueError, match="empty string"):
        ItemVocab.fit(["7", "", "7"])


def test_duplicate_ids_are_named_with_their_positions() -> None:
    with pytest.raises(ValueError, match=r"duplicate item id '8' at positions 1 and 3 \(0-based\)"):
        ItemVocab(["7", "8", "9", "8", "7"])
    with pytest.raises(ValueError, match=r"duplicate item id '7' at positions 0 and 1"):
        ItemVocab([7, "7"])  # type: ignore[list-item]
