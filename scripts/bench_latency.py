"""Latency benchmark: the ONNX predictor against PyTorch eager and the measured memory floor, plus
an HTTP load test of the service.

    python scripts/bench_latency.py            # full run (several minutes; see --help)
    python scripts/bench_latency.py --quick    # tiny sizes, seconds (used by a test)

For each catalog size (random weights, d_model 64, 2 layers, max_len 50 by default) and thread
count it measures, in one process and one run:

* one session (k = 20): ``SessionRecommender.recommend`` (raw ids in, raw ids out) for each export
  layout (full scores + numpy top-k, top-k in the graph), PyTorch eager on the same weights
  (``score_last`` + ``torch.topk``, same id mapping), and the memory floor: numpy streaming the item
  table once (``table @ hidden`` and ``table.max()``; the faster counts);
* batch 64: ``recommend_batch`` vs eager vs a numpy (64, D) x (D, C) matmul of the same shape;
* every size: the incremental export in float32 and with an int8 catalog (``int8_catalog``: the
  item table read as int8, ``seqrec.incremental.quantize_catalog``), and the time to stream that
  int8 table with numpy (reported beside the float32 floor, which the targets use);
* at the RetailRocket size: also short sessions (5 items) and the fp16 / int8 variants;
* HTTP (``seqrec-serve`` in a subprocess, loopback only): closed loop at fixed concurrency, a fixed
  rate (default 500 req/s for 60 s), and a rate ladder for the highest rate that holds p99 < 20 ms
  with zero errors. Every phase is bounded in time and request count.

Results: ``<out-dir>/latency.json``, ``latency.md`` and ``latency.png``. Numbers depend on the
machine and on whatever else runs on it: the report records the CPU, core count, load average,
and the CPU time the hypervisor gave to other guests ("steal", Linux guests) over the whole run
and during every timed row and HTTP phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

log = logging.getLogger("bench_latency")

REPO_ROOT = Path(__file__).resolve().parents[1]
RETAILROCKET_ITEMS = 37_000
INCREMENTAL = "onnx incremental"
INCREMENTAL_INT8 = "onnx incremental int8 catalog"
NEXT_CLICK = "onnx incremental, next click (cached states)"
NEW_SESSION = "onnx incremental, new session (no cached state)"
NEXT_CLICK_INT8 = "onnx incremental int8 catalog, next click (cached states)"
NEW_SESSION_INT8 = "onnx incremental int8 catalog, new session (no cached state)"
INCREMENTAL_CASES = {
    INCREMENTAL: (NEXT_CLICK, NEW_SESSION),
    INCREMENTAL_INT8: (NEXT_CLICK_INT8, NEW_SESSION_INT8),
}
"""Export layout -> its (next click, new session) rows."""
INCREMENTAL_IMPLS = (NEXT_CLICK, NEW_SESSION, NEXT_CLICK_INT8, NEW_SESSION_INT8)
SERVED_IMPLS = ("onnx full scores + numpy top-k", "onnx top-k in graph", *INCREMENTAL_IMPLS)
MATMUL_ALONE = "onnxruntime: catalog matmul alone"
STEP_ALONE = "onnxruntime: step graph alone (inputs prepared, no Python around it)"
STEP_ALONE_INT8 = "onnxruntime: int8-catalog step graph alone (inputs prepared)"
INT8_DYNAMIC = "onnx int8 (dynamic), full scores"
FP16 = "onnx fp16, full scores"
FLOOR_B64 = "floor: numpy (64, D) x (D, C) matmul"
FLOOR_B64_AFTER_SETUP = "floor after the same setup: numpy (64, D) x (D, C) matmul"
"""The batch floor timed right after the untimed setup of the int8 next click (the previous
click of the same 64 sessions), as the predictor's timed call is: on a shared machine that setup
(tens of ms) lets the caches go cold, and a back-to-back floor keeps them warm."""
FLOOR_SINGLE_AFTER_SETUP = "floor after the same setup: numpy table @ h"
"""The single-session floor (``table @ h``) timed after the int8 next click's setup call."""
CLICK_STREAM_INT8 = (
    "onnx incremental int8 catalog, click stream (64 sessions click on, back to back)"
)
"""Sustained batch throughput: every timed call is the next click of 64 sessions whose previous
click was timed four calls earlier (4 groups of 64 shoppers take turns), with no setup call in
between; sessions grow from ``max_len - STREAM_CLICKS`` to ``max_len`` items, then start over
(that restart, a whole-session call, is untimed)."""
STREAM_CLICKS = 10
CLICK_STREAM_SINGLE_INT8 = (
    "onnx incremental int8 catalog, click stream (one session's next click, 64 sessions take turns)"
)
"""The widget's calls, one session at a time (without its ``exclude_seen`` filter, as every
row here): every timed call is the next click of one of 64
sessions whose previous click was timed 64 calls earlier (so every call runs the step graph, as
a widget visit does once its first click is served), with no setup call in between; sessions
grow from ``max_len - STREAM_CLICKS`` to ``max_len`` items, then start over (that restart, a
whole-session call, is untimed). :data:`NEXT_CLICK_INT8` times the same kind of call right after
an untimed call of the same session minus its newest item, which the cache does not hold (one
new session: the prefill graph's states part, then the step graph)."""
STREAM_SHOPPERS = 64
INT8_FLOOR = "int8 table floor: numpy int8 table.max()"
"""Streaming the int8 copy of the table that int8-catalog exports read (not the floor the targets
use: that is the float32 table of the model)."""


# ------------------------------------------------------------------------------------ timing


def _stats_ms(samples_s: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "n": int(arr.size),
    }


def cpu_steal_pct(before: Any, after: Any) -> float | None:
    """Percent of all CPUs' time between two ``psutil.cpu_times()`` readings that the hypervisor
    gave to other guests ("steal": this virtual machine wanted to run and could not). None where
    the platform reports no steal (not a Linux guest) or no time passed between the readings.
    Guest time is left out of the total, as psutil's own ``cpu_percent`` does (Linux counts it
    in user time too).

    Limits: /proc/stat counts in 10 ms ticks, so a row of about a second reads 0 unless several
    ticks were stolen (a 60 s phase on 2 CPUs resolves about 0.01 points); the share is of every
    CPU, idle ones included, so a one-thread row on 2 CPUs sees up to twice the steal it shows;
    and it says nothing of other guests' use of the shared caches and memory bandwidth. High
    steal in a slow row says the machine took time away; low steal does not prove the code was
    slow."""
    if not hasattr(before, "steal") or not hasattr(after, "steal"):
        return None

    def total(times: Any) -> float:
        return float(sum(times)) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)

    elapsed = total(after) - total(before)
    return 100.0 * (after.steal - before.steal) / elapsed if elapsed > 0 else None


