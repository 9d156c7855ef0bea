"""Conversion examples on a hand-made events frame with the answer worked out by hand."""

import numpy as np
import pandas as pd

from seqrec.constants import (
    EVENT_TYPE,
    ITEM_ID,
    NEXT_ITEM_ID,
    PREFIX_ITEM_IDS,
    SESSION_ID,
    TS_MS,
    VISITOR_ID,
)
from seqrec.data.conversions import conversion_examples, encode_conversions
from seqrec.data.vocab import ItemVocab

GAP_S = 10  # windows end 10,000 ms after a session's last view

# Processed test views. Visitor "7": session 0 = X@0, Y@1000 (window 0..11000);
# session 1 = A@50000, B@52000, C@53000 (window 50000..63000). Visitor "a:b" (a colon in the id).
TEST_VIEWS = pd.DataFrame(
    [
        ("7:0", "X", 0),
        ("7:0", "Y", 1000),
        ("7:1", "B", 52000),  # rows out of time order on purpose
        ("7:1", "A", 50000),
        ("7:1", "C", 53000),
        ("a:b:0", "P", 0),
        ("a:b:0", "Q", 100),
    ],
    columns=[SESSION_ID, ITEM_ID, TS_MS],
)

RAW_EVENTS = pd.DataFrame(
    [
        ("7", "X", 0, "view"),
        ("7", "Y", 1000, "view"),
        ("7", "Y", 1500, "addtocart"),  # session 7:0, prefix X, Y
        ("7", "Y", 20000, "addtocart"),  # between the sessions: not an example
        ("7", "A", 50000, "addtocart"),  # at the first view: empty prefix, dropped
        ("7", "B", 52000, "addtocart"),  # same time as B's view: prefix is A only (strictly before)
        ("7", "Z", 53500, "addtocart"),  # Z unknown to the catalog: dropped
        ("7", "C", 63000, "transaction"),  # exactly last view + gap: inside, prefix A, B, C
        ("7", "C", 63001, "transaction"),  # one ms later: outside
        ("8", "X", 1500, "addtocart"),  # visitor without a test session
        ("a:b", "Q", 5000, "transaction"),  # prefix P, Q
        ("a", "Q", 100, "transaction"),  # visitor "a" is not visitor "a:b"
    ],
    columns=[VISITOR_ID, ITEM_ID, TS_MS, EVENT_TYPE],
)
KNOWN = {"X", "Y", "A", "B", "C", "P", "Q"}


def test_conversion_examples_by_hand() -> None:
    examples, stats = conversion_examples(RAW_EVENTS, TEST_VIEWS, GAP_S, KNOWN)
    got = [
        (
            row[EVENT_TYPE],
            row[SESSION_ID],
            list(row[PREFIX_ITEM_IDS]),
            row[NEXT_ITEM_ID],
            row[TS_MS],
        )
        for _, row in examples.iterrows()
    ]
    assert got == [
        ("addtocart", "7:0", ["X", "Y"], "Y", 1500),
        ("transaction", "a:b:0", ["P", "Q"], "Q", 5000),
        ("addtocart", "7:1", ["A"], "B", 52000),
        ("transaction", "7:1", ["A", "B", "C"], "C", 63000),
    ]
    assert stats == {
        "num_addtocart_events": 6,
        "num_addtocart_in_test_sessions": 4,
        "num_dropped_empty_prefix_addtocart": 1,
        "num_dropped_unknown_item_addtocart": 1,
        "num_addtocart_examples": 2,
        "num_addtocart_target_in_prefix": 1,
        "num_transaction_events": 4,
        "num_transaction_in_test_sessions": 2,
        "num_dropped_empty_prefix_transaction": 0,
        "num_dropped_unknown_item_transaction": 0,
        "num_transaction_examples": 2,
        "num_transaction_target_in_prefix": 2,
    }


def test_only_requested_kinds_and_encoding() -> None:
    examples, stats = conversion_examples(
        RAW_EVENTS, TEST_VIEWS, GAP_S, KNOWN, event_types=["transaction"]
    )
    assert set(examples[EVENT_TYPE]) == {"transaction"}
    assert "num_addtocart_events" not in stats

    vocab = ItemVocab.fit(sorted(KNOWN))
    full, _ = conversion_examples(RAW_EVENTS, TEST_VIEWS, GAP_S, KNOWN)
    encoded = encode_conversions(full, vocab)
    assert list(encoded) == ["addtocart", "transaction"]
    prefixes, next_items = encoded["transaction"]
    assert next_items.dtype == np.int64
    assert vocab.decode(next_items) == ["Q", "C"]
    assert [vocab.decode(p) for p in prefixes] == [["P", "Q"], ["A", "B", "C"]]
    empty = encode_conversions(full.iloc[:0], vocab)
    assert len(empty["addtocart"][0]) == 0 and empty["addtocart"][1].shape == (0,)
