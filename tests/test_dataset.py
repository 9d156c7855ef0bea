import numpy as np
import pandas as pd
import torch

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID
from seqrec.data.dataset import (
    NextItemExamples,
    TrainSessions,
    sessions_to_index_lists,
    training_windows,
)
from seqrec.data.vocab import ItemVocab


def test_collate_shifts_targets_and_pads_left() -> None:
    batch = TrainSessions.collate([np.array([1, 2, 3, 4]), np.array([5, 6])])
    assert batch["item_ids"].dtype == torch.int64
    assert batch["item_ids"].tolist() == [[1, 2, 3], [0, 0, 5]]
    assert batch["targets"].tolist() == [[2, 3, 4], [0, 0, 6]]


def test_long_sessions_are_windowed_without_losing_transitions() -> None:
    session = np.arange(1, 13)  # 12 items, 11 transitions
    windows = training_windows([session, np.array([7])], max_len=4)
    assert all(2 <= len(w) <= 5 for w in windows)
    transitions = {(int(w[i]), int(w[i + 1])) for w in windows for i in range(len(w) - 1)}
    assert transitions == {(i, i + 1) for i in range(1, 12)}
    assert sum(len(w) - 1 for w in windows) == 11
    assert windows[0].tolist() == [8, 9, 10, 11, 12]  # the most recent window first


def test_sessions_group_in_order() -> None:
    frame = pd.DataFrame(
        {SESSION_ID: ["s2", "s2", "s1", "s1", "s1"], ITEM_ID: ["b", "a", "a", "c", "b"]}
    )
    vocab = ItemVocab.fit(frame[ITEM_ID])
    out = sessions_to_index_lists(frame, vocab)
    assert [vocab.decode(s) for s in out] == [["b", "a"], ["a", "c", "b"]]


def test_examples_collate_truncates_and_pads() -> None:
    vocab = ItemVocab.fit(list("abcdef"))
    frame = pd.DataFrame(
        {SESSION_ID: ["1", "2"], PREFIX_ITEM_IDS: [list("abcde"), ["f"]], NEXT_ITEM_ID: ["a", "b"]}
    )
    data = NextItemExamples.from_frame(frame, vocab, max_len=3)
    batch = data.collate([data[0], data[1]])
    assert batch["item_ids"].tolist() == [
        vocab.encode(list("cde")).tolist(),
        [0, 0, vocab.encode(["f"])[0]],
    ]
    assert batch["next_items"].tolist() == vocab.encode(["a", "b"]).tolist()
