"""Widget replay (seqrec.replay) on hand-made sessions with known strips."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import pytest
from omegaconf import DictConfig

from seqrec.constants import ITEM_ID, SESSION_ID, TS_MS
from seqrec.replay import replay, replay_markdown, run_replay, sessions_from_frame


@dataclass
class _Rec:
    item_id: str


class FixedRules:
    """Strip = the items listed for the session's last click (a hand-written recommender)."""

    def __init__(self, rules: dict[str, list[str]]) -> None:
        self.rules = rules
        self.calls: list[tuple[list[str], int, bool]] = []

    def recommend(self, session: list[str], k: int, exclude_seen: bool) -> list[_Rec]:
        self.calls.append((list(session), k, exclude_seen))
        items = [i for i in self.rules.get(session[-1], []) if not (exclude_seen and i in session)]
        return [_Rec(i) for i in items[:k]]


def test_replay_counts_hits_changes_and_new_items() -> None:
    rules = {"a": ["b", "c"], "b": ["c", "d"], "c": ["a", "d"], "x": ["y"]}
    sessions = [["a", "b", "c", "a"], ["x", "z"]]
    rec = FixedRules(rules)
    run = replay(rec, sessions, k=2, exclude_seen=False)
    # predictions: a->b hit, b->c hit, c->a hit, x->z miss  => 3 of 4
    assert run["num_clicks"] == 6 and run["num_predictions"] == 4
    assert run["hit_rate"] == pytest.approx(0.75)
    # updates: {b,c}->{c,d} changed (1 new), {c,d}->{a,d} changed (1 new), {a,d}->{b,c} changed
    # (2 new); {y}->{} changed (0 new)
    assert run["num_updates"] == 4
    assert run["strip_change_rate"] == pytest.approx(1.0)
    assert run["mean_new_items_per_update"] == pytest.approx((1 + 1 + 2 + 0) / 4)
    assert run["hit_rate_by_clicks_so_far"]["1"] == {"hit_rate": 0.5, "n": 2}
    assert run["hit_rate_by_clicks_so_far"]["3-5"] == {"hit_rate": 1.0, "n": 1}
    assert run["hit_rate_by_clicks_so_far"]["6+"]["n"] == 0
    # the recommender saw growing prefixes with the replay's k and flag
    assert [c[0] for c in rec.calls[:4]] == [["a"], ["a", "b"], ["a", "b", "c"], list("abca")]
    assert {c[1:] for c in rec.calls} == {(2, False)}


def test_replay_with_exclusion_cannot_hit_a_repeat() -> None:
    rules = {"a": ["a", "b"], "b": ["a", "c"]}
    both = [replay(FixedRules(rules), [["a", "b", "a"]], 2, flag) for flag in (False, True)]
    assert both[0]["hit_rate"] == pytest.approx(1.0)  # b after a, a after b
    assert both[1]["hit_rate"] == pytest.approx(0.5)  # a was seen: excluded from the strip
    assert both[1]["latency_ms"]["max"] >= both[1]["latency_ms"]["p50"] > 0
    markdown = replay_markdown({"dataset": "d", "export_dir": "e", "machine": "m", "runs": both})
    assert "| 2 | yes | 50.0% |" in markdown and "| 2 | no | 100.0% |" in markdown


def test_replay_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        replay(FixedRules({}), [["a"]], k=0)
    with pytest.raises(ValueError, match="no clicks to replay"):
        replay(FixedRules({}), [[]], k=3)


def test_sessions_from_frame_orders_by_time_within_session() -> None:
    frame = pd.DataFrame(
        {
            SESSION_ID: ["s2", "s1", "s2", "s1", "s3"],
            ITEM_ID: ["c", "a", "b", "z", "q"],
            TS_MS: pd.array([30, 10, 20, 5, None], dtype="Int64"),
        }
    )
    assert sessions_from_frame(frame) == [["b", "c"], ["z", "a"], ["q"]]
    assert sessions_from_frame(frame.iloc[:0]) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("k=0", "k must be an integer >= 1, got 0"),
        ("k=2.5", "k must be an integer >= 1, got 2.5"),
        ("exclude_seen=true", "exclude_seen must be a non-empty list of booleans"),
        ("exclude_seen=[]", "exclude_seen must be a non-empty list of booleans"),
        ("max_sessions=0", "max_sessions must be null or an integer >= 1, got 0"),
    ],
)
def test_run_replay_checks_settings_before_reading_data(
    compose_cfg: Callable[..., DictConfig], override: str, message: str
) -> None:
    cfg = compose_cfg("replay", ["data=synthetic", "export_dir=/nonexistent", override])
    with pytest.raises(ValueError, match=re.escape(message)):
        run_replay(cfg)
