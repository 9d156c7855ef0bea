"""Fill the generated blocks of README.md and PROPOSAL.md from the committed reports.

    python scripts/render_docs.py --collect   # copy the latest reports into docs/results/
    python scripts/render_docs.py             # rewrite the generated blocks from docs/results/
    python scripts/render_docs.py --check     # exit 1 if a block differs (run by the tests)

A generated block is the text between ``<!-- BEGIN generated: NAME -->`` and
``<!-- END generated: NAME -->``. Every number in it comes from a JSON report in
``docs/results/`` that a project command wrote (the command is named in the block). The reports
themselves live in ``artifacts/reports/`` (git-ignored); ``--collect`` copies the ones the docs
cite, so the docs and their sources are committed together and a test keeps them in step.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import (  # noqa: E402
    CLICK_STREAM_SINGLE_INT8,
    FLOOR_B64,
    FLOOR_B64_AFTER_SETUP,
    FLOOR_SINGLE_AFTER_SETUP,
    INT8_FLOOR,
    NEW_SESSION,
    NEW_SESSION_INT8,
    NEXT_CLICK,
    NEXT_CLICK_INT8,
    batching_phrase,
    time_breakdown,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "docs" / "results"
DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "PROPOSAL.md"]

# docs/results/<name> <- artifacts/reports/<source>
SOURCES = {
    "retailrocket_benchmark_quality.json": "retailrocket_benchmark/quality.json",
    "yoochoose_rsc15_100k_quality.json": "yoochoose_rsc15_100k/quality.json",
    "retailrocket_benchmark_throughput.json": "retailrocket_benchmark/throughput.json",
    "retailrocket_benchmark_replay.json": "retailrocket_benchmark/replay.json",
    "latency.json": "latency/latency.json",
    "latency_http_random.json": "latency_http_random/latency.json",
    "latency_http_2workers.json": "latency_http_2workers/latency.json",
    "retailrocket_benchmark_quality.png": "retailrocket_benchmark/quality.png",
    "retailrocket_benchmark_stats.json": "../../data/processed/retailrocket_benchmark/stats.json",
}

BLOCK = re.compile(
    r"(<!-- BEGIN generated: (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- END generated: (?P=name) -->)",
    re.S,
)

QUALITY_COMMANDS = {
    "retailrocket_benchmark": "python scripts/bench_quality.py data=retailrocket_benchmark "
    "data.datamodule.include_valid_in_train=true ckpt_path=<final ckpt> <grids> (README: How it was made)",
    "yoochoose_rsc15_100k": "python scripts/bench_quality.py data=yoochoose_rsc15_100k "
    "data.datamodule.include_valid_in_train=true ckpt_path=<final ckpt> <grids> (README: YOOCHOOSE)",
}


def _portable_paths(text: str) -> str:
    """Report text with this checkout's root and the data directory written as relative paths
    and ``$SEQREC_DATA_DIR``."""
    data_dir = os.environ.get("SEQREC_DATA_DIR") or str(REPO_ROOT.parent / "shared" / "data")
    text = text.replace(str(Path(data_dir).resolve()), "$SEQREC_DATA_DIR")
    return text.replace(str(REPO_ROOT) + "/", "")


def _load(results: Path, name: str) -> dict[str, Any]:
    path = results / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run the command that writes it, then --collect")
    return json.loads(path.read_text())


def quality_table(results: Path, dataset: str) -> str:
    """Model-vs-baselines table (Recall/MRR/NDCG at 10 and 20) and the margin over the best."""
    rep = _load(results, f"{dataset}_quality.json")
    cols = ["recall@10", "recall@20", "mrr@10", "mrr@20", "ndcg@10", "ndcg@20"]
    head = ["Recall@10", "Recall@20", "MRR@10", "MRR@20", "NDCG@10", "NDCG@20"]
    lines = [
        "| model | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, res in rep["results"].items():
        label = f"**{name}**" if name == "SASRec" else name
        lines.append(f"| {label} | " + " | ".join(f"{res['metrics'][c]:.4f}" for c in cols) + " |")
    margins = [
        f"{metric.replace('recall', 'Recall').replace('mrr', 'MRR')} "
        f"{m['relative']:+.1%} over {m['best_baseline']}"
        for metric, m in rep["margin"].items()
    ]
    hp = rep.get("sasrec_hparams", {})
    lines += [
        "",
        f"{rep['num_examples']:,} {rep['split']} examples, {rep['num_items']:,} items, full-catalog "
        f"ranking, ties against the model. SASRec (d_model {hp.get('d_model')}, "
        f"{hp.get('n_layers')} layers, copy mechanism {'on' if hp.get('copy_mechanism') else 'off'}"
        f"{' with recency bias' if hp.get('copy_recency') else ''}, "
        f"lr schedule {hp.get('lr_schedule', 'constant')}) vs the best baseline: "
        + "; ".join(margins)
        + ".",
        f"Source: `docs/results/{dataset}_quality.json`, written by "
        f"`{QUALITY_COMMANDS.get(dataset, 'python scripts/bench_quality.py data=' + dataset)}`.",
    ]
    return "\n".join(lines) + "\n"


def _offered(fixed: dict[str, Any], args: dict[str, Any]) -> str:
    """``"500 req/s offered for 60 s"`` of a fixed-rate phase, and how long its queue took to
    drain when the service could not keep up (the phase then runs past its schedule)."""
    planned = float(args.get("http_duration_s") or fixed["duration_s"])
    text = f"{fixed['target_rate_per_s']:.0f} req/s offered for {planned:.0f} s"
    if fixed["duration_s"] > 1.05 * planned:
        text += f" (the last answer came after {fixed['duration_s']:.0f} s)"
    return text


def _latency_rows(rep: dict[str, Any], size: int, threads: int = 1) -> list[dict[str, Any]]:
    return [r for r in rep["results"] if r["num_items"] == size and r["threads"] == threads]


def latency_summary(results: Path) -> str:
    """Predictor vs eager vs floor at the reference catalog size, batch 64, and the HTTP figures."""
    rep = _load(results, "latency.json")
    args = rep["args"]
    size, length = args["reference_size"], args["max_len"]
    rows = _latency_rows(rep, size)

    def pick(case: str, impl: str) -> dict[str, Any]:
        found = [r for r in rows if r["case"] == case and r["impl"] == impl]
        full = [r for r in found if r.get("session_len") in (None, length)]
        return (full or found)[0]

    floor = min(
        (r for r in rows if r["case"] == "single" and r["impl"].startswith("memory floor")),
        key=lambda r: r["p50_ms"],
    )
    eager = pick("single", "pytorch eager")
    lines = [
        "| one session, k = 20, 1 thread | p50 ms | p99 ms | p50 / floor p50 | p99 / floor p50 "
        "| eager / this |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    impls = [
        CLICK_STREAM_SINGLE_INT8,
        NEXT_CLICK_INT8,
        NEW_SESSION_INT8,
        NEXT_CLICK,
        NEW_SESSION,
        "onnx top-k in graph",
        "onnx full scores + numpy top-k",
        "pytorch eager",
    ]
    for impl in impls:
        if not any(r["impl"] == impl for r in rows):
            continue
        r = pick("single", impl)
        lines.append(
            f"| {impl} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_ms'] / floor['p50_ms']:.2f}x "
            f"| {r['p99_ms'] / floor['p50_ms']:.2f}x | {eager['p50_ms'] / r['p50_ms']:.2f}x |"
        )
    lines.append(
        f"| {floor['impl']} (the floor) | {floor['p50_ms']:.3f} | {floor['p99_ms']:.3f} | 1.00x | | |"
    )
    if any(r["impl"] == INT8_FLOOR for r in rows):
        r = pick("single", INT8_FLOOR)
        lines.append(
            f"| {INT8_FLOOR} (what the int8 catalog reads) | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['p50_ms'] / floor['p50_ms']:.2f}x | | |"
        )
    if any(r["impl"] == FLOOR_SINGLE_AFTER_SETUP for r in rows):
        r = pick("single", FLOOR_SINGLE_AFTER_SETUP)
        lines.append(
            f"| {FLOOR_SINGLE_AFTER_SETUP} (timed after the int8 next click's setup call) | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['p50_ms'] / floor['p50_ms']:.2f}x | | |"
        )
    batch = [r for r in rows if r["case"] == "batch64" and r.get("session_len") in (None, length)]
    if batch:
        b_floor = next(r for r in batch if r["impl"] == FLOOR_B64)
        b_setup = next((r for r in batch if r["impl"] == FLOOR_B64_AFTER_SETUP), None)
        b_eager = next(r for r in batch if r["impl"] == "pytorch eager")
        lines += [
            "",
            f"| batch of 64 sessions of {length} items, 1 thread | sessions/s | vs eager "
            "| p50 / floor |" + (" p50 / floor after the same setup |" if b_setup else ""),
            "|---|---:|---:|---:|" + ("---:|" if b_setup else ""),
        ]
        for r in batch:
            lines.append(
                f"| {r['impl']} | {r['sessions_per_s']:,.0f} | "
                f"{r['sessions_per_s'] / b_eager['sessions_per_s']:.2f}x | "
                f"{r['p50_ms'] / b_floor['p50_ms']:.2f}x |"
                + (f" {r['p50_ms'] / b_setup['p50_ms']:.2f}x |" if b_setup else "")
            )
    breakdown = time_breakdown(rep)
    if breakdown:
        lines += ["", "Where a next click's time goes (1 thread, same run):", ""]
        lines += [f"- {label}: {detail}" for label, detail in breakdown]
    http = rep.get("http") or {}
    fixed = http.get("fixed_rate")
    lines.append("")
    if fixed:
        flow = (
            f"incremental export ({http.get('precision', 'fp32')}), {http.get('shoppers')} "
            "shoppers browsing at once, each request one more click of a session"
            if http.get("workload", "widget") == "widget"
            else "independent random sessions of 1 to 10 items"
        )
        batching = batching_phrase(http)  # None for reports from before batching
        if batching:
            flow += f"; {batching}"
        lines.append(
            f"HTTP (`seqrec-serve`, loopback, load generator on the same cores; {flow}): "
            f"{_offered(fixed, args)} -> "
            f"{fixed['requests_per_s']:.0f} req/s served, p99 {fixed['p99_ms']:.1f} ms, "
            f"{fixed['errors']} errors"
            + (
                f" (CPU steal during the phase: {fixed['cpu_steal_pct']:.1f} % of the VM's time)"
                if fixed.get("cpu_steal_pct") is not None
                else ""
            )
            + "; highest rate holding p99 < "
            f"{args.get('http_p99_target_ms', 20):.0f} ms with zero errors: "
            f"{http.get('highest_rate_held') or 'none of the ladder'} req/s."
        )
    extra_runs = [
        (
            "latency_http_random.json",
            "Same service, independent random sessions of 1 to 10 items (no cached state usable: "
            "{hits:.0f} hits, {misses:.0f} misses)",
            "--http-workload random --http-bodies 80000",
        ),
        (
            "latency_http_2workers.json",
            "With `seqrec-serve --workers 2` (widget workload)",
            "--http-workers 2",
        ),
    ]
    for name, label, flags in extra_runs:
        if not (results / name).is_file():
            continue
        extra = _load(results, name)
        run = extra["http"]
        fixed_run = run["fixed_rate"]
        lines.append(
            f"{label.format(**run['state_cache'])}: {_offered(fixed_run, extra['args'])} -> "
            f"{fixed_run['requests_per_s']:.0f} "
            f"req/s served, p99 {fixed_run['p99_ms']:.1f} ms, {fixed_run['errors']} errors; "
            f"highest rate held {run['highest_rate_held']} req/s (`docs/results/{name}`, "
            f"`python scripts/bench_latency.py --sizes --d-model 128 --copy-mechanism {flags}`)."
        )
    machine = rep["machine"]
    flags = f"{' --d-model ' + str(args['d_model']) if args['d_model'] != 64 else ''}"
    flags += " --copy-mechanism" if args.get("copy_mechanism") else ""
    lines.append(
        f"{size:,} items, d_model {args['d_model']}, {args['n_layers']} layers, session of "
        f"{length} items, copy mechanism {'on' if args.get('copy_mechanism') else 'off'}; "
        f"{machine['cpu']}, {machine['cores']} cores, load average "
        f"{machine['load_avg_1_5_15'][0]:.2f} at start"
        + (
            f", CPU steal {rep['cpu_steal_pct']:.1f} % over the run"
            if rep.get("cpu_steal_pct") is not None
            else ""
        )
        + ". Source: `docs/results/latency.json`, "
        f"written by `python scripts/bench_latency.py{flags}`"
        + (f" (`make bench BENCH_ARGS='{flags.strip()}'`)." if flags else " (`make bench`).")
    )
    return "\n".join(lines) + "\n"


def throughput_summary(results: Path) -> str:
    """Training-throughput table (sequences/s before and after the speed work)."""
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from seqrec.throughput import throughput_markdown

    rep = _load(results, "retailrocket_benchmark_throughput.json")
    body = throughput_markdown(rep).split("\n", 2)[2]  # drop the title
    return body + (
        "Source: `docs/results/retailrocket_benchmark_throughput.json`, written by "
        "`python scripts/bench_train.py data=retailrocket_benchmark` (`make bench-train DATA=retailrocket_benchmark`).\n"
    )


def replay_summary(results: Path) -> str:
    """Widget replay table on the benchmark's test sessions."""
    rep = _load(results, "retailrocket_benchmark_replay.json")
    lines = [
        "| strip | hide seen items | next click in strip | strip changed | new items per update "
        "| p50 ms | p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rep["runs"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['k']} | {'yes' if r['exclude_seen'] else 'no'} | {r['hit_rate']:.1%} | "
            f"{r['strip_change_rate']:.1%} | {r['mean_new_items_per_update']:.1f} | "
            f"{lat['p50']:.2f} | {lat['p99']:.2f} |"
        )
    first = rep["runs"][0]
    cache = first.get("state_cache")
    cache_words = (
        f" From each visit's second click on, {cache['hits']:,} requests reused the cached states "
        f"of the earlier clicks and {cache['misses']:,} ran the whole visit again (incremental "
        "export)."
        if cache
        else ""
    )
    lines += [
        "",
        f"{first['num_sessions']:,} test sessions, {first['num_clicks']:,} clicks replayed one by "
        f"one ({rep['machine']}).{cache_words} Source: `docs/results/retailrocket_benchmark_replay.json`, "
        "written by `python scripts/replay_widget.py data=retailrocket_benchmark`.",
    ]
    return "\n".join(lines) + "\n"