def time_calls(
    fn: Callable[[int], Any],
    budget_s: float,
    min_calls: int,
    max_calls: int,
    warmup: int,
    setup: Callable[[int], Any] | None = None,
) -> dict[str, float]:
    """Time ``fn(i)`` for i = 0, 1, ...: ``warmup`` untimed calls, then as many timed calls as fit
    in ``budget_s`` (between ``min_calls`` and ``max_calls``); ``setup(i)``, when given, runs
    untimed before each call (e.g. the previous click of the session)."""
    for i in range(warmup):
        if setup is not None:
            setup(i)
        fn(i)
    samples: list[float] = []
    with frozen_heap():
        cpu_before = psutil.cpu_times()
        deadline = time.perf_counter() + budget_s
        i = 0
        while i < max_calls and (i < min_calls or time.perf_counter() < deadline):
            if setup is not None:
                setup(i)
            start = time.perf_counter()
            fn(i)
            samples.append(time.perf_counter() - start)
            i += 1
        steal = cpu_steal_pct(cpu_before, psutil.cpu_times())
    return {**_stats_ms(samples), "cpu_steal_pct": steal}


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect garbage, then freeze the objects the collector tracks (``gc.freeze``) for the
    timed calls, as ``seqrec-serve`` does before serving (``freeze_startup_objects``). Without it
    a full collection of this process (torch, the exports and the PyTorch baselines loaded: full
    collections took 0.05-0.9 s on the 2-core AMD VM) can land inside timed calls, and in an HTTP
    phase it would be charged to every request scheduled meanwhile. Unfrozen afterwards unless
    something was frozen before (an enclosing ``frozen_heap`` or the caller's own freeze, which
    ``gc.unfreeze`` would undo as well). The warm-up's cached states are frozen with the rest, so
    a timed call's full collections walk fewer objects than those of a server whose state cache
    has filled since startup."""
    was_frozen = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if not was_frozen:
            gc.unfreeze()


class ClickStream:
    """The timed calls of :data:`CLICK_STREAM_INT8`: ``prepare(i)`` (untimed) picks group
    ``i % 4`` and restarts it when its sessions have reached ``max_len`` items; ``click(i)`` (timed)
    asks for the group's sessions one item longer than at its previous call."""

    def __init__(
        self, recommend_batch: Callable[[list[list[str]]], Any], groups: list[list[list[str]]]
    ) -> None:
        self.recommend_batch = recommend_batch
        self.groups = groups  # each: 64 sessions of max_len items
        self.max_len = len(groups[0][0])
        self.start = max(1, self.max_len - STREAM_CLICKS)
        self.lengths = [0] * len(groups)
        self.batch: list[list[str]] = []

    def prepare(self, i: int) -> None:
        g = i % len(self.groups)
        if not self.lengths[g] or self.lengths[g] >= self.max_len:  # (re)start: whole sessions
            self.lengths[g] = self.start
            self.recommend_batch([s[: self.start] for s in self.groups[g]])
        self.lengths[g] += 1
        self.batch = [s[: self.lengths[g]] for s in self.groups[g]]

    def click(self, i: int) -> None:
        self.recommend_batch(self.batch)


# ------------------------------------------------------------------------------------ models


def build_export(
    num_items: int,
    args: argparse.Namespace,
    out_dir: Path,
    variant_kwargs: dict[str, Any],
    model: Any = None,
    exporters: list[str] | None = None,
) -> tuple[Any, Path]:
    """A random SASRec of ``num_items`` items and its verified export in ``out_dir``."""
    import torch

    from seqrec.data.vocab import ItemVocab
    from seqrec.export import ExportVariant, export_onnx
    from seqrec.models.sasrec import SASRec, SASRecConfig

    if model is None:
        torch.manual_seed(num_items)
        cfg = SASRecConfig(
            num_items=num_items,
            max_len=args.max_len,
            d_model=args.d_model,
            n_heads=args.n_heads,
            n_layers=args.n_layers,
            copy_mechanism=args.copy_mechanism,
        )
        model = SASRec(cfg).eval()
    vocab = ItemVocab([str(100_000 + i) for i in range(1, num_items + 1)])
    export_onnx(
        model,
        vocab,
        out_dir,
        fallback_items=vocab.item_ids[:100],
        variant=ExportVariant(**variant_kwargs),
        exporters=exporters,
    )
    return model, out_dir


