"""scripts/bench_latency.py --quick writes its JSON, markdown and PNG (a smoke test, not a timing)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> None:
    """Run scripts/bench_latency.py with ``args`` in a subprocess (fails on a non-zero exit)."""
    script = str(REPO_ROOT / "scripts" / "bench_latency.py")
    subprocess.run(
        [sys.executable, script, *args], check=True, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_quick_benchmark_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    _bench("--quick", "--out-dir", str(out))
    report = json.loads((out / "latency.json").read_text())
    impls = {r["impl"] for r in report["results"]}
    assert {
        "pytorch eager",
        "onnx top-k in graph",
        "onnx full scores + numpy top-k",
        "onnx incremental, next click (cached states)",
        "onnx incremental, new session (no cached state)",
        "onnxruntime: catalog matmul alone",
        "onnxruntime: step graph alone (inputs prepared, no Python around it)",
        "onnx incremental int8 catalog, next click (cached states)",
        "onnx incremental int8 catalog, new session (no cached state)",
        "onnxruntime: int8-catalog step graph alone (inputs prepared)",
        "int8 table floor: numpy int8 table.max()",
        "onnx incremental int8 catalog, click stream (one session's next click, 64 sessions take "
        "turns)",
        "onnx incremental int8 catalog, click stream (64 sessions click on, back to back)",
    } <= impls
    assert any(i.startswith("memory floor") for i in impls)
    assert all(r["p50_ms"] > 0 for r in report["results"])
    assert report["http"]["fixed_rate"]["requests"] > 0
    assert report["http"]["fixed_rate"]["errors"] == 0
    # widget-like requests on an incremental export: most clicks extend a cached session
    assert report["http"]["incremental"] and report["http"]["precision"] == "int8_catalog"
    cache = report["http"]["state_cache"]
    assert cache["hits"] > 0 and cache["hits"] >= cache["misses"]
    assert report["targets"]
    stream = [t for t in report["targets"] if t.startswith("one session") and "click stream" in t]
    assert len(stream) == 1 and "x floor" in stream[0] and "eager p50" in stream[0]
    breakdown = [t for t in report["targets"] if t.startswith("where a next click's time goes")]
    assert len(breakdown) == 4  # one session and batch 64, float32 and int8 catalog
    assert sum("int8 catalog" in t for t in breakdown) == 2
    assert "| items | threads |" in (out / "latency.md").read_text()
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the VM's CPU steal is recorded per row, per HTTP phase and for the run (a Linux guest)
    steals = [r["cpu_steal_pct"] for r in report["results"]]
    steals += [report["http"]["fixed_rate"]["cpu_steal_pct"], report["cpu_steal_pct"]]
    assert all(steal is None or 0.0 <= steal <= 100.0 for steal in steals)
    assert report["cpu_steal_pct"] is not None  # the whole run spans many ticks
    assert "steal %" in (out / "latency.md").read_text()
    assert "CPU steal during the phase" in report["targets"][-1]


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_latency", REPO_ROOT / "scripts" / "bench_latency.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_steal_is_the_share_of_all_cpu_time_outside_guest_time() -> None:
    """Steal over the time between two /proc/stat readings; guest time is already inside user
    time on Linux, so it is not counted twice; no steal field (not a Linux guest) or no time
    passed: None."""
    cpu_steal_pct = _bench_module().cpu_steal_pct
    times = namedtuple("times", "user nice system idle iowait irq softirq steal guest guest_nice")
    before = times(100.0, 0.0, 10.0, 500.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0)
    # 20 s of CPU time pass: 12 user (3 of them guest), 4 idle, 1 system, 3 steal
    after = times(112.0, 0.0, 11.0, 504.0, 1.0, 0.0, 0.0, 5.0, 3.0, 0.0)
    assert cpu_steal_pct(before, after) == pytest.approx(100.0 * 3 / 20)
    assert cpu_steal_pct(before, before) is None  # no tick passed: no figure
    no_steal = namedtuple("no_steal", "user system idle")
    assert cpu_steal_pct(no_steal(1.0, 1.0, 1.0), no_steal(2.0, 1.0, 1.0)) is None


def test_from_json_recomputes_targets_without_measuring(tmp_path: Path) -> None:
    """--from-json rewrites the targets, markdown and plot of a committed report; the
    measurements themselves are copied unchanged."""
    source = REPO_ROOT / "docs" / "results" / "latency.json"
    stale = json.loads(source.read_text())
    stale["targets"] = ["stale wording"]
    (tmp_path / "in.json").write_text(json.dumps(stale))
    out = tmp_path / "out"
    _bench("--from-json", str(tmp_path / "in.json"), "--out-dir", str(out))
    rewritten = json.loads((out / "latency.json").read_text())
    assert rewritten["results"] == stale["results"] and rewritten["http"] == stale["http"]
    assert "stale wording" not in rewritten["targets"]
    assert any(t.startswith("where a next click's time goes") for t in rewritten["targets"])
    assert "## Targets" in (out / "latency.md").read_text()
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frozen_heap_keeps_an_enclosing_freeze() -> None:
    """frozen_heap freezes for its block and unfreezes after, except when something was frozen
    before it (an enclosing frozen_heap, or the caller's own gc.freeze): gc.unfreeze would undo
    that too. Run in a subprocess so that pytest's own objects are never frozen."""
    code = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from bench_latency import frozen_heap
counts = [gc.get_freeze_count()]
with frozen_heap():
    counts.append(gc.get_freeze_count())
    with frozen_heap():
        pass
    counts.append(gc.get_freeze_count())  # the inner block left the outer freeze alone
counts.append(gc.get_freeze_count())
gc.freeze()
before = gc.get_freeze_count()
try:
    with frozen_heap():
        raise KeyError("inside")
except KeyError:
    pass
counts += [before, gc.get_freeze_count()]  # the caller's own freeze stays
print(json.dumps(counts))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "scripts")],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    start, inside, after_inner, after, caller, after_error = json.loads(out.stdout.splitlines()[-1])
    assert start == 0 and inside > 1_000 and after_inner >= inside and after == 0
    assert caller > 1_000 and after_error >= caller