def _margin_words(rep: dict[str, Any]) -> str:
    parts = []
    for metric, m in rep["margin"].items():
        label = metric.replace("recall", "Recall").replace("mrr", "MRR")
        parts.append(
            f"{label} {m['sasrec']:.4f} ({m['relative']:+.1%} vs {m['best_baseline']} {m['baseline']:.4f})"
        )
    return " and ".join(parts)


def proposal_data(results: Path) -> str:
    """Size of the RetailRocket benchmark as prepared."""
    stats = _load(results, "retailrocket_benchmark_stats.json")
    return (
        f"It has {stats['train_file']['num_sessions']:,} training visits and "
        f"{stats['num_test_examples']:,} test predictions from the following week over "
        f"{stats['num_items']:,} products (`python scripts/prepare_data.py "
        f"data=retailrocket_benchmark`, `docs/results/retailrocket_benchmark_stats.json`).\n"
    )


def proposal_yoochoose(results: Path) -> str:
    """One sentence: the YOOCHOOSE check."""
    rep = _load(results, "yoochoose_rsc15_100k_quality.json")
    return (
        f"On YOOCHOOSE ({rep['num_examples']:,} test predictions, {rep['num_items']:,} products) the "
        f"same recipe reaches {_margin_words(rep)} (README, YOOCHOOSE commands; "
        "`docs/results/yoochoose_rsc15_100k_quality.json`).\n"
    )