def _sessions(num_items: int, count: int, length: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [
        [str(100_000 + int(i)) for i in rng.integers(1, num_items + 1, size=length)]
        for _ in range(count)
    ]


def _eager_fns(model: Any, max_len: int, k: int) -> tuple[Callable, Callable]:
    """Eager PyTorch doing what the predictor does: raw ids -> indices -> encode -> score -> top-k
    -> raw ids."""
    import torch

    from seqrec.sequence import encode_prefixes

    num_items = model.cfg.num_items
    index = {str(100_000 + i): i for i in range(1, num_items + 1)}
    item_ids = [str(100_000 + i) for i in range(1, num_items + 1)]

    def run(sessions: list[list[str]]) -> list[list[str]]:
        prefixes = [[index[i] for i in s if i in index] for s in sessions]
        with torch.inference_mode():
            scores = model.score_last(torch.from_numpy(encode_prefixes(prefixes, max_len)))
            top = torch.topk(scores, k, dim=1)
        return [[item_ids[i - 1] for i in row] for row in top.indices.tolist()]

    return (lambda session: run([session])), run


def catalog_matmul_session(table: np.ndarray, threads: int) -> Any:
    """An onnxruntime session of one MatMul node, (B, D) x (D, C - 1), holding the real items'
    rows of ``table`` (C, D) transposed, as the exported graphs hold it: the cost of the catalog
    step alone, without the transformer, log-softmax, filters or top-k."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = np.ascontiguousarray(table[1:].T)  # (D, C - 1): PAD row 0 is not scored
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", "table"], ["scores"])],
        "catalog_matmul",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", weights.shape[0]])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", weights.shape[1]])],
        [numpy_helper.from_array(weights, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def step_graph_feeds(
    session: Any, num_items: int, batch: int, past_len: int, k: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs for an incremental export's step graph (``seqrec.incremental``): ``batch``
    sessions with ``past_len`` cached positions each (random finite states; timing does not
    depend on the values), the model's unfiltered score mask (PAD excluded) and k."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        if arg.name == "item_ids":
            shape = (batch, past_len + 1)
            feeds[arg.name] = rng.integers(1, num_items + 1, size=shape, dtype=np.int64)
        elif arg.name.startswith("past_kv"):  # (B, H, P, Dh) per block, or all (2L, B, ...)
            per_block = arg.name != "past_kv"
            heads, head_dim = arg.shape[-3], arg.shape[-1]
            shape = (batch, heads, past_len, head_dim)
            if not per_block:
                shape = (arg.shape[0], *shape)
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
        elif arg.name == "past_copy_keys":  # (B, P, D)
            shape = (batch, past_len, arg.shape[2])
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
        elif arg.name == "score_mask":
            mask = np.zeros((1, num_items + 1), dtype=np.float32)
            mask[0, 0] = -np.inf
            feeds[arg.name] = mask
        elif arg.name == "k":
            feeds[arg.name] = np.array([k], dtype=np.int64)
        else:
            raise ValueError(f"unexpected step graph input {arg.name!r}")
    return feeds


def measure_size(
    num_items: int, args: argparse.Namespace, work_dir: Path, results: list[dict[str, Any]]
) -> None:
    """All in-process measurements for one catalog size (appended to ``results``)."""
    import torch
    from threadpoolctl import threadpool_limits

    from seqrec.incremental import int8_columns
    from seqrec.predictor import SessionRecommender

    k, budget_s = args.k, args.budget_s
    layouts: dict[str, dict[str, Any]] = {
        "onnx full scores + numpy top-k": {"top_k_in_graph": False},
        "onnx top-k in graph": {"top_k_in_graph": True},
        INCREMENTAL: {"top_k_in_graph": True, "incremental": True},
        INCREMENTAL_INT8: {
            "top_k_in_graph": True,
            "incremental": True,
            "precision": "int8_catalog",
            "min_top_k_overlap": 0,  # random weights: recorded per row, not enforced
        },
    }
    is_reference_size = num_items == args.reference_size
    if is_reference_size:
        layouts[INT8_DYNAMIC] = {"precision": "int8", "min_top_k_overlap": 0}
        layouts[FP16] = {"precision": "fp16", "min_top_k_overlap": 0}
    model = None
    export_dirs: dict[str, Path] = {}
    quality: dict[str, Any] = {}
    for name, variant in layouts.items():
        start = time.perf_counter()
        model, export_dirs[name] = build_export(
            num_items,
            args,
            work_dir / f"{num_items}_{len(export_dirs)}",
            variant,
            model,
            exporters=None if variant.get("incremental") else args.exporters,
        )
        meta = json.loads((export_dirs[name] / "export_meta.json").read_text())
        quality[name] = meta["quality"]["top_k_overlap_mean"]
        log.info("exported %s for %d items in %.1f s", name, num_items, time.perf_counter() - start)

    table = model.item_emb.weight.detach().numpy().copy()  # (C, D) float32, as the graph holds it
    # the int8 copy an int8-catalog export streams: one byte per value
    table_int8 = int8_columns(np.ascontiguousarray(table[1:].T))[0]  # (D, C - 1) int8
    lengths = {"full": args.max_len}
    if is_reference_size:
        lengths["short"] = args.short_session_len
    for threads in args.threads:
        torch.set_num_threads(threads)
        single_eager, batch_eager = _eager_fns(model, args.max_len, k)
        recommenders = {
            name: SessionRecommender.from_dir(path, num_threads=threads)
            for name, path in export_dirs.items()
        }
        hidden = np.random.default_rng(0).standard_normal(table.shape[1]).astype(np.float32)
        scores_out = np.empty(table.shape[0], dtype=np.float32)
        hidden_b = np.random.default_rng(1).standard_normal((64, table.shape[1])).astype(np.float32)
        scores_b = np.empty((64, table.shape[0]), dtype=np.float32)
        with threadpool_limits(limits=threads):
            floor_dot = time_calls(
                lambda i, h=hidden, out=scores_out: np.dot(table, h, out=out),
                budget_s,
                200,
                20_000,
                20,
            )
            floor_max = time_calls(lambda i: table.max(), budget_s, 200, 20_000, 20)
            floor_int8 = time_calls(lambda i: table_int8.max(), budget_s, 200, 20_000, 20)
            floor_b64 = time_calls(
                lambda i, h=hidden_b, out=scores_b: np.matmul(h, table.T, out=out),
                budget_s,
                20,
                2_000,
                3,
            )
        floor = min(floor_dot, floor_max, key=lambda s: s["p50_ms"])
        # where the time of a next click goes: the catalog matmul alone in onnxruntime, then the
        # whole step graph without the predictor's Python around it (same threads, same run)
        matmul = catalog_matmul_session(table, threads)
        steps = {
            STEP_ALONE: recommenders[INCREMENTAL]._step_session,
            STEP_ALONE_INT8: recommenders[INCREMENTAL_INT8]._step_session,
        }
        parts: dict[str, dict[str, dict[str, float]]] = {}
        for case, rows_in, calls in (
            ("single", 1, (200, 20_000, 30)),
            ("batch64", 64, (10, 2_000, 3)),
        ):
            hidden_in = hidden[None] if rows_in == 1 else hidden_b
            parts[case] = {
                MATMUL_ALONE: time_calls(
                    lambda i, h=hidden_in, m=matmul: m.run(None, {"hidden": h}), budget_s, *calls
                )
            }
            for label, step in steps.items():
                feeds = step_graph_feeds(step, num_items, rows_in, args.max_len - 1, k)
                parts[case][label] = time_calls(
                    lambda i, f=feeds, g=step: g.run(None, f), budget_s, *calls
                )
        base = {"num_items": num_items, "threads": threads, "d_model": args.d_model}
        results.append(
            {**base, "case": "single", "impl": "memory floor: numpy table @ h", **floor_dot}
        )
        results.append(
            {**base, "case": "single", "impl": "memory floor: numpy table.max()", **floor_max}
        )
        results.append({**base, "case": "single", "impl": INT8_FLOOR, **floor_int8})
        results.append(
            {
                **base,
                "case": "batch64",
                "impl": FLOOR_B64,
                **floor_b64,
                "sessions_per_s": 64e3 / floor_b64["p50_ms"],
            }
        )
        for case, timings in parts.items():
            for impl, stats in timings.items():
                row = {**base, "case": case, "session_len": args.max_len, "impl": impl, **stats}
                if case == "single":
                    row["x_floor_p50"] = stats["p50_ms"] / floor["p50_ms"]
                    row["x_floor_p99"] = stats["p99_ms"] / floor["p50_ms"]
                else:
                    row["sessions_per_s"] = 64e3 / stats["p50_ms"]
                    row["x_floor_p50"] = stats["p50_ms"] / floor_b64["p50_ms"]
                results.append(row)
        for length_name, length in lengths.items():
            sessions = _sessions(num_items, 256, length, seed=length)
            batches = [sessions[i : i + 64] for i in range(0, 256, 64)]
            impls: dict[str, tuple[Callable, Callable]] = {
                "pytorch eager": (single_eager, batch_eager)
            }
            setups: dict[str, tuple[Callable, Callable]] = {}
            for name, rec in recommenders.items():
                if threads > 1 and name in (INT8_DYNAMIC, FP16):
                    continue  # precision variants: one thread only
                if name in INCREMENTAL_CASES:
                    next_click, new_session = INCREMENTAL_CASES[name]
                    # the widget's case: the session minus its newest item was served just before
                    # (untimed setup call), so the timed call computes one position
                    impls[next_click] = (
                        (lambda s, r=rec: r.recommend(s, k=k)),
                        (lambda b, r=rec: r.recommend_batch(b, k=k)),
                    )
                    setups[next_click] = (
                        (lambda s, r=rec: r.recommend(s[:-1], k=k)),
                        (lambda b, r=rec: r.recommend_batch([s[:-1] for s in b], k=k)),
                    )
                    # a session never seen before (cache emptied before each call)
                    impls[new_session] = (
                        (lambda s, r=rec: (r.clear_state_cache(), r.recommend(s, k=k))),
                        (lambda b, r=rec: (r.clear_state_cache(), r.recommend_batch(b, k=k))),
                    )
                    continue
                impls[name] = (
                    (lambda s, r=rec: r.recommend(s, k=k)),
                    (lambda b, r=rec: r.recommend_batch(b, k=k)),
                )
            for impl, (single_fn, batch_fn) in impls.items():
                single_setup, batch_setup = setups.get(impl, (None, None))
                single = time_calls(
                    lambda i, f=single_fn, s=sessions: f(s[i % 256]),
                    budget_s,
                    200,
                    20_000,
                    30,
                    None
                    if single_setup is None
                    else (lambda i, g=single_setup, s=sessions: g(s[i % 256])),
                )
                row = {**base, "case": "single", "session_len": length, "impl": impl, **single}
                row["x_floor_p50"] = single["p50_ms"] / floor["p50_ms"]
                row["x_floor_p99"] = single["p99_ms"] / floor["p50_ms"]
                layout = next((n for n, c in INCREMENTAL_CASES.items() if impl in c), impl)
                row["top_k_overlap"] = quality.get(layout)
                results.append(row)
                if length_name == "short" and impl != "pytorch eager":
                    continue
                if impl in (INT8_DYNAMIC, FP16):
                    continue
                batch = time_calls(
                    lambda i, f=batch_fn, b=batches: f(b[i % 4]),
                    budget_s,
                    10,
                    2_000,
                    3,
                    None
                    if batch_setup is None
                    else (lambda i, g=batch_setup, b=batches: g(b[i % 4])),
                )
                row = {**base, "case": "batch64", "session_len": length, "impl": impl, **batch}
                row["sessions_per_s"] = 64e3 / batch["p50_ms"]
                row["x_floor_p50"] = batch["p50_ms"] / floor_b64["p50_ms"]
                results.append(row)
            if length_name == "full" and NEXT_CLICK_INT8 in setups:
                one_by_one = ClickStream(
                    lambda batch, f=impls[NEXT_CLICK_INT8][0]: f(batch[0]),
                    [[s] for s in sessions[:STREAM_SHOPPERS]],
                )
                stats = time_calls(one_by_one.click, budget_s, 200, 20_000, 30, one_by_one.prepare)
                row = {
                    **base,
                    "case": "single",
                    "session_len": length,
                    "impl": CLICK_STREAM_SINGLE_INT8,
                    **stats,
                    "x_floor_p50": stats["p50_ms"] / floor["p50_ms"],
                    "x_floor_p99": stats["p99_ms"] / floor["p50_ms"],
                    "top_k_overlap": quality.get(INCREMENTAL_INT8),
                }
                results.append(row)
                stream = ClickStream(impls[NEXT_CLICK_INT8][1], batches)
                stats = time_calls(stream.click, budget_s, 20, 2_000, 8, stream.prepare)
                row = {
                    **base,
                    "case": "batch64",
                    "session_len": length,
                    "impl": CLICK_STREAM_INT8,
                    **stats,
                    "sessions_per_s": 64e3 / stats["p50_ms"],
                    "x_floor_p50": stats["p50_ms"] / floor_b64["p50_ms"],
                }
                results.append(row)
                # the floors once more, each right after the int8 next click's untimed setup
                single_setup, batch_setup = setups[NEXT_CLICK_INT8]
                with threadpool_limits(limits=threads):
                    after_setup = {
                        ("single", FLOOR_SINGLE_AFTER_SETUP): time_calls(
                            lambda i, h=hidden, out=scores_out: np.dot(table, h, out=out),
                            budget_s,
                            200,
                            20_000,
                            20,
                            lambda i, g=single_setup, s=sessions: g(s[i % 256]),
                        ),
                        ("batch64", FLOOR_B64_AFTER_SETUP): time_calls(
                            lambda i, h=hidden_b, out=scores_b: np.matmul(h, table.T, out=out),
                            budget_s,
                            10,
                            2_000,
                            3,
                            lambda i, g=batch_setup, b=batches: g(b[i % 4]),
                        ),
                    }
                for (case, impl), stats in after_setup.items():
                    row = {**base, "case": case, "impl": impl, **stats}
                    if case == "batch64":
                        row["sessions_per_s"] = 64e3 / stats["p50_ms"]
                    results.append(row)
            log.info(
                "measured %d items, %d thread(s), %s sessions", num_items, threads, length_name
            )


# -------------------------------------------------------------------------------------- HTTP


class _HttpConnection:
    """A minimal keep-alive HTTP/1.1 client connection (asyncio streams): cheap enough that the
    load generator does not eat the cores it shares with the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST /recommendations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def _load(
    port: int,
    next_body: Callable[[], bytes],
    concurrency: int,
    duration_s: float,
    rate_per_s: float | None,
    max_requests: int,
) -> dict[str, Any]:
    """Send requests for ``duration_s`` (and at most ``max_requests``) over ``concurrency``
    connections: as fast as possible (``rate_per_s`` None), or on a fixed schedule. With a schedule,
    latency counts from the scheduled send time, so queueing in the client is not hidden. Bodies
    come from ``next_body`` (shared across phases, so a phase continues where the last stopped)."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(max_requests))
    cpu_before = psutil.cpu_times()
    start = time.perf_counter() + 0.05
    stop = start + duration_s

    async def worker() -> None:
        conn = _HttpConnection("127.0.0.1", port)
        try:
            for i in counter:
                due = start + i / rate_per_s if rate_per_s else time.perf_counter()
                if due >= stop:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    status = await asyncio.wait_for(conn.request(next_body()), 5.0)
                    if status != 200:
                        errors[str(status)] = errors.get(str(status), 0) + 1
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    await conn.close()
                    conn = _HttpConnection("127.0.0.1", port)
                latencies.append(time.perf_counter() - due)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed_s = time.perf_counter() - start
    steal = cpu_steal_pct(cpu_before, psutil.cpu_times())
    stats = _stats_ms(latencies) if latencies else {}
    return {
        "concurrency": concurrency,
        "target_rate_per_s": rate_per_s,
        "duration_s": round(elapsed_s, 2),
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "requests_per_s": len(latencies) / elapsed_s if elapsed_s > 0 else 0.0,
        **stats,
        "cpu_steal_pct": steal,
    }


def _scrape_cache(port: int) -> dict[str, float] | None:
    """The server's ``seqrec_state_cache_*`` metrics (None when it has no cache)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {
        sample.name.removeprefix("seqrec_state_cache_").removesuffix("_total"): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("seqrec_state_cache_")
    }
    return values or None


