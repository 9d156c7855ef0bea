"""Quality report and sweep collection: per-example ranks, prefix-length buckets, coverage,
popularity bias, baseline tuning, and the tables / charts written by the benchmark scripts.

Quality report (``scripts/bench_quality.py``, wiring in :func:`run_quality_bench`)::

    # SASRec from the latest `scripts/train.py` run on this data set (or ckpt_path=...):
    python scripts/bench_quality.py data=retailrocket_benchmark num_threads=1
    # train first with the train config (plus overrides), then report:
    python scripts/bench_quality.py data=synthetic train=true \
        'train_overrides=["trainer=cpu","trainer.max_epochs=3"]'
    # faster: score a seeded subsample of the test split (said so in the report)
    python scripts/bench_quality.py data=retailrocket_benchmark max_test_examples=5000

It writes ``artifacts/reports/<dataset>/quality.{md,json,png}``.

Protocol. Every model -- SASRec and each baseline -- is ranked by
:func:`seqrec.metrics.target_rank` (full catalog, ties count against the model) on the same test
examples. Baselines are fitted on the same training sessions as SASRec; their key parameters are
chosen on (a seeded subsample of) the validation examples by MRR@20 over a small grid, then the
chosen values are fitted again and scored on test. Besides Recall/MRR/NDCG@k the report gives:

* catalog coverage@K: share of catalog items that appear in at least one top-K list;
* mean popularity rank@K: mean over all top-K lists of the items' popularity rank among training
  events (1 = most popular item; items with equal counts share the best rank);
* every metric split by prefix length (buckets ``1``, ``2``, ``3-5``, ``6+`` by default);
* evaluation (scoring + ranking) time per model.

Sweep collection (``scripts/collect_sweep.py SWEEP_DIR``, :func:`collect_sweep`): one row per run
of a Hydra multirun (each run dir holds ``train_result.json`` and ``.hydra/overrides.yaml``),
sorted by validation MRR@20.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from seqrec.constants import PAD_IDX

log = logging.getLogger(__name__)

DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (1, 2, 3, 6)
"""Lower bounds of the prefix-length buckets: ``1``, ``2``, ``3-5``, ``6+``."""

METRIC_NAMES: tuple[str, ...] = ("recall", "mrr", "ndcg")
"""Ranking metrics, in table order."""

ScoreFn = Callable[[list[np.ndarray]], Any]
"""``score(prefixes) -> (B, C)`` float scores (numpy or torch), the baselines' contract."""


# ------------------------------------------------------------------------ per-example ranking


@dataclass
class RankedExamples:
    """Per-example outcome of ranking one split with one model.

    Attributes:
        ranks: (N,) int64 rank of the next item, 1..num_items (see :func:`seqrec.metrics.target_rank`).
        topk: (N, K) int64 top-K item indices per example, best first (never PAD).
        prefix_lens: (N,) int64 number of items in each prefix (before truncation to ``max_len``).
        eval_time_s: seconds spent scoring and ranking.
    """

    ranks: np.ndarray
    topk: np.ndarray
    prefix_lens: np.ndarray
    eval_time_s: float