def proposal_tradeoffs(results: Path) -> str:
    """Accuracy, latency and training-time bullets from the reports."""
    quality = _load(results, "retailrocket_benchmark_quality.json")
    lat = _load(results, "latency.json")
    thr = _load(results, "retailrocket_benchmark_throughput.json")
    size = lat["args"]["reference_size"]
    single = [r for r in lat["results"] if r["case"] == "single" and r["threads"] == 1]

    def p50(num_items: int, impl: str) -> float:
        rows = [r for r in single if r["num_items"] == num_items and r["impl"] == impl]
        full = [r for r in rows if r.get("session_len") in (None, lat["args"]["max_len"])]
        return (full or rows)[0]["p50_ms"]

    measured = {r["impl"] for r in single}
    ours, cold_impl = "onnx top-k in graph", None
    for next_click, new_session in ((NEXT_CLICK, NEW_SESSION), (NEXT_CLICK_INT8, NEW_SESSION_INT8)):
        if next_click in measured:  # the int8 catalog (the served default) wins when measured
            ours, cold_impl = next_click, new_session
    sizes = sorted({r["num_items"] for r in single})
    cold = (
        f" ({p50(size, cold_impl):.2f} ms when the service has not seen the visit before and "
        "reads all of it)"
        if cold_impl in measured
        else ""
    )
    scaling = ", ".join(f"{p50(n, ours):.2f} ms at {n:,}" for n in sizes)
    http = lat.get("http") or {}
    fixed = http.get("fixed_rate") or {}
    held = http.get("highest_rate_held") or "none of the tried"
    target = lat["args"].get("http_p99_target_ms", 20.0)
    saturation = (
        f"; offered {fixed['target_rate_per_s']:.0f}/s it served "
        f"{fixed['requests_per_s']:.0f}/s with p99 {fixed['p99_ms']:.0f} ms (above the "
        f"{target:.0f} ms target)"
        if fixed and fixed.get("p99_ms", 0) > target
        else ""
    )
    served = (
        f"the service served {fixed['requests_per_s']:.0f} requests/s for "
        f"{fixed['duration_s']:.0f} s with p99 {fixed['p99_ms']:.0f} ms and no errors (the highest "
        f"step of its shorter rate ladder under {target:.0f} ms: {held}/s)"
        if fixed and not saturation and fixed.get("errors", 1) == 0
        else f"the service held {held} requests/s with p99 under {target:.0f} ms and no errors"
        f"{saturation}"
    )
    after = thr["results"]["length_bucketing"]
    train = _load(results, "retailrocket_benchmark_train_result.json")
    lines = [
        f"- **Accuracy.** On RetailRocket the model reaches {_margin_words(quality)}.",
        f"- **Speed.** One request after a click (a visit of {lat['args']['max_len']} clicks, "
        f"{size:,} products, one core) takes {p50(size, ours):.2f} ms at the median{cold}, "
        f"{p50(size, 'pytorch eager') / p50(size, ours):.1f}x faster than running the same model in "
        f"PyTorch; by catalog size: {scaling} products (a {lat['machine']['cores']}-core "
        f"{lat['machine']['cpu']} machine). Over HTTP, with the load generator on the same cores, "
        f"{served} (`python scripts/bench_latency.py`, `docs/results/latency.json`).",
        f"- **Training time.** The final RetailRocket model ({train['epochs']} passes over "
        f"the data, {train['num_items']:,} products) trained in {train['train_time_s'] / 60:.0f} "
        "min on the 2-core CPU (`docs/results/retailrocket_benchmark_train_result.json`); the "
        f"training step runs {thr['speedup_after_vs_before']:.0f}x faster than the "
        f"straightforward implementation ({after['sequences_per_s']:.0f} vs "
        f"{thr['results']['padded_all_positions']['sequences_per_s']:.0f} sequences/s, "
        "`python scripts/bench_train.py`).",
    ]
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Path], str]] = {
    "proposal:data": proposal_data,
    "proposal:yoochoose": proposal_yoochoose,
    "proposal:tradeoffs": proposal_tradeoffs,
    "quality:retailrocket_benchmark": lambda r: quality_table(r, "retailrocket_benchmark"),
    "quality:yoochoose_rsc15_100k": lambda r: quality_table(r, "yoochoose_rsc15_100k"),
    "latency": latency_summary,
    "throughput": throughput_summary,
    "replay": replay_summary,
}