def widget_bodies(num_items: int, shoppers: int, count: int, seed: int = 0) -> list[bytes]:
    """Request bodies as the product-page widget sends them: ``shoppers`` shoppers browse at the
    same time; each request is one shopper's session after one more click (1 to 10 clicks per
    session, then a new shopper takes the place), k = 20, seen items excluded."""
    rng = random.Random(seed)
    ids = [str(100_000 + i) for i in range(1, num_items + 1)]

    def new_shopper() -> tuple[list[str], int]:
        return [], rng.randint(1, 10)

    active = [new_shopper() for _ in range(shoppers)]
    bodies = []
    for _ in range(count):
        slot = rng.randrange(shoppers)
        session, length = active[slot]
        session.append(rng.choice(ids))
        bodies.append(json.dumps({"session": session, "k": 20, "exclude_seen": True}).encode())
        if len(session) >= length:
            active[slot] = new_shopper()
    return bodies


def random_bodies(num_items: int, count: int, seed: int = 0) -> list[bytes]:
    """Independent sessions of 1 to 10 random items (k = 20, seen items excluded): every
    request is a visit the server has not seen, so no state can be reused."""
    rng = random.Random(seed)
    ids = [str(100_000 + i) for i in range(1, num_items + 1)]
    return [
        json.dumps(
            {"session": rng.sample(ids, rng.randint(1, 10)), "k": 20, "exclude_seen": True}
        ).encode()
        for _ in range(count)
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_http(export_dir: Path, args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """Start ``seqrec-serve`` on loopback in a subprocess and run the three load phases."""
    import urllib.request

    port = _free_port()
    script = shutil.which("seqrec-serve") or str(Path(sys.executable).parent / "seqrec-serve")
    cmd = [script, str(export_dir), "--port", str(port), "--num-threads", "1"]
    cmd += ["--workers", str(args.http_workers)]
    if args.http_max_batch_size is not None:
        cmd += ["--max-batch-size", str(args.http_max_batch_size)]
    if not args.http_request_logs:
        cmd.append("--no-request-logs")
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"seqrec-serve did not start; see {log_path}")
            time.sleep(0.2)
        meta = json.loads((export_dir / "export_meta.json").read_text())
        if args.http_workload == "widget":
            bodies = widget_bodies(int(meta["num_items"]), args.http_shoppers, args.http_bodies)
        else:
            bodies = random_bodies(int(meta["num_items"]), args.http_bodies)

        def run(phase: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
            with frozen_heap():  # the load generator's own collections stay short
                return asyncio.run(phase)

        out: dict[str, Any] = {"server_request_logs": args.http_request_logs}
        next_body = itertools.cycle(bodies).__next__
        run(_load(port, next_body, 4, 1.0, None, 10_000))  # warm-up
        out["closed_loop"] = run(
            _load(port, next_body, args.http_concurrency, args.http_closed_s, None, 200_000)
        )
        out["fixed_rate"] = run(
            _load(
                port,
                next_body,
                args.http_rate_concurrency,
                args.http_duration_s,
                args.http_rate,
                int(args.http_rate * args.http_duration_s) + 1,
            )
        )
        ladder = []
        for rate in args.http_ladder:
            step = run(
                _load(
                    port,
                    next_body,
                    args.http_rate_concurrency,
                    args.http_ladder_s,
                    rate,
                    int(rate * args.http_ladder_s) + 1,
                )
            )
            step["holds"] = bool(
                step["errors"] == 0
                and step.get("p99_ms", 1e9) < args.http_p99_target_ms
                and step["requests_per_s"] >= 0.95 * rate
            )
            ladder.append(step)
            log.info(
                "HTTP %s req/s: p99 %.1f ms, %d errors",
                rate,
                step.get("p99_ms", float("nan")),
                step["errors"],
            )
            if not step["holds"]:
                break
        out["ladder"] = ladder
        held = [s["target_rate_per_s"] for s in ladder if s["holds"]]
        out["highest_rate_held"] = max(held) if held else None
        out["incremental"] = bool(meta.get("incremental"))
        out["precision"] = meta["variant"]["precision"]
        out["workload"] = args.http_workload
        out["workers"] = args.http_workers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            out["max_batch_size"] = json.loads(r.read())["settings"]["max_batch_size"]
        out["shoppers"] = args.http_shoppers if args.http_workload == "widget" else None
        out["state_cache"] = _scrape_cache(port)
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import torch

    from seqrec.throughput import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1_5_15": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def batching_phrase(http: dict[str, Any]) -> str | None:
    """How the server of an HTTP report batched requests ("dynamic batching up to 64", "no
    dynamic batching"), or None for reports from before dynamic batching (which scored each
    request on its own and did not record ``max_batch_size``)."""
    size = http.get("max_batch_size")
    if size is None:
        return None
    return "no dynamic batching" if size == 1 else f"dynamic batching up to {size}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    rows = report["results"]
    lines = [
        "# Latency benchmark",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; load average "
        f"before {', '.join(f'{x:.2f}' for x in report['machine']['load_avg_1_5_15'])}, after "
        f"{', '.join(f'{x:.2f}' for x in report['load_avg_after'])}; "
        f"CPU steal over the run {_fmt(report.get('cpu_steal_pct'), 2)} % (time the hypervisor "
        "gave to other guests, as a share of both CPUs; per row in the steal % columns, in 10 ms "
        "ticks, so short rows read 0; it does not show other guests' use of caches and memory "
        "bandwidth). "
        f"Model: random SASRec, d_model {report['args']['d_model']}, "
        f"{report['args']['n_layers']} layers, max_len {report['args']['max_len']}, copy "
        f"mechanism {'on' if report['args'].get('copy_mechanism') else 'off'}, k = "
        f"{report['args']['k']}. Mode: "
        + (
            "quick (a smoke test: tiny catalog and short phases, so the ratios and targets below "
            "say nothing about speed; run without --quick for real figures)."
            if report["args"]["quick"]
            else "full."
        ),
        "",
        "## One session",
        "",
        "x floor = latency (p50 or p99) / p50 of the memory floor (numpy streaming the item table "
        "once, same threads, same run).",
        "",
        "| items | threads | session len | implementation | p50 ms | p95 ms | p99 ms | p50 x floor "
        "| p99 x floor p50 | top-20 overlap | steal % |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["case"] != "single":
            continue
        lines.append(
            f"| {r['num_items']} | {r['threads']} | {_fmt(r.get('session_len'))} | {r['impl']} | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | "
            f"{_fmt(r.get('x_floor_p50'), 2)} | {_fmt(r.get('x_floor_p99'), 2)} | "
            f"{_fmt(r.get('top_k_overlap'), 4)} | {_fmt(r.get('cpu_steal_pct'), 2)} |"
        )
    lines += [
        "",
        "## Batch of 64 sessions",
        "",
        "| items | threads | session len | implementation | p50 ms | p99 ms | sessions/s | "
        "p50 x floor | steal % |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["case"] != "batch64":
            continue
        lines.append(
            f"| {r['num_items']} | {r['threads']} | {_fmt(r.get('session_len'))} | {r['impl']} | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['sessions_per_s'], 0)} | "
            f"{_fmt(r.get('x_floor_p50'), 2)} | {_fmt(r.get('cpu_steal_pct'), 2)} |"
        )
    http = report.get("http")
    if http:
        lines += [
            "",
            f"## HTTP (seqrec-serve, {http.get('workers', 1)} worker(s), 1 onnxruntime thread each, "
            + (f"{batching_phrase(http)}, " if batching_phrase(http) else "")
            + f"{http['num_items']} items, "
            "loopback, load generator on the same cores)",
            "",
            f"Export: {'incremental (states cached per session)' if http.get('incremental') else 'top-k in graph'}"
            f", {http.get('precision', 'fp32')}"
            + (
                f". Requests: {http.get('shoppers', '?')} shoppers browsing at once, each request "
                "one shopper's session after one more click (1 to 10 clicks), k = 20, seen items "
                "excluded."
                if http.get("workload", "widget") == "widget"
                else ". Requests: independent random sessions of 1 to 10 items (none seen before), "
                "k = 20, seen items excluded."
            )
            + (
                f" State cache after the run: {http['state_cache']['hits']:.0f} hits, "
                f"{http['state_cache']['misses']:.0f} misses."
                if http.get("state_cache")
                else ""
            ),
            "",
            "| phase | concurrency | target req/s | duration s | requests | errors | req/s | p50 ms "
            "| p99 ms | steal % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        phases = [("closed loop", http["closed_loop"]), ("fixed rate", http["fixed_rate"])]
        phases += [("ladder", step) for step in http["ladder"]]
        for name, p in phases:
            lines.append(
                f"| {name} | {p['concurrency']} | {_fmt(p['target_rate_per_s'])} | "
                f"{p['duration_s']} | {p['requests']} | {p['errors']} | "
                f"{_fmt(p['requests_per_s'], 0)} | {_fmt(p.get('p50_ms'), 2)} | "
                f"{_fmt(p.get('p99_ms'), 2)} | {_fmt(p.get('cpu_steal_pct'), 2)} |"
            )
        lines.append("")
        lines.append(
            f"Highest rate held (p99 < {report['args']['http_p99_target_ms']} ms, zero errors): "
            + (
                f"{_fmt(http['highest_rate_held'])} req/s."
                if http["highest_rate_held"]
                else "none."
            )
        )
    lines += ["", "## Targets (reference size, 1 thread)", ""]
    lines += [f"- {line}" for line in report["targets"]]
    path.write_text("\n".join(lines) + "\n")


def _reference_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Result rows at the reference catalog size, 1 thread."""
    size = report["args"]["reference_size"]
    return [r for r in report["results"] if r["num_items"] == size and r["threads"] == 1]


def _pick(
    rows: list[dict[str, Any]], case: str, impl: str, length: int | None = None
) -> dict[str, Any] | None:
    """The first row of ``case`` / ``impl`` (and session length, when given), or None."""
    for r in rows:
        same_length = length is None or r.get("session_len") == length
        if r["case"] == case and r["impl"] == impl and same_length:
            return r
    return None


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's done-when checks, worded with the measured numbers."""
    rows = _reference_rows(report)

    out = []
    floor = min(
        (r for r in rows if r["case"] == "single" and r["impl"].startswith("memory floor")),
        key=lambda r: r["p50_ms"],
        default=None,
    )
    int8_floor = _pick(rows, "single", INT8_FLOOR)
    for length in sorted({r.get("session_len") for r in rows if r.get("session_len")}):
        eager = _pick(rows, "single", "pytorch eager", length)
        for impl in (*SERVED_IMPLS, CLICK_STREAM_SINGLE_INT8):
            r = _pick(rows, "single", impl, length)
            if not (r and eager and floor):
                continue
            own_table = (
                f"; {r['p50_ms'] / int8_floor['p50_ms']:.2f}x the int8 table it reads "
                f"({int8_floor['p50_ms']:.3f} ms)"
                if int8_floor
                and impl in (NEXT_CLICK_INT8, NEW_SESSION_INT8, CLICK_STREAM_SINGLE_INT8)
                else ""
            )
            single_setup = _pick(rows, "single", FLOOR_SINGLE_AFTER_SETUP)
            if single_setup and impl == NEXT_CLICK_INT8 and length == report["args"]["max_len"]:
                own_table += (
                    f"; {r['p50_ms'] / single_setup['p50_ms']:.2f}x the floor timed after the "
                    f"same setup call ({single_setup['p50_ms']:.3f} ms)"
                )
            out.append(
                f"one session of {length} items, {impl}: p50 {r['p50_ms']:.3f} ms = "
                f"{r['x_floor_p50']:.2f}x floor ({floor['p50_ms']:.3f} ms; target <= 1.3x: "
                f"{'met' if r['x_floor_p50'] <= 1.3 else 'NOT met'}{own_table}), p99 "
                f"{r['p99_ms']:.3f} ms = {r['x_floor_p99']:.2f}x (target <= 3x: "
                f"{'met' if r['x_floor_p99'] <= 3 else 'NOT met'}); eager p50 {eager['p50_ms']:.3f}"
                f" ms = {eager['p50_ms'] / r['p50_ms']:.2f}x slower (target >= 1.5x: "
                f"{'met' if eager['p50_ms'] / r['p50_ms'] >= 1.5 else 'NOT met'})"
            )
    eager_b = _pick(rows, "batch64", "pytorch eager", report["args"]["max_len"])
    floor_b = _pick(rows, "batch64", FLOOR_B64)
    floor_b_setup = _pick(rows, "batch64", FLOOR_B64_AFTER_SETUP)
    for impl in (*SERVED_IMPLS, CLICK_STREAM_INT8):
        r = _pick(rows, "batch64", impl, report["args"]["max_len"])
        if not (r and eager_b and floor_b):
            continue
        same_setup = ""
        if floor_b_setup and impl == NEXT_CLICK_INT8:
            ratio = r["p50_ms"] / floor_b_setup["p50_ms"]
            same_setup = (
                f"; {ratio:.2f}x the same matmul timed after the same setup call "
                f"({floor_b_setup['p50_ms']:.2f} ms; {'within' if ratio <= 1.5 else 'above'} 1.5x)"
            )
        out.append(
            f"batch 64 x {report['args']['max_len']} items, {impl}: {r['sessions_per_s']:.0f} "
            f"sessions/s vs eager {eager_b['sessions_per_s']:.0f} (target >= eager: "
            f"{'met' if r['sessions_per_s'] >= eager_b['sessions_per_s'] else 'NOT met'}), "
            f"{r['x_floor_p50']:.2f}x the back-to-back matmul floor ({floor_b['p50_ms']:.2f} ms; "
            f"target <= 1.5x: {'met' if r['x_floor_p50'] <= 1.5 else 'NOT met'}){same_setup}"
        )
    out += [
        f"where a next click's time goes ({label}): {detail}"
        for label, detail in time_breakdown(report)
    ]
    http = report.get("http")
    if http:
        fixed = http["fixed_rate"]
        ok = (
            fixed["errors"] == 0 and fixed.get("p99_ms", 1e9) < report["args"]["http_p99_target_ms"]
        )
        out.append(
            f"HTTP {fixed['target_rate_per_s']} req/s for {fixed['duration_s']} s: "
            f"{fixed['requests_per_s']:.0f} req/s achieved, p99 {fixed.get('p99_ms', float('nan')):.2f}"
            f" ms, {fixed['errors']} errors ({'met' if ok else 'NOT met'}); highest rate held: "
            + (f"{http['highest_rate_held']} req/s" if http["highest_rate_held"] else "none")
            + (
                f"; CPU steal during the phase {fixed['cpu_steal_pct']:.2f} %"
                if fixed.get("cpu_steal_pct") is not None
                else ""
            )
        )
    return out


def time_breakdown(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Where a next click's time goes at the reference size, 1 thread: the floor, the catalog
    matmul alone in onnxruntime, the whole step graph alone, and the predictor.

    Returns:
        ``(case label, figures)`` for one session and for batch 64 (cases not measured are
        left out).
    """
    rows, max_len = _reference_rows(report), report["args"]["max_len"]

    def p50(case: str, impl: str, length: int | None = max_len) -> float | None:
        row = _pick(rows, case, impl, length)
        return None if row is None else float(row["p50_ms"])

    floors = [r["p50_ms"] for r in rows if r["impl"].startswith("memory floor")]
    rest = "the transformer step, log-softmax, copy mixture and top-k"
    if not report["args"].get("copy_mechanism"):
        rest = "the transformer step and top-k"
    around = (
        "the predictor around the graph (id mapping, state lookup, stacking and storing, result "
        "objects; fresh inputs every call)"
    )
    int8_floor = p50("single", INT8_FLOOR, None)
    out = []
    for case, floor, label, floor_name in (
        ("single", min(floors, default=None), "one session", "memory floor"),
        (
            "batch64",
            p50("batch64", FLOOR_B64, None),  # no session length
            "batch 64",
            "numpy matmul floor",
        ),
    ):
        matmul, step, served = p50(case, MATMUL_ALONE), p50(case, STEP_ALONE), p50(case, NEXT_CLICK)
        if floor is None or matmul is None or step is None or served is None:
            continue
        out.append(
            (
                f"{label}, {max_len} items",
                f"{floor_name} {floor:.3f} ms; onnxruntime catalog matmul alone {matmul:.3f} ms "
                f"({matmul / floor:.2f}x floor); whole step graph {step:.3f} ms "
                f"({step / floor:.2f}x: {rest} add {step - matmul:.3f} ms); predictor next click "
                f"{served:.3f} ms ({served / floor:.2f}x: {around} adds {served - step:.3f} ms)",
            )
        )
        step8, served8 = p50(case, STEP_ALONE_INT8), p50(case, NEXT_CLICK_INT8)
        if step8 is None or served8 is None:
            continue
        own = (
            f"; streaming that int8 table alone takes {int8_floor:.3f} ms"
            if case == "single" and int8_floor is not None
            else ""
        )
        out.append(
            (
                f"{label}, {max_len} items, int8 catalog",
                f"whole step graph {step8:.3f} ms ({step8 / floor:.2f}x the float32 {floor_name}"
                f"{own}); predictor next click {served8:.3f} ms ({served8 / floor:.2f}x: {around}"
                f" adds {served8 - step8:.3f} ms)",
            )
        )
    return out


_COLORS = {
    "int8 table": "silver",
    "int8 catalog, next click": "navy",
    "int8 catalog, new session": "teal",
    "int8-catalog step": "magenta",
    "table @ h": "black",
    "table.max": "dimgrey",
    "floor:": "black",
    "eager": "tab:red",
    "full scores + numpy": "tab:blue",
    "top-k in graph": "tab:green",
    "int8": "tab:purple",
    "fp16": "tab:orange",
    "next click": "tab:cyan",
    "new session": "tab:olive",
    "matmul alone": "tab:brown",
    "step graph alone": "tab:pink",
}
"""Line colour per implementation (substring of its name); line style per thread count."""


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    max_len = report["args"]["max_len"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, case, key, ylabel in (
        (axes[0], "single", "p50_ms", "one session: p50 latency (ms)"),
        (axes[1], "batch64", "sessions_per_s", "batch 64: sessions / s"),
    ):
        impls = sorted({r["impl"] for r in rows if r["case"] == case})
        for impl in impls:
            color = next((c for key, c in _COLORS.items() if key in impl), "grey")
            for threads, style in ((1, "-"), (2, "--")):
                pts = sorted(
                    (r["num_items"], r[key])
                    for r in rows
                    if r["case"] == case
                    and r["impl"] == impl
                    and r["threads"] == threads
                    and r.get("session_len", max_len) == max_len
                )
                if len(pts) < 1:
                    continue
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, color=color, marker="o", label=f"{impl} ({threads} thr)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalog size (items)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle(
        f"seqrec predictor vs PyTorch eager vs memory floor (d={report['args']['d_model']}, "
        f"L={max_len}; {report['machine']['cpu']}, {report['machine']['cores']} cores)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short phases")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "artifacts/reports/latency")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[10_000, 37_000, 100_000, 235_000],
        help="catalog sizes of the in-process part (none: HTTP part only)",
    )
    parser.add_argument("--reference-size", type=int, default=RETAILROCKET_ITEMS)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument(
        "--copy-mechanism",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="measure the copy (pointer) variant of the model (model.copy_mechanism)",
    )
    parser.add_argument("--short-session-len", type=int, default=5)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=2.5, help="seconds per measurement")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--http-concurrency", type=int, default=8)
    parser.add_argument("--http-closed-s", type=float, default=15.0)
    parser.add_argument("--http-rate", type=float, default=500.0)
    parser.add_argument("--http-duration-s", type=float, default=60.0)
    parser.add_argument("--http-rate-concurrency", type=int, default=32)
    parser.add_argument(
        "--http-ladder",
        type=float,
        nargs="*",
        default=[100, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 2000],
        help="rates tried in order until one fails (p99 or errors or not achieved)",
    )
    parser.add_argument("--http-ladder-s", type=float, default=10.0)
    parser.add_argument(
        "--http-incremental",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve an incremental export (the conf/export.yaml default) rather than top-k only",
    )
    parser.add_argument(
        "--http-precision",
        choices=["fp32", "int8_catalog"],
        default="int8_catalog",
        help="precision of the served incremental export (int8_catalog is the conf/export.yaml "
        "default); top-k-only exports (--no-http-incremental) are float32",
    )
    parser.add_argument("--http-workers", type=int, default=1, help="seqrec-serve worker processes")
    parser.add_argument(
        "--http-max-batch-size",
        type=int,
        default=None,
        help="seqrec-serve --max-batch-size (default: the server's; 1 = no dynamic batching)",
    )
    parser.add_argument(
        "--http-workload",
        choices=["widget", "random"],
        default="widget",
        help="widget: each request one more click of a browsing shopper's session; random: "
        "independent random sessions (no state can be reused)",
    )
    parser.add_argument(
        "--http-shoppers", type=int, default=64, help="shoppers browsing at once (widget workload)"
    )
    parser.add_argument(
        "--http-bodies", type=int, default=20_000, help="distinct requests, sent in a cycle"
    )
    parser.add_argument("--http-p99-target-ms", type=float, default=20.0)
    parser.add_argument(
        "--http-request-logs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server writes its JSON log line per request (as in production)",
    )
    parser.add_argument("--exporters", nargs="+", default=None, help="dynamo and/or legacy")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="no measuring: recompute the targets of this latency.json and write latency.json "
        "(measurements unchanged), latency.md and latency.png to --out-dir",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # onnxruntime.quantization logs to the root logger: keep it quiet, this script's logger not
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        report["targets"] = targets(report)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(report, args.out_dir / "latency.md")
        plot(report, args.out_dir / "latency.png")
        return 0
    if args.quick:
        args.sizes, args.reference_size, args.threads = [2_000], 2_000, [1]
        args.max_len, args.short_session_len = 10, 3
        args.budget_s, args.http_closed_s, args.http_duration_s = 0.1, 0.5, 1.0
        args.http_rate, args.http_ladder, args.http_ladder_s = 50.0, [100.0], 0.5
        args.exporters = args.exporters or ["legacy"]
    import torch

    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    cpu_at_start = psutil.cpu_times()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="seqrec_bench_") as tmp:
        work_dir = Path(tmp)
        for num_items in args.sizes:
            measure_size(num_items, args, work_dir, results)
        http = None
        if not args.skip_http:
            variant = {"top_k_in_graph": True, "incremental": args.http_incremental}
            if args.http_incremental:
                variant["precision"] = args.http_precision
            _, http_dir = build_export(
                args.reference_size,
                args,
                work_dir / "http_export",
                variant,
                exporters=None if args.http_incremental else args.exporters,
            )
            http = measure_http(http_dir, args, args.out_dir / "http_server_log.jsonl")
            http["num_items"] = args.reference_size
    report: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine,
        "load_avg_after": list(os.getloadavg()),
        "cpu_steal_pct": cpu_steal_pct(cpu_at_start, psutil.cpu_times()),
        "results": results,
        "http": http,
    }
    report["targets"] = targets(report)
    (args.out_dir / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out_dir / "latency.md")
    plot(report, args.out_dir / "latency.png")
    for line in report["targets"]:
        log.info("%s", line)
    log.info("wrote %s/latency.{json,md,png}", args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
