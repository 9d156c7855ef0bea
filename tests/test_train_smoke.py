"""End to end on a tiny demo shop: prepare -> train -> evaluate -> export -> predictor."""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import DictConfig

from conftest import TINY_GENERATOR, TINY_MODEL
from seqrec import pipeline


@pytest.mark.slow
def test_demo_pipeline_end_to_end(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    common = ["data=synthetic", *TINY_GENERATOR]
    stats = pipeline.prepare(compose_cfg("prepare", common))
    assert (
        stats["read"]["num_rows_kept"]
        + stats["read"]["num_rows_other_event_type"]
        + stats["read"]["num_duplicate_rows"]
        == stats["read"]["num_rows_read"]
    )
    assert stats["num_test_examples"] > 0 and stats["num_valid_examples"] > 0
    processed = tmp_path / "data" / "processed" / "synthetic"
    assert {p.name for p in processed.iterdir()} >= {
        "train.parquet",
        "valid.parquet",
        "test.parquet",
        "valid_examples.parquet",
        "test_examples.parquet",
        "item_vocab.json",
        "stats.json",
    }

    train_cfg = compose_cfg(
        "train",
        [
            *common,
            *TINY_MODEL,
            "trainer=cpu",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "data.datamodule.batch_size=64",
            "num_threads=1",
        ],
    )
    with caplog.at_level(logging.INFO):
        result = pipeline.train(train_cfg)
    # without a terminal (no progress bar) each validation is still logged, with its epoch
    assert "Metric val/mrr@20 improved" in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name == "seqrec.lit_module"]
    assert [line.split(":")[0] for line in lines] == ["epoch 0, step 19", "epoch 1, step 38"]
    assert all("recall@20 0." in line and "mrr@20 0." in line for line in lines)
    assert Path(result["best_ckpt"]).is_file()
    assert {"val/loss", "val/recall@20", "val/mrr@20", "val/ndcg@20", "val/recall@10"} <= set(
        result["last_val"]
    )
    assert result["best_val_mrr@20"] > 0
    assert result["weight_averaging"] is None  # callbacks.ema is off unless asked for

    report = pipeline.evaluate(compose_cfg("eval", common))
    assert set(report["results"]) == {"SASRec", "Pop", "RepeatPop"}
    test_examples = pd.read_parquet(processed / "test_examples.parquet")
    assert report["num_examples"] == len(test_examples)
    for metrics in report["results"].values():
        assert 0.0 <= metrics["mrr@20"] <= metrics["recall@20"] <= 1.0
        assert metrics["recall@10"] <= metrics["recall@20"]
    # the demo shop has learnable transitions: two epochs already beat global popularity
    assert report["results"]["SASRec"]["recall@20"] > report["results"]["Pop"]["recall@20"]
    md = (tmp_path / "artifacts" / "reports" / "synthetic" / "test_metrics.md").read_text()
    assert "| SASRec |" in md and "MRR@20" in md

    export_dir = pipeline.export(compose_cfg("export", common))
    meta = json.loads((export_dir / "export_meta.json").read_text())
    assert meta["test_metrics"]["mrr@20"] == report["results"]["SASRec"]["mrr@20"]
    # the default variant (int8 catalog) was checked against PyTorch on (capped) validation
    # examples: nearly the same top-20 lists, and the metrics it changes are recorded
    assert meta["variant"]["precision"] == "int8_catalog"
    assert meta["quality"]["source"] == "validation examples"
    assert 0.95 <= meta["quality"]["top_k_overlap_mean"] <= 1.0
    assert set(meta["quality"]["metric_change"]) >= {"recall@20", "mrr@20"}
    assert abs(meta["quality"]["metric_change"]["mrr@20"]) <= 0.01

    from seqrec.predictor import SessionRecommender

    rec = SessionRecommender.from_dir(export_dir)
    prefix = list(test_examples.loc[0, "prefix_item_ids"])
    recs = rec.recommend(prefix, k=5)
    assert len(recs) == 5 and len({r.item_id for r in recs}) == 5

    # the widget replay on the same export: real test sessions, click by click
    from seqrec.replay import run_replay

    replay_report = run_replay(compose_cfg("replay", [*common, "max_sessions=40"]))
    test_sessions = pd.read_parquet(processed / "test.parquet")
    sizes = test_sessions.groupby("session_id").size()
    assert [r["exclude_seen"] for r in replay_report["runs"]] == [True, False]
    for run in replay_report["runs"]:
        assert run["num_sessions"] == 40
        assert run["num_predictions"] == run["num_clicks"] - 40  # every click but the last
        assert run["num_clicks"] <= sizes.sort_values().iloc[-40:].sum()
        assert 0.0 <= run["hit_rate"] <= 1.0 and run["latency_ms"]["p50"] > 0
    replay_md = (tmp_path / "artifacts" / "reports" / "synthetic" / "replay.md").read_text()
    assert "next click in strip" in replay_md


def test_train_summary_rounds_the_metric_for_people() -> None:
    result = {
        "epochs": 8,
        "global_step": 800,
        "train_time_s": 337.7,
        "best_val_mrr@20": 0.38223397731781006,
        "best_ckpt": "/x/best.ckpt",
    }
    assert "best val MRR@20 = 0.3822\n" in pipeline.summarize("train", result)
    no_ckpt = pipeline.summarize("train", {**result, "best_val_mrr@20": None})
    assert "best val MRR@20 = None (no checkpoint kept)\n" in no_ckpt
