"""Fault classes 3a (ids seen only as inputs), 4 (timestamps and order), 5 (leakage across the
split) and the row accounting of stats.json, through the real prepare -> train -> export pipeline
on small hand-made event files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import seqrec.export as export_mod
from conftest import TINY_GENERATOR, TINY_MODEL, compose_at
from seqrec import pipeline
from seqrec.baselines import Pop, item_counts
from seqrec.constants import ITEM_ID, SESSION_ID, TS_MS
from seqrec.data.datamodule import SessionDataModule
from seqrec.data.events import EventsFormatError, read_events
from seqrec.data.sessionize import drop_consecutive_repeats, sessionize
from seqrec.data.vocab import ItemVocab
from seqrec.predictor import SessionRecommender

T_MS = 1_433_221_332_117  # the cut T (and t0 of class 4): 2015-06-02, a 13-digit ms timestamp
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
HEADER = "timestamp,visitorid,event,itemid,transactionid"


def write_events(path: Path, rows: list[tuple[int, str, str]], event: str = "view") -> Path:
    """Write ``(ts_ms, visitor, item)`` rows in file order as a RetailRocket events.csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "\n".join([HEADER] + [f"{ts},{visitor},{event},{item}," for ts, visitor, item in rows])
        + "\n"
    )
    return path


def events_overrides(raw_path: Path, **data: object) -> list[str]:
    settings = {
        "name": "handmade",
        "raw_path": str(raw_path),
        "generate": False,
        "gap_s": 1800,
        "holdout_days": 1,
        "min_item_support": 1,
        "min_session_len": 1,
        **data,
    }
    return [f"data.{key}={value}" for key, value in settings.items()]


# ---------------------------------------------------------------------- 4. timestamps and order

CLASS4A_MS = [T_MS, T_MS + 10 * MINUTE_MS, T_MS + 50 * MINUTE_MS]


