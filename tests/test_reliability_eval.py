"""Fault classes 6 (metrics) and 7 (seen and padding items in results).

Class 7's "the evaluator and the predictor read the same flag" is proven end to end: a tiny model is
trained on the demo shop, ``pipeline.evaluate`` ranks the test split with ``exclude_seen`` on and
off, the model is exported, and the torch-free predictor, given every test prefix with the same
flag, reproduces the evaluator's metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import seqrec.export as export_mod
from _export_helpers import tiny_model
from conftest import TINY_GENERATOR, TINY_MODEL, compose_at
from seqrec import pipeline
from seqrec.constants import NEXT_ITEM_ID, PAD_IDX, PREFIX_ITEM_IDS
from seqrec.data.vocab import ItemVocab
from seqrec.export import export_onnx
from seqrec.filters import mask_scores
from seqrec.metrics import evaluate_scorer, target_rank
from seqrec.predictor import SessionRecommender

# ---------------------------------------------------------------------------------- 6. metrics


def test_class6a_random_scorer_full_ranking_recall_is_about_k_over_catalog() -> None:
    rng = np.random.default_rng(1)
    num_items, num_examples = 1000, 2000
    next_items = rng.integers(1, num_items + 1, size=num_examples)
    out = evaluate_scorer(
        lambda batch: rng.random((len(batch), num_items + 1), dtype=np.float32),
        [np.array([1])] * num_examples,
        next_items,
        batch_size=256,
        num_items=num_items,
    )
    assert out["num_examples"] == num_examples
    assert out["recall@10"] == pytest.approx(0.01, abs=0.006)  # 10 / 1000, 2000 draws


def test_class6a_sampled_candidates_are_refused() -> None:
    # Only full-catalog ranking is offered; a scorer over a sample of 100 candidates is refused.
    with pytest.raises(ValueError, match="full catalog needs num_items \\+ 1 = 1001"):
        evaluate_scorer(
            lambda batch: np.zeros((len(batch), 101), dtype=np.float32),
            [np.array([1])],
            np.array([5]),
            num_items=1000,
        )


def test_class6b_all_zero_scorer_ranks_last() -> None:
    num_items = 50
    next_items = np.arange(1, num_items + 1)
    scores = torch.zeros(num_items, num_items + 1)
    assert target_rank(scores, torch.from_numpy(next_items)).tolist() == [50] * num_items
    out = evaluate_scorer(
        lambda batch: np.zeros((len(batch), num_items + 1), dtype=np.float32),
        [np.array([1])] * num_items,
        next_items,
        ks=(10,),
        num_items=num_items,
    )
    assert out["recall@10"] == 0.0 and out["mrr@10"] == 0.0 and out["ndcg@10"] == 0.0


def test_class6b_nan_scores_raise_a_clear_error() -> None:
    def scorer(batch: list) -> np.ndarray:
        scores = np.zeros((len(batch), 51), dtype=np.float32)
        scores[1, 7] = np.nan
        return scores

    with pytest.raises(ValueError, match=r"NaN scores in rows \[1\]; cannot rank"):
        evaluate_scorer(scorer, [np.array([1])] * 3, np.array([1, 2, 3]), num_items=50)


# ----------------------------------------------------------------- 7. seen and padding items


def test_class7_session_5_5_7_catalog_1_to_20(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = ItemVocab([str(i) for i in range(1, 21)])  # raw id i <-> index i
    monkeypatch.delitem(export_mod._EXPORTERS, "dynamo")
    model = tiny_model(num_items=20)
    rec = SessionRecommender.from_dir(
        export_onnx(model, vocab, tmp_path / "export", fallback_items=["1"])
    )
    session = ["5", "5", "7"]
    plain = [r.item_id for r in rec.recommend(session, k=10)]
    assert len(plain) == 10 and len(set(plain)) == 10
    assert set(plain) <= set(vocab.item_ids)  # padding (index 0) never returned
    excluded = [r.item_id for r in rec.recommend(session, k=10, exclude_seen=True)]
    assert len(excluded) == 10 and not {"5", "7"} & set(excluded)

    # the evaluator's filter (mask_scores) on the model's scores gives the predictor's answer
    with torch.inference_mode():
        scores = model.score_last(torch.tensor([[5, 5, 7]])).numpy()  # (1, 21) float32
    masked = mask_scores(scores, [np.array([5, 5, 7])], exclude_seen=True)
    order = np.argsort(-masked[0], kind="stable")[:10]
    assert PAD_IDX not in order and vocab.decode(order) == excluded


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny demo shop: prepare, train a few steps, evaluate with the flag off and on, export."""
    root = tmp_path_factory.mktemp("flag")
    data = ["data=synthetic", *TINY_GENERATOR]
    pipeline.prepare(compose_at(root, "prepare", data))
    result = pipeline.train(
        compose_at(
            root,
            "train",
            [
                *data,
                *TINY_MODEL,
                "trainer=cpu",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=12",
                "trainer.limit_val_batches=2",
                "trainer.enable_progress_bar=false",
                "data.datamodule.batch_size=64",
                "~logger",
                "num_threads=1",
            ],
        )
    )
    ckpt = f"ckpt_path={result['best_ckpt']}"
    reports = {
        flag: pipeline.evaluate(
            compose_at(root, "eval", [*data, ckpt, "baselines=[]", f"exclude_seen={flag}"])
        )
        for flag in (False, True)
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(export_mod._EXPORTERS, "dynamo")
        export_dir = pipeline.export(compose_at(root, "export", [*data, ckpt]))
    examples = pd.read_parquet(root / "data" / "processed" / "synthetic" / "test_examples.parquet")
    return {"reports": reports, "export_dir": export_dir, "examples": examples}


def _predictor_metrics(rec: SessionRecommender, examples: pd.DataFrame, exclude_seen: bool) -> dict:
    """Recall@10 and MRR@10 measured through the predictor's own ranking of the whole catalog."""
    ranks = []
    sessions = [list(p) for p in examples[PREFIX_ITEM_IDS]]
    for start in range(0, len(sessions), 256):
        batch = rec.recommend_batch(
            sessions[start : start + 256], k=rec.num_items, exclude_seen=exclude_seen
        )
        for recs, target in zip(
            batch, examples[NEXT_ITEM_ID].iloc[start : start + 256], strict=True
        ):
            ids = [r.item_id for r in recs]
            ranks.append(ids.index(target) + 1 if target in ids else rec.num_items)
    ranks_arr = np.asarray(ranks, dtype=np.float64)
    return {
        "recall@10": float(np.mean(ranks_arr <= 10)),
        "mrr@10": float(np.mean(np.where(ranks_arr <= 10, 1.0 / ranks_arr, 0.0))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("exclude_seen", [False, True])
def test_class7_evaluator_and_predictor_read_the_same_flag(
    demo_run: dict, exclude_seen: bool
) -> None:
    report = demo_run["reports"][exclude_seen]
    assert report["exclude_seen"] is exclude_seen
    model = report["results"]["SASRec"]
    rec = SessionRecommender.from_dir(demo_run["export_dir"])
    served = _predictor_metrics(rec, demo_run["examples"], exclude_seen)
    num_examples = report["num_examples"]
    # ONNX vs eager may reorder near-ties (1e-4): allow at most one example in a thousand to differ.
    tolerance = max(1, num_examples // 1000) / num_examples
    assert served["recall@10"] == pytest.approx(model["recall@10"], abs=tolerance)
    assert served["mrr@10"] == pytest.approx(model["mrr@10"], abs=tolerance)


@pytest.mark.slow
def test_class7_flag_changes_the_result(demo_run: dict) -> None:
    # the demo shop re-views items, so excluding seen items changes what is measured
    off, on = (demo_run["reports"][flag]["results"]["SASRec"] for flag in (False, True))
    assert off["recall@10"] != on["recall@10"]
    examples = demo_run["examples"]
    is_repeat = [
        t in p for p, t in zip(examples[PREFIX_ITEM_IDS], examples[NEXT_ITEM_ID], strict=True)
    ]
    assert any(is_repeat)