def rank_examples(
    score_fn: ScoreFn,
    prefixes: Sequence[np.ndarray],
    next_items: np.ndarray,
    k: int = 20,
    batch_size: int = 1024,
    exclude_seen: bool = False,
) -> RankedExamples:
    """Score every example, rank its next item against the full catalog and keep the top-K list.

    Ranks come from :func:`seqrec.metrics.target_rank` (ties count against the model), so they
    agree with :func:`seqrec.metrics.evaluate_scorer`.

    Args:
        score_fn: maps B item-index arrays (oldest first) to (B, C) float scores.
        prefixes: N item-index arrays.
        next_items: (N,) int64 next-item indices in 1..C-1.
        k: length K of the kept top-K lists.
        batch_size: examples per call of ``score_fn``.
        exclude_seen: drop the prefix's own items from the ranking (the filter the predictor
            applies with ``exclude_seen=True``).

    Returns:
        :class:`RankedExamples`.
    """
    import torch

    from seqrec.filters import mask_scores
    from seqrec.metrics import target_rank

    next_items = np.asarray(next_items, dtype=np.int64)
    num_examples = len(prefixes)
    ranks = np.zeros(num_examples, dtype=np.int64)
    topk = np.zeros((num_examples, k), dtype=np.int64)
    start_time = time.perf_counter()
    for start in range(0, num_examples, batch_size):
        batch = [np.asarray(p, dtype=np.int64) for p in prefixes[start : start + batch_size]]
        end = start + len(batch)
        scores = score_fn(batch)
        if exclude_seen:
            scores = mask_scores(np.asarray(scores, dtype=np.float32), batch, exclude_seen=True)
        scores = torch.as_tensor(scores).to(torch.float32)  # (B, C)
        ranks[start:end] = target_rank(scores, torch.from_numpy(next_items[start:end])).numpy()
        is_pad = torch.zeros(scores.shape[1], dtype=torch.bool)
        is_pad[PAD_IDX] = True
        masked = scores.masked_fill(is_pad, -torch.inf)  # (B, C), a copy: PAD never in the top-K
        topk[start:end] = torch.topk(masked, k=min(k, scores.shape[1] - 1), dim=1).indices.numpy()
    eval_time_s = time.perf_counter() - start_time
    prefix_lens = np.fromiter((len(p) for p in prefixes), dtype=np.int64, count=num_examples)
    return RankedExamples(ranks, topk, prefix_lens, eval_time_s)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Average Recall@k, MRR@k and NDCG@k over (N,) int64 ranks (definitions of seqrec.metrics).

    Returns:
        ``{"recall@10": ..., "recall@20": ..., "mrr@10": ..., ..., "num_examples": N}``; metrics
        are NaN when N = 0.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        for k in ks:
            hit = ranks <= k
            if name == "recall":
                values = hit.astype(np.float64)
            elif name == "mrr":
                values = np.where(hit, 1.0 / np.maximum(ranks, 1.0), 0.0)
            else:
                values = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
            out[f"{name}@{k}"] = float(values.mean()) if len(ranks) else float("nan")
    out["num_examples"] = len(ranks)
    return out


# ------------------------------------------------------------------------------------- buckets