def render(text: str, results: Path) -> str:
    """Replace every generated block of ``text``.

    Raises:
        KeyError: a block names no known renderer.
    """

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown generated block {name!r}; known: {sorted(RENDERERS)}")
        return match.group(1) + RENDERERS[name](results) + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--collect", action="store_true", help="copy artifacts/reports -> docs/results first"
    )
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--reports", type=Path, default=REPO_ROOT / "artifacts" / "reports")
    parser.add_argument("docs", nargs="*", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    if args.collect:
        args.results.mkdir(parents=True, exist_ok=True)
        for name, source in SOURCES.items():
            src = args.reports / source
            if src.is_file():
                if name.endswith(".json"):  # committed reports carry no machine-local paths
                    (args.results / name).write_text(_portable_paths(src.read_text()))
                else:
                    shutil.copyfile(src, args.results / name)
                print(f"collected {src} -> {args.results / name}")
    stale = []
    for doc in args.docs:
        old = doc.read_text()
        new = render(old, args.results)
        if new == old:
            continue
        if args.check:
            stale.append(doc)
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True), new.splitlines(True), str(doc), "rendered"
                )
            )
        else:
            doc.write_text(new)
            print(f"updated {doc}")
    if stale:
        print(f"stale generated blocks in {', '.join(map(str, stale))}: run scripts/render_docs.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
