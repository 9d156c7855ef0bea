"""Quality-report building blocks (hand-computed) and scripts/bench_quality.py on a tiny demo shop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_GENERATOR, TINY_MODEL
from seqrec import report
from seqrec.metrics import evaluate_scorer, target_rank

# Catalog of 5 items (C = 6 columns, PAD = column 0).
SCORES = np.array(
    [
        [9.0, 0.1, 0.5, 0.5, 0.2, 0.0],  # target 2 ties with 3: rank 2
        [9.0, 0.9, 0.1, 0.2, 0.3, 0.4],  # target 1 is best: rank 1
        [9.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # target 1 is worst: rank 5
    ],
    dtype=np.float32,
)
TARGETS = np.array([2, 1, 1])
PREFIXES = [np.array([3]), np.array([1, 2]), np.array([4, 5, 2, 3, 1, 2])]


def fixed_scorer(prefixes: list[np.ndarray]) -> np.ndarray:
    rows = [next(i for i, p in enumerate(PREFIXES) if np.array_equal(p, q)) for q in prefixes]
    return SCORES[rows]


def test_rank_examples_follows_target_rank_and_keeps_top_k() -> None:
    ranked = report.rank_examples(fixed_scorer, PREFIXES, TARGETS, k=3, batch_size=2)
    assert ranked.ranks.tolist() == [2, 1, 5]
    expected = target_rank(torch.from_numpy(SCORES), torch.from_numpy(TARGETS)).numpy()
    assert ranked.ranks.tolist() == expected.tolist()
    assert ranked.topk[1].tolist() == [1, 5, 4]  # PAD's large score never enters the top-K
    assert ranked.topk[2].tolist() == [5, 4, 3]
    assert ranked.prefix_lens.tolist() == [1, 2, 6]
    assert ranked.eval_time_s >= 0

    seen = report.rank_examples(fixed_scorer, PREFIXES, TARGETS, k=3, exclude_seen=True)
    assert seen.ranks[0] == 1  # item 3 (seen) no longer ties with the target
    assert 1 not in seen.topk[1] and 2 not in seen.topk[1]


def test_metrics_from_ranks_by_hand_and_like_evaluate_scorer() -> None:
    got = report.metrics_from_ranks(np.array([1, 2, 25]), ks=[20])
    assert got["recall@20"] == pytest.approx(2 / 3)
    assert got["mrr@20"] == pytest.approx((1 + 0.5) / 3)
    assert got["ndcg@20"] == pytest.approx((1 + 1 / np.log2(3)) / 3)
    assert got["num_examples"] == 3

    rng = np.random.default_rng(0)
    scores = rng.random((64, 40)).astype(np.float32)
    scores[:, 5] = scores[:, 6]  # ties
    targets = rng.integers(1, 40, 64)
    prefixes = [np.array([i]) for i in range(64)]

    def score(batch: list[np.ndarray]) -> np.ndarray:
        return scores[[int(p[0]) for p in batch]]

    ranked = report.rank_examples(score, prefixes, targets, k=20, batch_size=10)
    reference = evaluate_scorer(score, prefixes, targets, batch_size=7)
    ours = report.metrics_from_ranks(ranked.ranks, ks=[10, 20])
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key  # reference sums float32


def test_buckets() -> None:
    assert report.bucket_labels((1, 2, 3, 6)) == ["1", "2", "3-5", "6+"]
    assert report.bucket_labels((1, 5)) == ["1-4", "5+"]
    lengths = np.array([1, 2, 3, 5, 6, 40])
    assert report.bucket_index(lengths).tolist() == [0, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError):
        report.bucket_labels((2, 2))
    with pytest.raises(ValueError):
        report.bucket_labels((0, 3))


def test_coverage_and_popularity_rank() -> None:
    assert report.catalog_coverage(np.array([[1, 2], [2, 3]]), num_items=10) == pytest.approx(0.3)
    counts = np.array([0, 5, 3, 3, 1, 0])  # PAD, items 1..5
    ranks = report.popularity_ranks(counts)
    assert ranks.tolist() == [0, 1, 2, 2, 4, 5]  # ties share the best rank
    assert report.mean_popularity_rank(np.array([[1, 2], [3, 5]]), ranks) == pytest.approx(2.5)


def test_summarize_ranked_buckets_and_figures() -> None:
    ranked = report.rank_examples(fixed_scorer, PREFIXES, TARGETS, k=2)
    pop = report.popularity_ranks(np.array([0, 5, 4, 3, 2, 1]))
    summary = report.summarize_ranked(ranked, num_items=5, pop_ranks=pop, ks=[1, 2])
    assert summary["metrics"]["recall@2"] == pytest.approx(2 / 3)
    assert summary["by_prefix_len"]["1"]["num_examples"] == 1
    assert summary["by_prefix_len"]["1"]["mrr@2"] == pytest.approx(0.5)
    assert summary["by_prefix_len"]["3-5"]["num_examples"] == 0
    assert np.isnan(summary["by_prefix_len"]["3-5"]["mrr@2"])
    assert summary["by_prefix_len"]["6+"]["recall@2"] == 0.0
    # top-2 lists: [2, 3], [1, 5], [5, 4] -> 5 distinct items of 5
    assert summary["coverage@2"] == pytest.approx(1.0)
    assert summary["mean_pop_rank@2"] == pytest.approx((2 + 3 + 1 + 5 + 5 + 4) / 6)


class Toy:
    """A baseline whose quality is set by its parameters: ``good`` puts the target first."""

    name = "Toy"

    def __init__(self, good: bool, offset: int = 0) -> None:
        self.good, self.offset = good, offset

    def fit(self, train_sessions: list[np.ndarray], num_items: int) -> "Toy":
        self.num_items = num_items
        return self

    def score(self, prefixes: list[np.ndarray]) -> np.ndarray:
        scores = np.zeros((len(prefixes), self.num_items + 1), dtype=np.float32)
        for row, prefix in enumerate(prefixes):  # the target is the prefix's last item + 1
            target = int(prefix[-1]) + 1
            scores[row, target] = 1.0 if self.good else -1.0
        return scores


def test_grid_subsample_and_tuning() -> None:
    assert report.grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert report.grid_points({}) == [{}] and report.grid_points(None) == [{}]
    keep = report.subsample(100, 10, seed=1)
    assert len(keep) == 10 and np.all(np.diff(keep) > 0)
    assert keep.tolist() == report.subsample(100, 10, seed=1).tolist()
    assert report.subsample(5, None, 0).tolist() == [0, 1, 2, 3, 4]

    prefixes = [np.array([i]) for i in range(1, 9)]
    next_items = np.arange(2, 10)
    best, trials = report.tune_baseline(
        Toy, {"offset": 0}, {"good": [False, True]}, [], 10, prefixes, next_items
    )
    assert best == {"good": True}
    assert [t["params"] for t in trials] == [{"good": False}, {"good": True}]
    assert trials[1]["mrr@20"] == pytest.approx(1.0)


def fake_report() -> dict:
    ranked = report.rank_examples(fixed_scorer, PREFIXES, TARGETS, k=2)
    pop = report.popularity_ranks(np.array([0, 5, 4, 3, 2, 1]))
    summary = report.summarize_ranked(ranked, 5, pop, ks=[1, 2])
    worse = {**summary, "metrics": {k: v / 2 for k, v in summary["metrics"].items()}}
    results = {"SASRec": summary, "Pop": worse}
    return {
        "dataset": "toy",
        "split": "test",
        "num_examples": 3,
        "num_examples_split": 10,
        "num_items": 5,
        "ks": [1, 2],
        "top_k": 2,
        "length_buckets": report.bucket_labels(),
        "exclude_seen": False,
        "ckpt": "x.ckpt",
        "results": results,
        "margin": report.relative_margin(results, "SASRec", ["recall@2", "mrr@2"]),
        "tuning": {},
    }


def test_markdown_and_plot(tmp_path: Path) -> None:
    rep = fake_report()
    assert rep["margin"]["mrr@2"]["relative"] == pytest.approx(1.0)
    md = report.quality_markdown(rep)
    assert "| SASRec |" in md and "Coverage@2" in md and "(seeded subsample of 10)" in md
    assert "| 6+ | Pop |" in md and "+100.0%" in md
    assert "| 3-5 |" not in md  # empty bucket: no rows
    path = report.plot_quality(rep, tmp_path / "q.png")
    assert path.stat().st_size > 1000


@pytest.mark.slow
def test_bench_quality_script_on_demo_shop(tmp_path: Path) -> None:
    """scripts/bench_quality.py trains first (train=true), tunes on valid, reports on test."""
    tiny_train = [
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "data.datamodule.batch_size=64",
        "~logger",
        *TINY_MODEL,
    ]
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "bench_quality.py"),
        "data=synthetic",
        *TINY_GENERATOR,
        f"paths.root_dir={tmp_path}",
        "num_threads=1",
        "train=true",
        "train_overrides=[" + ",".join(f'"{o}"' for o in tiny_train) + "]",
        "tune.max_valid_examples=500",
        "max_test_examples=800",
        "baselines.VSKNN.grid={k:[20,50],sample_size:[500]}",
        "baselines.STAN.grid={lambda_1:[1.0,4.0],lambda_3:[2.0]}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    out = tmp_path / "artifacts" / "reports" / "synthetic"
    rep = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").stat().st_size > 1000
    md = (out / "quality.md").read_text()
    assert "## By prefix length" in md and "## Conversions" in md

    names = ["SASRec", "Pop", "RepeatPop", "SR", "V-SKNN", "STAN"]
    assert list(rep["results"]) == names
    assert rep["num_examples"] == 800 and rep["num_examples_split"] > 800
    assert rep["tuning"]["num_valid_examples"] == 500
    assert rep["tuning"]["baselines"]["V-SKNN"]["chosen"]["k"] in (20, 50)
    assert rep["results"]["STAN"]["params"]["lambda_1"] in (1.0, 4.0)
    assert rep["results"]["SR"]["params"]["steps"] in (5, 10, 20)
    for name in names:
        res = rep["results"][name]
        assert 0 <= res["metrics"]["mrr@20"] <= res["metrics"]["recall@20"] <= 1
        assert 0 < res["coverage@20"] <= 1 and res["mean_pop_rank@20"] >= 1
        per_bucket = sum(b["num_examples"] for b in res["by_prefix_len"].values())
        assert per_bucket == 800
    assert rep["results"]["Pop"]["coverage@20"] == pytest.approx(20 / rep["num_items"])

    conv = rep["conversions"]
    assert conv["counts"]["addtocart"] > 0 and conv["counts"]["transaction"] > 0
    assert set(conv["results"]) == set(names)
    # every demo-shop cart follows a view of the same item: repeat-aware popularity finds them all
    assert conv["results"]["RepeatPop"]["addtocart"]["recall@20"] == pytest.approx(1.0)

    # SASRec's figures are those of the evaluator on the same examples and checkpoint
    from seqrec import pipeline
    from seqrec.data.datamodule import SessionDataModule

    dm = SessionDataModule(str(tmp_path / "data" / "processed" / "synthetic"), max_len=50)
    examples = dm.examples("test")
    keep = report.subsample(len(examples), 800, seed=42)
    module = pipeline.load_module(rep["train_result"]["best_ckpt"])
    reference = evaluate_scorer(
        pipeline.model_scorer(module, 50),
        [examples.prefixes[i] for i in keep],
        examples.next_items[keep],
    )
    for key in ("recall@10", "recall@20", "mrr@20", "ndcg@20"):
        assert rep["results"]["SASRec"]["metrics"][key] == pytest.approx(reference[key]), key