def bucket_labels(lower_bounds: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> list[str]:
    """Labels of the prefix-length buckets: ``(1, 2, 3, 6)`` -> ``["1", "2", "3-5", "6+"]``.

    Raises:
        ValueError: the bounds are not strictly increasing integers >= 1.
    """
    bounds = [int(b) for b in lower_bounds]
    if not bounds or bounds[0] < 1 or any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ValueError(f"bucket lower bounds must be increasing integers >= 1, got {bounds}")
    labels = []
    for low, high in zip(bounds, [*bounds[1:], None], strict=True):
        if high is None:
            labels.append(f"{low}+")
        elif high == low + 1:
            labels.append(str(low))
        else:
            labels.append(f"{low}-{high - 1}")
    return labels


def bucket_index(
    lengths: np.ndarray, lower_bounds: Sequence[int] = DEFAULT_LENGTH_BUCKETS
) -> np.ndarray:
    """(N,) int64 bucket index of each prefix length (-1 below the first bound)."""
    bounds = np.asarray([int(b) for b in lower_bounds], dtype=np.int64)
    return np.searchsorted(bounds, np.asarray(lengths, dtype=np.int64), side="right") - 1


# ----------------------------------------------------------------------- coverage / popularity


def catalog_coverage(topk: np.ndarray, num_items: int) -> float:
    """Share of the ``num_items`` catalog items that appear in at least one (N, K) top-K list."""
    items = np.unique(np.asarray(topk, dtype=np.int64))
    items = items[(items != PAD_IDX) & (items <= num_items)]
    return float(len(items)) / max(num_items, 1)


def popularity_ranks(counts: np.ndarray) -> np.ndarray:
    """Popularity rank of every item from (C,) training counts.

    Rank 1 is the most popular item; items with equal counts share the best rank (competition
    ranking: counts 5, 3, 3, 1 give ranks 1, 2, 2, 4). Entry PAD_IDX is 0.

    Returns:
        (C,) int64 ranks.
    """
    counts = np.asarray(counts, dtype=np.int64).copy()
    real = counts[PAD_IDX + 1 :]
    sorted_desc = np.sort(real)[::-1]
    # rank = 1 + number of items with a strictly larger count
    ranks = 1 + np.searchsorted(-sorted_desc, -real, side="left")
    out = np.zeros(len(counts), dtype=np.int64)
    out[PAD_IDX + 1 :] = ranks
    return out


def mean_popularity_rank(topk: np.ndarray, pop_ranks: np.ndarray) -> float:
    """Mean popularity rank (see :func:`popularity_ranks`) over every item of (N, K) top-K lists."""
    topk = np.asarray(topk, dtype=np.int64)
    return float(pop_ranks[topk].mean()) if topk.size else float("nan")


def summarize_ranked(
    ranked: RankedExamples,
    num_items: int,
    pop_ranks: np.ndarray,
    ks: Sequence[int] = (10, 20),
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
) -> dict[str, Any]:
    """All report figures of one model on one split.

    Returns:
        ``{"metrics": {...}, "coverage@K": float, "mean_pop_rank@K": float,
        "by_prefix_len": {label: {"recall@10": ..., ..., "num_examples": n}}, "eval_time_s"}``
        with K = the top-K length of ``ranked``.
    """
    top_k = ranked.topk.shape[1]
    buckets = bucket_index(ranked.prefix_lens, length_buckets)
    by_len = {
        label: metrics_from_ranks(ranked.ranks[buckets == b], ks)
        for b, label in enumerate(bucket_labels(length_buckets))
    }
    return {
        "metrics": metrics_from_ranks(ranked.ranks, ks),
        f"coverage@{top_k}": catalog_coverage(ranked.topk, num_items),
        f"mean_pop_rank@{top_k}": mean_popularity_rank(ranked.topk, pop_ranks),
        "by_prefix_len": by_len,
        "eval_time_s": round(ranked.eval_time_s, 2),
    }


# ---------------------------------------------------------------------------- baseline tuning


def grid_points(grid: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Cartesian product of a parameter grid: ``{"a": [1, 2], "b": [3]}`` -> 2 dicts; ``{}`` -> [{}]."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def subsample(num: int, max_num: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform subsample of ``max_num`` out of ``num`` (all if None)."""
    if max_num is None or max_num >= num:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(num, size=int(max_num), replace=False))


def tune_baseline(
    make: Callable[..., Any],
    fixed: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]] | None,
    train_sessions: Sequence[np.ndarray],
    num_items: int,
    prefixes: Sequence[np.ndarray],
    next_items: np.ndarray,
    metric: str = "mrr@20",
    batch_size: int = 512,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the grid point with the best ``metric`` on the given (validation) examples.

    Args:
        make: baseline class; ``make(**fixed, **point)`` builds one.
        fixed: parameters kept fixed.
        grid: parameter name -> candidate values.
        train_sessions, num_items: passed to ``fit``.
        prefixes, next_items: the validation examples (item indices).
        metric: key of :func:`metrics_from_ranks` to maximise; ties keep the earlier grid point.

    Returns:
        ``(best_point, trials)``; each trial is ``{"params": point, "<metric>": value, "time_s"}``.
    """
    from seqrec.metrics import evaluate_scorer

    best_point: dict[str, Any] = {}
    best_value = -np.inf
    trials = []
    for point in grid_points(grid):
        start = time.perf_counter()
        model = make(**fixed, **point).fit(train_sessions, num_items)
        result = evaluate_scorer(model.score, prefixes, next_items, batch_size=batch_size)
        value = float(result[metric])
        trials.append(
            {"params": point, metric: value, "time_s": round(time.perf_counter() - start, 2)}
        )
        log.info("tune %s %s: %s = %.4f", getattr(make, "__name__", make), point, metric, value)
        if value > best_value:
            best_point, best_value = point, value
    return best_point, trials


# ---------------------------------------------------------------------------- report writing


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metric_cols(ks: Sequence[int]) -> list[str]:
    return [f"{m}@{k}" for m in METRIC_NAMES for k in ks]


def _metric_head(col: str) -> str:
    return col.replace("recall", "Recall").replace("mrr", "MRR").replace("ndcg", "NDCG")


def quality_markdown(report: Mapping[str, Any]) -> str:
    """Render the quality report (the dict written to ``quality.json``) as markdown."""
    ks = report["ks"]
    top_k = report["top_k"]
    cols = _metric_cols(ks)
    results = report["results"]
    lines = [
        f"# Quality report: {report['dataset']} ({report['split']} split)",
        "",
        f"{report['num_examples']} examples"
        + (
            f" (seeded subsample of {report['num_examples_split']})"
            if report["num_examples"] != report["num_examples_split"]
            else ""
        )
        + f" ranked against the full catalog of {report['num_items']} items; "
        "rank = 1 + number of other items scored >= the next item (ties count against the model)."
        + (
            " The session's own items are excluded (exclude_seen)."
            if report["exclude_seen"]
            else ""
        ),
        "",
        f"SASRec checkpoint: `{report['ckpt']}`",
        "",
        "| model | "
        + " | ".join(_metric_head(c) for c in cols)
        + f" | Coverage@{top_k} | Mean pop. rank@{top_k} | eval s |",
        "|---|" + "---:|" * (len(cols) + 3),
    ]
    for name, res in results.items():
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(res["metrics"][c]) for c in cols)
            + f" | {_fmt(res[f'coverage@{top_k}'], 3)} | {_fmt(res[f'mean_pop_rank@{top_k}'], 1)}"
            + f" | {_fmt(res['eval_time_s'], 1)} |"
        )
    if report.get("margin"):
        margin = report["margin"]
        lines += [
            "",
            "SASRec vs the best baseline (relative): "
            + "; ".join(
                f"{_metric_head(k)} {v['sasrec']:.4f} vs {v['best_baseline']} {v['baseline']:.4f} "
                f"({v['relative'] * 100:+.1f}%)"
                for k, v in margin.items()
            )
            + ".",
        ]
    labels = report["length_buckets"]
    counts = next(iter(results.values()))["by_prefix_len"] if results else {}
    lines += [
        "",
        "## By prefix length",
        "",
        "Examples per bucket: "
        + ", ".join(f"{label}: {counts[label]['num_examples']}" for label in labels)
        + ".",
        "",
        "| prefix length | model | " + " | ".join(_metric_head(c) for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for label in labels:
        if not counts[label]["num_examples"]:
            continue  # an empty bucket has no figures (e.g. no length-1 prefix in the benchmark)
        for name, res in results.items():
            row = res["by_prefix_len"][label]
            lines.append(f"| {label} | {name} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    if report.get("tuning"):
        tune = report["tuning"]
        lines += [
            "",
            "## Baseline parameters (chosen on validation)",
            "",
            f"Grid search on {tune['num_valid_examples']} validation examples"
            + (
                f" (seeded subsample of {tune['num_valid_examples_split']})"
                if tune["num_valid_examples"] != tune["num_valid_examples_split"]
                else ""
            )
            + f" by {tune['metric']}; the chosen values were fitted again and scored on test.",
            "",
            f"| baseline | fixed | grid | chosen | val {tune['metric']} | tuning s |",
            "|---|---|---|---|---:|---:|",
        ]
        for name, entry in tune["baselines"].items():
            best = max((t[tune["metric"]] for t in entry["trials"]), default=float("nan"))
            lines.append(
                f"| {name} | {_kv(entry['fixed'])} | {_kv(entry['grid'])} | {_kv(entry['chosen'])}"
                f" | {_fmt(best)} | {_fmt(entry['time_s'], 1)} |"
            )
    if report.get("conversions"):
        conv = report["conversions"]
        kinds = list(conv["counts"])
        lines += [
            "",
            f"## Conversions: is the next carted / bought item in the top-{conv['k']}?",
            "",
        ]
        lines.append(
            "For each cart / purchase event during a test session, the prefix is that session's views "
            "before the event and the target is the converted item. "
            + "; ".join(
                f"{kind}: {conv['counts'][kind]} examples "
                f"({conv['stats'].get('num_' + kind + '_target_in_prefix', 0)} "
                "with the item already viewed in the prefix)"
                for kind in kinds
            )
            + f"; dropped: {_kv(conv['dropped'])}."
        )
        lines += [
            "",
            "| model | "
            + " | ".join(f"{kind} hit@{conv['k']} | {kind} MRR@{conv['k']}" for kind in kinds)
            + " |",
            "|---|" + "---:|" * (2 * len(kinds)),
        ]
        hit_key, mrr_key = f"recall@{conv['k']}", f"mrr@{conv['k']}"
        for name, per_kind in conv["results"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(
                    f"{_fmt(per_kind[kind][hit_key])} | {_fmt(per_kind[kind][mrr_key])}"
                    for kind in kinds
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def _kv(mapping: Mapping[str, Any] | None) -> str:
    if not mapping:
        return "-"
    return ", ".join(f"{k}={v}" for k, v in mapping.items())


def relative_margin(
    results: Mapping[str, Mapping[str, Any]], model: str, keys: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Relative margin of ``model`` over the best other entry per metric key.

    Returns:
        ``{key: {"sasrec", "best_baseline", "baseline", "relative"}}`` (relative = model / best - 1);
        empty if ``model`` or no other entry is present.
    """
    if model not in results or len(results) < 2:
        return {}
    out = {}
    for key in keys:
        others = {n: r["metrics"][key] for n, r in results.items() if n != model}
        best_name = max(others, key=lambda n: others[n])
        ours, theirs = results[model]["metrics"][key], others[best_name]
        out[key] = {
            "sasrec": ours,
            "best_baseline": best_name,
            "baseline": theirs,
            "relative": ours / theirs - 1.0 if theirs > 0 else float("inf"),
        }
    return out