def test_class4a_two_sessions_dates_in_2015(tmp_path: Path) -> None:
    path = write_events(tmp_path / "ms.csv", [(ts, "7", "101") for ts in CLASS4A_MS])
    events, _ = read_events(path, ts_unit="ms")
    sessions = sessionize(events, gap_s=1800)
    assert sessions[SESSION_ID].tolist() == ["7:0", "7:0", "7:1"]  # exactly two sessions
    assert sessions[SESSION_ID].nunique() == 2
    years = pd.to_datetime(sessions[TS_MS], unit="ms", utc=True).dt.year
    assert years.tolist() == [2015, 2015, 2015]

    # The same moments in seconds read with ts_unit="s" give the same sessions and times.
    seconds = write_events(tmp_path / "s.csv", [(ts // 1000, "7", "101") for ts in CLASS4A_MS])
    events_s, _ = read_events(seconds, ts_unit="s")
    assert (events_s[TS_MS] // 1000).tolist() == [ts // 1000 for ts in CLASS4A_MS]
    assert sessionize(events_s, gap_s=1800)[SESSION_ID].tolist() == ["7:0", "7:0", "7:1"]


@pytest.mark.parametrize(
    ("divisor", "ts_unit", "hint"), [(1, "s", "ts_unit='ms'"), (1000, "ms", "ts_unit='s'")]
)
def test_class4a_unit_mismatch_is_rejected(
    tmp_path: Path, divisor: int, ts_unit: str, hint: str
) -> None:
    path = write_events(tmp_path / "events.csv", [(ts // divisor, "7", "101") for ts in CLASS4A_MS])
    with pytest.raises(EventsFormatError) as err:
        read_events(path, ts_unit=ts_unit)
    message = str(err.value)
    assert str(path) in message and "'timestamp'" in message
    assert "line 2 (data row 1)" in message and hint in message


def test_class4a_unit_mismatch_stops_prepare(tmp_path: Path) -> None:
    path = write_events(tmp_path / "events.csv", [(ts, "7", "101") for ts in CLASS4A_MS])
    cfg = compose_at(tmp_path, "prepare", events_overrides(path, ts_unit="s"))
    with pytest.raises(EventsFormatError, match="ts_unit='ms'"):
        pipeline.prepare(cfg)
    assert not (tmp_path / "data" / "processed" / "handmade").exists()


def class4b_rows() -> list[tuple[int, str, str]]:
    """One visitor, file order: A@t, A@t (exact duplicate), A@t+5s, C@t+5s, B@t+20s, A@t+40s."""
    a, b, c = "101", "102", "103"
    return [
        (T_MS, "7", a),
        (T_MS, "7", a),
        (T_MS + 5_000, "7", a),
        (T_MS + 5_000, "7", c),
        (T_MS + 20_000, "7", b),
        (T_MS + 40_000, "7", a),
    ]


@pytest.mark.parametrize(
    ("collapse", "expected"),
    [(True, ["101", "103", "102", "101"]), (False, ["101", "101", "103", "102", "101"])],
)
def test_class4b_duplicates_stable_order_repeats(
    tmp_path: Path, collapse: bool, expected: list[str]
) -> None:
    path = write_events(tmp_path / "events.csv", class4b_rows())
    events, stats = read_events(path)
    assert stats["num_duplicate_rows"] == 1
    sessions = sessionize(events, gap_s=1800)
    if collapse:
        sessions, _ = drop_consecutive_repeats(sessions)
    assert sessions[ITEM_ID].tolist() == expected

    # The same through prepare (the session lands in test: it is the last one of the file).
    filler = [
        (T_MS - day * DAY_MS + i, "1", item)
        for day in (5, 3)
        for i, item in enumerate(("101", "102", "103"))
    ]
    path = write_events(tmp_path / "with_filler.csv", filler + class4b_rows())
    pipeline.prepare(
        compose_at(tmp_path, "prepare", events_overrides(path, collapse_repeats=collapse))
    )
    test = pd.read_parquet(tmp_path / "data" / "processed" / "handmade" / "test.parquet")
    assert test.loc[test[SESSION_ID] == "7:0", ITEM_ID].tolist() == expected


# ------------------------------------------------------- 5. leakage; 3a. ids seen only as inputs

FIRST_ONLY = "900"  # always the first item of its sessions: an input, never a training target
HOT_IN_TEST = "199"  # rare in training, the most frequent item after the cut


def leakage_rows() -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []

    def session(visitor: str, start_ms: int, items: list[str]) -> None:
        rows.extend((start_ms + i * MINUTE_MS, visitor, item) for i, item in enumerate(items))

    # Training sessions, days before T.
    session("5", T_MS - 5 * DAY_MS, [FIRST_ONLY, "101", "102"])
    session("5", T_MS - 4 * DAY_MS, [FIRST_ONLY, "101", "103"])
    session("5", T_MS - 84 * HOUR_MS, [FIRST_ONLY, "102", "101", HOT_IN_TEST])
    session("6", T_MS - 108 * HOUR_MS, ["101", "104", "105"])
    # Visitor 1 (the example): a session entirely before T, one spanning T, one after.
    session("1", T_MS - 3 * HOUR_MS, ["101", "102"])
    rows.extend([(T_MS - 10 * MINUTE_MS, "1", "103"), (T_MS - 5 * MINUTE_MS, "1", "101")])
    rows.append((T_MS + 3 * MINUTE_MS, "1", "104"))
    session("1", T_MS + 2 * HOUR_MS, ["102", HOT_IN_TEST])
    # After T, the "hot" item dominates.
    for visitor in ("20", "21", "22", "23", "24"):
        session(
            visitor,
            T_MS + 4 * HOUR_MS + int(visitor) * MINUTE_MS,
            [HOT_IN_TEST, "101", HOT_IN_TEST],
        )
    rows.extend([(T_MS + DAY_MS - MINUTE_MS, "30", "105"), (T_MS + DAY_MS, "30", HOT_IN_TEST)])
    return rows


@pytest.fixture(scope="module")
def leakage_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """prepare -> train (a few steps) -> export on the hand-made leakage file."""
    root = tmp_path_factory.mktemp("leakage")
    raw = write_events(root / "raw" / "events.csv", leakage_rows())
    data = events_overrides(raw)
    stats = pipeline.prepare(compose_at(root, "prepare", data))
    result = pipeline.train(
        compose_at(
            root,
            "train",
            [
                *data,
                *TINY_MODEL,
                "trainer=cpu",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "data.datamodule.batch_size=2",
                "~logger",
                "num_threads=1",
            ],
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(export_mod._EXPORTERS, "dynamo")  # the legacy exporter: < 1 s
        export_dir = pipeline.export(
            compose_at(root, "export", [*data, f"ckpt_path={result['best_ckpt']}"])
        )
    processed = root / "data" / "processed" / "handmade"
    yield {
        "stats": stats,
        "processed": processed,
        "export_dir": export_dir,
        "ckpt": result["best_ckpt"],
        "datamodule": SessionDataModule(str(processed), max_len=50),
    }


def test_class5_no_training_event_at_or_after_cut(leakage_run: dict) -> None:
    stats, processed = leakage_run["stats"], leakage_run["processed"]
    assert stats["split_test"]["cutoff_ts_ms"] == T_MS
    assert stats["split_test"]["num_sessions_spanning_cutoff"] == 1
    for part in ("train", "valid"):
        frame = pd.read_parquet(processed / f"{part}.parquet")
        assert len(frame) and (frame[TS_MS] < T_MS).all(), part
    for part in ("valid_examples",):
        examples = pd.read_parquet(processed / f"{part}.parquet")
        assert len(examples) and (examples[TS_MS] < T_MS).all()
    # every training input and target comes from train.parquet, whose events are all before T
    datamodule = leakage_run["datamodule"]
    datamodule.setup("fit")
    train_items = set(pd.read_parquet(processed / "train.parquet")[ITEM_ID])
    for batch in datamodule.train_dataloader():
        used = set(batch["item_ids"].flatten().tolist()) | set(batch["targets"].flatten().tolist())
        assert set(datamodule.vocab.decode(sorted(used - {0}))) <= train_items


def test_class5_spanning_session_goes_wholly_to_test(leakage_run: dict) -> None:
    processed = leakage_run["processed"]
    test = pd.read_parquet(processed / "test.parquet")
    spanning = test[test[SESSION_ID] == "1:1"]
    assert spanning[TS_MS].tolist() == [
        T_MS - 10 * MINUTE_MS,
        T_MS - 5 * MINUTE_MS,
        T_MS + 3 * MINUTE_MS,
    ]
    for part in ("train", "valid"):
        assert "1:1" not in set(pd.read_parquet(processed / f"{part}.parquet")[SESSION_ID])
    # the visitor's sessions entirely before / after T land on their own sides
    assert "1:0" in set(pd.read_parquet(processed / "valid.parquet")[SESSION_ID])
    assert "1:2" in set(test[SESSION_ID])


def test_class5_popularity_uses_training_events_only(leakage_run: dict) -> None:
    processed, datamodule = leakage_run["processed"], leakage_run["datamodule"]
    train = pd.read_parquet(processed / "train.parquet")
    everything = pd.concat(
        [pd.read_parquet(processed / f"{p}.parquet") for p in ("train", "valid", "test")]
    )
    assert everything[ITEM_ID].value_counts().index[0] == HOT_IN_TEST  # hot overall ...
    train_counts = train[ITEM_ID].value_counts()
    assert train_counts[HOT_IN_TEST] == 1  # ... but rare in training
    vocab = datamodule.vocab

    counts = item_counts(datamodule.train_sessions(), vocab.num_items)
    assert {
        vocab.decode([i])[0]: int(c) for i, c in enumerate(counts) if i
    } == train_counts.to_dict()
    pop_scores = Pop().fit(datamodule.train_sessions(), vocab.num_items).score([np.array([1])])[0]
    assert vocab.decode([int(np.argmax(pop_scores))]) == ["101"]

    meta = json.loads((leakage_run["export_dir"] / "export_meta.json").read_text())
    by_train_count = sorted(train_counts.index, key=lambda item: (-train_counts[item], item))
    assert meta["fallback_items"] == by_train_count
    assert meta["fallback_items"].index(HOT_IN_TEST) > meta["fallback_items"].index("102")


def test_class3a_item_seen_only_as_input(leakage_run: dict) -> None:
    processed, datamodule = leakage_run["processed"], leakage_run["datamodule"]
    vocab: ItemVocab = datamodule.vocab
    train = pd.read_parquet(processed / "train.parquet")
    targets = {
        item for _, s in train.groupby(SESSION_ID, sort=False) for item in s[ITEM_ID].tolist()[1:]
    }
    assert FIRST_ONLY in set(train[ITEM_ID]) and FIRST_ONLY not in targets  # input only
    assert FIRST_ONLY in vocab
    idx = int(vocab.encode([FIRST_ONLY])[0])
    assert 1 <= idx <= vocab.num_items  # fits the embedding table ...

    module = pipeline.load_module(leakage_run["ckpt"])
    assert module.model.item_emb.num_embeddings == vocab.num_items + 1
    with torch.inference_mode():
        scores = module(torch.tensor([[int(vocab.encode(["101"])[0])]]))
    assert torch.isfinite(scores[0, idx]) and scores[0, idx] > torch.finfo(torch.float32).min

    rec = SessionRecommender.from_dir(leakage_run["export_dir"])  # ... and can be recommended
    recs = rec.recommend(["101"], k=vocab.num_items)
    assert FIRST_ONLY in [r.item_id for r in recs]
    assert all(r.source == "model" for r in recs)


# -------------------------------------------------------------------- stats: every row accounted


def _check_accounting(stats: dict, num_rows: int) -> None:
    (accounting,) = stats["row_accounting"].values()
    assert accounting["num_rows_read"] == num_rows == stats["read"]["num_rows_read"]
    assert (
        sum(accounting["dropped"].values()) + sum(accounting["kept"].values())
        == accounting["num_rows_accounted"]
        == num_rows
    )
    for part in ("train", "valid", "test"):
        assert accounting["kept"][part] == stats[f"{part}_sessions"]["num_events"]


def test_stats_account_for_every_row_handmade(leakage_run: dict) -> None:
    stats = json.loads((leakage_run["processed"] / "stats.json").read_text())
    _check_accounting(stats, len(leakage_rows()))


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data.collapse_repeats=false", "data.event_types=null"],
        ["data.min_item_support=30", "data.min_session_len=3"],
    ],
)
def test_stats_account_for_every_row_demo_shop(tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose_at(tmp_path, "prepare", ["data=synthetic", *TINY_GENERATOR, *overrides])
    stats = pipeline.prepare(cfg)
    raw_rows = sum(1 for line in Path(cfg.data.raw_path).read_text().splitlines()[1:] if line)
    _check_accounting(stats, raw_rows)
    accounting = next(iter(stats["row_accounting"].values()))
    assert accounting["dropped"]["other_event_type"] == stats["read"]["num_rows_other_event_type"]
    assert accounting["dropped"]["duplicate_row"] > 0  # the demo shop has a few duplicates
    if "data.min_item_support=30" in overrides:
        assert accounting["dropped"]["rare_item"] > 0 and accounting["dropped"]["short_session"] > 0


def test_row_accounting_refuses_lost_rows() -> None:
    with pytest.raises(RuntimeError, match="10 rows read but kept \\+ dropped = 9"):
        pipeline._row_accounting(10, {"duplicate_row": 1}, {"train": 8}, "events.csv")


def test_benchmark_stats_account_for_every_row(tmp_path: Path) -> None:
    root = tmp_path / "bench"
    root.mkdir()
    (root / "train_sessions.tsv").write_text(
        "session_idx\tn_items\titems\n"
        + "".join(f"{s}\t3\t{1 + s % 5} {2 + s % 5} {3 + s % 5}\n" for s in range(20))
    )
    (root / "test_prefix_target.tsv").write_text(
        "prefix_items\ttarget_item\n1 2\t3\n4\t5\n1\t999\n"  # 999 is not in the train file
    )
    stats = pipeline.prepare(
        compose_at(
            tmp_path,
            "prepare",
            ["data=retailrocket_benchmark", f"data.benchmark_dir={root}", "data.name=tiny_bench"],
        )
    )
    train_acc = stats["row_accounting"][str(root / "train_sessions.tsv")]
    assert train_acc["num_rows_read"] == 20 == sum(train_acc["kept"].values())
    test_acc = stats["row_accounting"][str(root / "test_prefix_target.tsv")]
    assert test_acc == {
        "num_rows_read": 3,
        "dropped": {"unknown_item": 1},
        "kept": {"test": 2},
        "num_rows_accounted": 3,
    }
    assert stats["num_test_examples"] == 2
