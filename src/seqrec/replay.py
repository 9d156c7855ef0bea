"""Offline replay of the "you may also like" widget: real test sessions, click by click.

For every click of every replayed session the exported model is asked, through the same
:class:`seqrec.predictor.SessionRecommender` the service uses, for the strip the widget would show
after that click (``k`` items, ``exclude_seen`` as configured). The replay then reports what a
shopper would have seen:

* **strip hit rate**: share of clicks (except each session's last) whose *next* click is in the
  strip shown after it: the closest offline proxy of a click on the widget, by clicks-so-far bucket;
* **strip changes**: share of updates (clicks after the first) whose strip differs from the previous
  strip as a set, and the mean number of items that are new to the strip per update;
* **latency** of each ``recommend`` call in milliseconds (p50 / p95 / p99 / max), in process,
  one thread, no HTTP.

It bridges the offline metrics and an A/B test: it measures the widget's own behaviour (short
strip, exclusion of seen items, a refresh on every click) rather than Recall@20 over a ranked list.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from seqrec.constants import ITEM_ID, SESSION_ID, TS_MS
from seqrec.report import DEFAULT_LENGTH_BUCKETS, bucket_index, bucket_labels


def sessions_from_frame(frame: pd.DataFrame) -> list[list[str]]:
    """Long ``session_id, item_id[, ts_ms]`` frame -> item-id lists, oldest click first.

    Sessions keep their order of first appearance; within a session clicks are ordered by
    ``ts_ms`` when present (stable: file order breaks ties and orders missing times).
    """
    if frame.empty:
        return []
    codes = pd.factorize(frame[SESSION_ID], sort=False)[0]
    ts = (
        frame[TS_MS].astype("Float64").fillna(0).to_numpy(dtype=np.float64) if TS_MS in frame else 0
    )
    order = np.lexsort((np.broadcast_to(ts, codes.shape), codes))  # by session, then time
    items = frame[ITEM_ID].astype(str).to_numpy(dtype=object)[order]
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return [list(part) for part in np.split(items, bounds)]


def replay(
    recommender: Any,
    sessions: Sequence[Sequence[str]],
    k: int = 8,
    exclude_seen: bool = True,
    buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
) -> dict[str, Any]:
    """Replay sessions click by click through ``recommender.recommend``.

    Args:
        recommender: a :class:`seqrec.predictor.SessionRecommender` (anything with its
            ``recommend(session, k, exclude_seen)`` returning objects with ``item_id``).
        sessions: raw item ids per session, oldest first (sessions of one click are replayed too:
            they count for latency, not for hits).
        k: strip size (the widget shows 8 by default).
        exclude_seen: the widget's default hides items already clicked in the session.
        buckets: lower bounds of the clicks-so-far buckets for the hit rate.

    Returns:
        ``{"k", "exclude_seen", "num_sessions", "num_clicks", "num_predictions" (clicks with a next
        click), "hit_rate", "hit_rate_by_clicks_so_far": {bucket: {"hit_rate", "n"}},
        "strip_change_rate", "mean_new_items_per_update", "num_updates", "latency_ms":
        {"p50", "p95", "p99", "max", "mean"}}``.

    Raises:
        ValueError: ``k`` < 1 or no session has a click.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    latencies: list[float] = []
    hits: list[tuple[int, bool]] = []  # (clicks so far, next click in strip)
    changes: list[tuple[bool, int]] = []  # (strip changed, items new to the strip)
    num_clicks = 0
    for session in sessions:
        previous: set[str] | None = None
        for i in range(len(session)):
            start = time.perf_counter()
            strip = [r.item_id for r in recommender.recommend(session[: i + 1], k, exclude_seen)]
            latencies.append(time.perf_counter() - start)
            num_clicks += 1
            shown = set(strip)
            if i + 1 < len(session):
                hits.append((i + 1, str(session[i + 1]) in shown))
            if previous is not None:
                changes.append((shown != previous, len(shown - previous)))
            previous = shown
    if num_clicks == 0:
        raise ValueError("no clicks to replay: every session is empty")
    lat_ms = np.asarray(latencies) * 1e3
    by_bucket: dict[str, dict[str, float]] = {}
    if hits:
        index = bucket_index(np.asarray([n for n, _ in hits]), buckets)  # (num_predictions,)
        is_hit = np.asarray([h for _, h in hits], dtype=bool)
        for b, label in enumerate(bucket_labels(buckets)):
            mask = index == b
            by_bucket[label] = {
                "hit_rate": float(is_hit[mask].mean()) if mask.any() else float("nan"),
                "n": int(mask.sum()),
            }
    return {
        "k": int(k),
        "exclude_seen": bool(exclude_seen),
        "num_sessions": len(sessions),
        "num_clicks": num_clicks,
        "num_predictions": len(hits),
        "hit_rate": float(np.mean([h for _, h in hits])) if hits else float("nan"),
        "hit_rate_by_clicks_so_far": by_bucket,
        "num_updates": len(changes),
        "strip_change_rate": float(np.mean([c for c, _ in changes])) if changes else float("nan"),
        "mean_new_items_per_update": float(np.mean([n for _, n in changes]))
        if changes
        else float("nan"),
        "latency_ms": {
            "p50": float(np.percentile(lat_ms, 50)),
            "p95": float(np.percentile(lat_ms, 95)),
            "p99": float(np.percentile(lat_ms, 99)),
            "max": float(lat_ms.max()),
            "mean": float(lat_ms.mean()),
        },
    }