def plot_quality(report: Mapping[str, Any], path: Path) -> Path:
    """Bar chart of the quality report: overall metrics, MRR@K by prefix length, coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    cols = _metric_cols(report["ks"])
    top_k = report["top_k"]
    labels = report["length_buckets"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [3, 2, 1]})
    width = 0.8 / max(len(names), 1)
    for panel, (ax, groups, getter, title) in enumerate(
        [
            (axes[0], cols, lambda r, c: r["metrics"][c], "test metrics"),
            (
                axes[1],
                labels,
                lambda r, label: r["by_prefix_len"][label][f"mrr@{top_k}"],
                f"MRR@{top_k} by prefix length",
            ),
        ]
    ):
        x = np.arange(len(groups))
        for i, name in enumerate(names):
            values = [getter(results[name], g) for g in groups]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [_metric_head(g) for g in groups] if panel == 0 else [f"len {g}" for g in groups]
        )
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    coverage = [results[n][f"coverage@{top_k}"] for n in names]
    axes[2].bar(np.arange(len(names)), coverage, color=[f"C{i}" for i in range(len(names))])
    axes[2].set_xticks(np.arange(len(names)))
    axes[2].set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axes[2].set_title(f"catalog coverage@{top_k}")
    axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{report['dataset']}: {report['num_examples']} {report['split']} examples, "
        f"{report['num_items']} items (full-catalog ranking)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ wiring


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def run_quality_bench(cfg: Any, train_cfg: Any | None = None) -> dict[str, Any]:
    """Evaluate SASRec and every configured baseline on one split; write the quality report.

    Args:
        cfg: the ``bench_quality`` config (``conf/bench_quality.yaml``).
        train_cfg: a composed ``train`` config; when given, :func:`seqrec.pipeline.train` runs
            first and its best checkpoint is evaluated.

    Returns:
        The report dict, also written to ``<report_dir>/quality.json`` (plus ``quality.md`` and
        ``quality.png``).
    """
    import torch
    from hydra.utils import instantiate

    from seqrec import baselines as bl
    from seqrec import pipeline
    from seqrec.baselines import item_counts

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    ks = [int(k) for k in cfg.ks]
    top_k = int(cfg.top_k)
    buckets = [int(b) for b in cfg.length_buckets]
    exclude_seen = bool(cfg.get("exclude_seen", False))
    seed = int(cfg.seed)

    train_result = None
    if train_cfg is not None:
        train_result = pipeline.train(train_cfg)
        ckpt = Path(train_result["best_ckpt"])
    else:
        ckpt = pipeline.resolve_ckpt(cfg)
    datamodule = instantiate(cfg.data.datamodule)
    num_items = datamodule.num_items
    train_sessions = datamodule.train_sessions()
    pop_ranks = popularity_ranks(item_counts(train_sessions, num_items))

    examples = datamodule.examples(cfg.split)
    keep = subsample(len(examples), cfg.get("max_test_examples"), seed)
    prefixes = [examples.prefixes[i] for i in keep]
    next_items = examples.next_items[keep]

    scorers: dict[str, ScoreFn] = {}
    results: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, score_fn: ScoreFn, batch_size: int) -> None:
        ranked = rank_examples(
            score_fn, prefixes, next_items, top_k, batch_size, exclude_seen=exclude_seen
        )
        results[name] = summarize_ranked(ranked, num_items, pop_ranks, ks, buckets)
        scorers[name] = score_fn
        log.info("%s: %s (%.1f s)", name, results[name]["metrics"], ranked.eval_time_s)

    module = pipeline.load_module(ckpt)
    evaluate(
        "SASRec",
        pipeline.model_scorer(module, int(cfg.data.max_len)),
        int(cfg.data.datamodule.eval_batch_size),
    )

    tune_cfg = cfg.tune
    valid = datamodule.examples("valid") if tune_cfg.enabled else None
    tuning: dict[str, Any] = {}
    if valid is not None:
        valid_keep = subsample(len(valid), tune_cfg.get("max_valid_examples"), seed)
        valid_prefixes = [valid.prefixes[i] for i in valid_keep]
        valid_next = valid.next_items[valid_keep]
        tuning = {
            "metric": str(tune_cfg.metric),
            "num_valid_examples": len(valid_keep),
            "num_valid_examples_split": len(valid),
            "baselines": {},
        }
        tune_sessions = train_sessions
        if cfg.data.datamodule.get("include_valid_in_train"):
            # a final refit trains on the validation sessions too: tune without them (no leak)
            tune_sessions = instantiate(
                cfg.data.datamodule, include_valid_in_train=False
            ).train_sessions()
    for class_name, spec in cfg.baselines.items():
        make = getattr(bl, class_name)
        fixed = dict(spec.get("params") or {})
        grid = {k: list(v) for k, v in (spec.get("grid") or {}).items()}
        chosen: dict[str, Any] = {}
        if grid and valid is not None:
            start = time.perf_counter()
            chosen, trials = tune_baseline(
                make, fixed, grid, tune_sessions, num_items, valid_prefixes, valid_next,
                metric=str(tune_cfg.metric), batch_size=int(cfg.baseline_batch_size),
            )  # fmt: skip
            tuning["baselines"][make.name] = {
                "class": class_name,
                "fixed": fixed,
                "grid": grid,
                "chosen": chosen,
                "trials": trials,
                "time_s": round(time.perf_counter() - start, 1),
            }
        baseline = make(**fixed, **chosen).fit(train_sessions, num_items)
        evaluate(make.name, baseline.score, int(cfg.baseline_batch_size))
        results[make.name]["params"] = {**fixed, **chosen}

    report: dict[str, Any] = {
        "dataset": cfg.data.name,
        "split": cfg.split,
        "num_examples": len(keep),
        "num_examples_split": len(examples),
        "num_items": num_items,
        "ks": ks,
        "top_k": top_k,
        "length_buckets": bucket_labels(buckets),
        "exclude_seen": exclude_seen,
        "ckpt": str(ckpt),
        "sasrec_hparams": {k: v for k, v in dict(module.hparams).items() if k != "num_items"},
        "protocol": "full-catalog ranking; rank = 1 + #other items scored >= next item "
        "(ties count against the model); baselines fitted on the same training sessions as SASRec",
        "results": results,
        "margin": relative_margin(results, "SASRec", [f"recall@{top_k}", f"mrr@{top_k}"]),
        "tuning": tuning,
        "train_result": train_result,
    }
    if cfg.data.source == "events" and cfg.conversions.enabled:
        report["conversions"] = _conversion_report(cfg, datamodule, scorers, top_k)
    report_dir = Path(cfg.report_dir)
    _write_json(report_dir / "quality.json", report)
    (report_dir / "quality.md").write_text(quality_markdown(report))
    plot_quality(report, report_dir / "quality.png")
    log.info("wrote %s/quality.{json,md,png}", report_dir)
    return report


def _conversion_report(
    cfg: Any, datamodule: Any, scorers: Mapping[str, ScoreFn], top_k: int
) -> dict[str, Any]:
    """Hit@K / MRR@K of every model on the cart and purchase examples of the test sessions."""
    from seqrec.data.conversions import conversion_examples, encode_conversions
    from seqrec.data.events import read_events

    # the same raw-id check as prepare, where the data config has one
    id_check = {"id_pattern": cfg.data.id_pattern} if "id_pattern" in cfg.data else {}
    events, _ = read_events(
        cfg.data.raw_path, event_types=None, ts_unit=cfg.data.ts_unit, **id_check
    )
    test_sessions = pd.read_parquet(Path(cfg.data.processed_dir) / "test.parquet")
    kinds = list(cfg.conversions.event_types)
    frame, stats = conversion_examples(
        events,
        test_sessions,
        gap_s=int(cfg.data.gap_s),
        known_items=set(datamodule.vocab.item_ids),
        event_types=kinds,
    )
    encoded = encode_conversions(frame, datamodule.vocab, kinds)
    results: dict[str, dict[str, Any]] = {name: {} for name in scorers}
    counts = {}
    for kind, (prefixes, next_items) in encoded.items():
        counts[kind] = len(prefixes)
        for name, score_fn in scorers.items():
            if not len(prefixes):
                results[name][kind] = metrics_from_ranks(np.zeros(0, np.int64), [top_k])
                continue
            ranked = rank_examples(score_fn, prefixes, next_items, top_k, batch_size=512)
            results[name][kind] = metrics_from_ranks(ranked.ranks, [top_k])
    return {
        "k": top_k,
        "counts": counts,
        "dropped": {k: v for k, v in stats.items() if k.startswith("num_dropped")},
        "stats": stats,
        "results": results,
    }


# ---------------------------------------------------------------------------- sweep collection


RESULT_FILE = "train_result.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
SWEEP_METRIC = "best_val_mrr@20"


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def collect_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run of a Hydra multirun, sorted by validation MRR@20 (best first).

    A run is a directory holding ``.hydra/overrides.yaml``; its ``train_result.json`` gives the
    figures (runs without one are kept with ``status = "no result"``). Columns: ``run`` (path
    relative to ``sweep_dir``), ``status``, one column per override key (values parsed as YAML),
    ``best_val_mrr@20``, the last validation metrics (``val/...``), ``train_time_s``, ``epochs``,
    ``global_step``, ``best_ckpt``.

    Raises:
        FileNotFoundError: ``sweep_dir`` holds no run.
    """
    from omegaconf import OmegaConf

    sweep_dir = Path(sweep_dir)
    run_dirs = sorted(
        {p.parent.parent for p in sweep_dir.rglob(str(OVERRIDES_FILE))}
        | {p.parent for p in sweep_dir.rglob(RESULT_FILE)},
        key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep_dir).parts],
    )
    if not run_dirs:
        raise FileNotFoundError(
            f"{sweep_dir}: no run directories (no {OVERRIDES_FILE} or {RESULT_FILE})"
        )
    rows = []
    for run_dir in run_dirs:
        row: dict[str, Any] = {"run": str(run_dir.relative_to(sweep_dir)) or "."}
        overrides_path = run_dir / OVERRIDES_FILE
        if overrides_path.is_file():
            for override in OmegaConf.to_container(OmegaConf.load(overrides_path)):
                key, _, value = str(override).partition("=")
                row[key.lstrip("+~")] = _parse_value(value)
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            row["status"] = "ok" if result.get(SWEEP_METRIC) is not None else "no checkpoint"
            row[SWEEP_METRIC] = result.get(SWEEP_METRIC)
            row.update({k: v for k, v in (result.get("last_val") or {}).items()})
            for key in ("train_time_s", "epochs", "global_step", "best_ckpt"):
                row[key] = result.get(key)
        else:
            row["status"] = "no result"
        rows.append(row)
    frame = pd.DataFrame(rows)
    if SWEEP_METRIC not in frame:
        frame[SWEEP_METRIC] = np.nan
    frame[SWEEP_METRIC] = pd.to_numeric(frame[SWEEP_METRIC], errors="coerce")
    first = ["run", "status", SWEEP_METRIC]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    return frame.sort_values(SWEEP_METRIC, ascending=False, na_position="last", kind="stable")


def sweep_param_columns(frame: pd.DataFrame) -> list[str]:
    """Override columns that take more than one value across the runs (the swept parameters)."""
    fixed = {"run", "status", SWEEP_METRIC, "train_time_s", "epochs", "global_step", "best_ckpt"}
    return [
        c
        for c in frame.columns
        if c not in fixed and not c.startswith("val/") and frame[c].astype(str).nunique() > 1
    ]


def sweep_markdown(frame: pd.DataFrame, title: str) -> str:
    """Markdown table of :func:`collect_sweep` (swept parameters, metrics, time)."""
    params = sweep_param_columns(frame)
    metrics = [c for c in ("val/recall@20", "val/ndcg@20") if c in frame.columns]
    cols = ["run", *params, SWEEP_METRIC, *metrics, "train_time_s", "epochs", "status"]
    cols = [c for c in cols if c in frame.columns]
    lines = [
        f"# {title}",
        "",
        f"{len(frame)} runs, {int((frame['status'] == 'ok').sum())} with a result; "
        f"sorted by validation MRR@20.",
        "",
        "| rank | " + " | ".join(cols) + " |",
        "|---:|" + "---|" * len(cols),
    ]

    def cell(col: str, value: Any) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return "-"
        if col in params and isinstance(value, float):
            return f"{value:.4g}"
        if col == "train_time_s":
            return f"{float(value):.1f}"
        return _fmt(value)

    for rank, (_, row) in enumerate(frame.iterrows(), start=1):
        lines.append(f"| {rank} | " + " | ".join(cell(c, row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(frame: pd.DataFrame, path: Path, max_params: int = 6) -> Path:
    """Validation MRR@20 per run (with the running best) and against each swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sweep_param_columns(frame)[:max_params]
    order = frame.assign(_job=[_job_number(r) for r in frame["run"]]).sort_values("_job")
    fig, axes = plt.subplots(
        1, 1 + len(params), figsize=(4.2 * (1 + len(params)), 3.8), squeeze=False
    )
    ax = axes[0, 0]
    values = order[SWEEP_METRIC].to_numpy(dtype=np.float64)
    ax.plot(np.arange(len(values)), values, "o", label="run")
    ax.plot(np.arange(len(values)), np.fmax.accumulate(np.nan_to_num(values, nan=-np.inf)), "-",
            label="best so far")  # fmt: skip
    ax.set_xlabel("run (job number order)")
    ax.set_ylabel("val MRR@20")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax, param in zip(axes[0, 1:], params, strict=True):
        column = frame[param]
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all():
            ax.plot(numeric, frame[SWEEP_METRIC], "o")
            if (numeric > 0).all() and numeric.max() / numeric.min() > 20:
                ax.set_xscale("log")
        else:
            cats = sorted(column.astype(str).unique())
            ax.plot([cats.index(v) for v in column.astype(str)], frame[SWEEP_METRIC], "o")
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(param)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _job_number(run: str) -> float:
    last = Path(run).name
    return float(last) if last.isdigit() else float("inf")