def _cache_words(info: Mapping[str, Any] | None) -> str:
    if not info:
        return ""
    return (
        f" Incremental export: {info['hits']:,} requests computed only the newest click from the "
        f"cached states of the earlier ones; {info['misses']:,} later clicks found no cached state "
        "and ran the whole session (a visit's first click always does and is not counted)."
    )


def replay_markdown(report: Mapping[str, Any]) -> str:
    """Markdown summary of a replay report (``{"dataset", "export_dir", "runs": [replay(...)]}``)."""
    runs = report["runs"]
    lines = [
        f"# Widget replay: {report['dataset']}",
        "",
        f"{runs[0]['num_sessions']:,} test sessions, {runs[0]['num_clicks']:,} clicks replayed one "
        f"by one through SessionRecommender ({report['export_dir']}); "
        f"{report['machine']}.{_cache_words(runs[0].get('state_cache'))}",
        "",
        "| strip k | exclude seen | next click in strip | strip changed | new items / update "
        "| p50 ms | p95 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lat = run["latency_ms"]
        lines.append(
            f"| {run['k']} | {'yes' if run['exclude_seen'] else 'no'} | {run['hit_rate']:.1%} | "
            f"{run['strip_change_rate']:.1%} | {run['mean_new_items_per_update']:.2f} | "
            f"{lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} |"
        )
    labels = list(runs[0]["hit_rate_by_clicks_so_far"])
    lines += [
        "",
        "Next click in the strip, by clicks so far:",
        "",
        "| strip k | exclude seen | " + " | ".join(labels) + " |",
        "|---:|---|" + "---:|" * len(labels),
    ]
    for run in runs:
        cells = [
            f"{run['hit_rate_by_clicks_so_far'][b]['hit_rate']:.1%} "
            f"(n={run['hit_rate_by_clicks_so_far'][b]['n']:,})"
            for b in labels
        ]
        lines.append(
            f"| {run['k']} | {'yes' if run['exclude_seen'] else 'no'} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def run_replay(cfg: Any) -> dict[str, Any]:
    """Replay the processed test sessions through an export; write ``replay.{json,md}``.

    Args:
        cfg: the composed ``conf/replay.yaml`` (data, export_dir, k, exclude_seen (list of bool),
            max_sessions, seed, num_threads, report_dir).

    Returns:
        ``{"dataset", "export_dir", "machine", "runs": [one :func:`replay` result per
        exclude_seen value, plus ``state_cache`` (hits, misses, entries, bytes of the
        recommender's session-state cache after the run; None for non-incremental exports)],
        "paths"}``.

    Raises:
        ValueError: ``k``, ``exclude_seen`` or ``max_sessions`` out of range (checked before any
            data is read).
        FileNotFoundError: no export in ``export_dir`` or no ``test.parquet`` (a benchmark without
            ``test_sessions.tsv``) in the processed data.
    """
    import json
    from pathlib import Path

    from seqrec.pipeline import _ensure_prepared
    from seqrec.predictor import SessionRecommender
    from seqrec.report import subsample
    from seqrec.throughput import machine_info

    k, flags, max_sessions = cfg.k, cfg.exclude_seen, cfg.get("max_sessions")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(flags, bool | str) or not flags or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"exclude_seen must be a non-empty list of booleans, got {flags!r}")
    if max_sessions is not None and (
        isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1
    ):
        raise ValueError(f"max_sessions must be null or an integer >= 1, got {max_sessions!r}")
    _ensure_prepared(cfg)
    sessions_path = Path(cfg.data.processed_dir) / "test.parquet"
    if not sessions_path.is_file():
        raise FileNotFoundError(
            f"{sessions_path} not found: this data set ships no whole test sessions to replay"
        )
    sessions = sessions_from_frame(pd.read_parquet(sessions_path))
    keep = subsample(len(sessions), cfg.get("max_sessions"), int(cfg.seed))
    sessions = [sessions[i] for i in keep]
    recommender = SessionRecommender.from_dir(
        cfg.export_dir,
        num_threads=int(cfg.num_threads),
        state_cache_mb=float(cfg.get("state_cache_mb", 256.0)),
    )
    runs = []
    for flag in cfg.exclude_seen:
        recommender.clear_state_cache()  # each run starts cold, as a fresh server would
        run = replay(recommender, sessions, int(cfg.k), bool(flag))
        run["state_cache"] = recommender.state_cache_info()  # None: not an incremental export
        runs.append(run)
    machine = machine_info()
    report = {
        "dataset": str(cfg.data.name),
        "export_dir": str(cfg.export_dir),
        "machine": f"{machine['cpu']}, {machine['logical_cores']} logical cores, "
        f"{int(cfg.num_threads)} onnxruntime thread(s), load average "
        f"{machine['load_average_1m_at_start']:.2f}",
        "runs": runs,
    }
    out_dir = Path(cfg.report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "replay.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "replay.md").write_text(replay_markdown(report))
    report["paths"] = [str(out_dir / "replay.json"), str(out_dir / "replay.md")]
    return report
