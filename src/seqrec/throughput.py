"""Training-throughput benchmark: the speed work on the training step, measured one change at a time.

Each *variant* runs the same number of optimizer steps (forward, backward, AdamW step) of the same
model on training windows of the configured data set, in one process, one after the other, and
reports sequences/s (training windows) and positions/s (real next-item targets). Variants are
cumulative, so consecutive ratios show what each change buys:

``padded_all_positions`` (before)
    The textbook implementation: every batch left-padded to ``max_len`` and logits over the whole
    catalog at all ``B x L`` positions, the padding positions masked out of the loss by
    ``ignore_index``, and the PAD column masked by an ``index_fill`` on the logits.
``dynamic_padding``
    Batches padded only to their longest window (:meth:`seqrec.data.dataset.TrainSessions.collate`).
``target_positions_only``
    Logits only at the ``N`` positions that have a real target, scored against item rows 1.. (no
    PAD column to mask): :meth:`seqrec.lit_module.SASRecModule.loss`.
``length_bucketing`` (after: the default training configuration)
    Plus batches of windows of similar length (:class:`seqrec.resume.EpochShuffleSampler`).
``bf16_autocast``
    Plus ``torch.autocast(device_type, bfloat16)``; reported so the choice is measured (on the
    2-core CPU it does not pay, so ``trainer.precision`` stays ``32-true`` on CPU; ``trainer=gpu``
    uses ``bf16-mixed``).

The timed steps of every variant train on exactly the same windows (the first ``steps *
batch_size`` of the epoch-0 order; the bucketing variants only group them differently), so
sequences/s and positions/s compare directly.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec.constants import PAD_IDX
from seqrec.data.dataset import TrainSessions

log = logging.getLogger(__name__)

VARIANTS = (
    "padded_all_positions",
    "dynamic_padding",
    "target_positions_only",
    "length_bucketing",
    "bf16_autocast",
)
"""Cumulative speed-work variants, in order (the first is "before", ``length_bucketing`` "after")."""
BEFORE, AFTER = "padded_all_positions", "length_bucketing"


def all_positions_ce(module: Any, item_ids: Tensor, targets: Tensor) -> Tensor:
    """The "before" loss: full-catalog logits at every (B, L) position, padding ignored.

    Args:
        module: a :class:`seqrec.lit_module.SASRecModule` (plain SASRec, ``loss="ce"``).
        item_ids, targets: (B, L) int64 as in :meth:`SASRecModule.loss`.

    Returns:
        Scalar float mean cross-entropy over real targets (same value as ``module.loss``).
    """
    hidden = module.model(item_ids)  # (B, L, D)
    logits = hidden @ module.model.item_emb.weight.t()  # (B, L, C)
    logits = logits.index_fill(
        2, torch.tensor([PAD_IDX], device=logits.device), torch.finfo(logits.dtype).min
    )
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_IDX)


def make_batches(
    windows: Sequence[np.ndarray],
    order: np.ndarray,
    batch_size: int,
    num_batches: int,
    bucketed: bool,
    bucket_batches: int,
    pad_to: int | None,
) -> list[dict[str, Tensor]]:
    """Cut ``num_batches`` batches from the windows ``order[: num_batches * batch_size]``.

    With ``bucketed`` those windows are regrouped by :class:`seqrec.resume.EpochShuffleSampler`'s
    length bucketing (chunks of ``bucket_batches`` batches sorted by length); ``pad_to`` pads
    every batch to that width instead of its longest window.
    """
    from seqrec.resume import EpochShuffleSampler

    chosen = np.asarray(order[: num_batches * batch_size])
    if bucketed:  # the training sampler's bucketing, applied to the same chosen windows
        lengths = [len(windows[i]) for i in chosen]
        sampler = EpochShuffleSampler(len(chosen), 0, lengths, batch_size, bucket_batches)
        chosen = chosen[sampler.order()]
    groups = chosen.reshape(num_batches, batch_size)
    batches = []
    for group in groups:
        batch = [windows[i] for i in group]
        batches.append(TrainSessions.collate(batch, pad_to))
    return batches


def run_variant(
    variant: str,
    make_module: Any,
    batches: Sequence[dict[str, Tensor]],
    warmup_steps: int,
    lr: float,
) -> dict[str, Any]:
    """Time ``len(batches) - warmup_steps`` optimizer steps of one variant.

    Args:
        variant: one of :data:`VARIANTS`.
        make_module: zero-argument callable returning a fresh, identically seeded module.
        batches: training batches (the first ``warmup_steps`` are run untimed).
        warmup_steps: untimed steps (allocator and kernel warm-up).
        lr: AdamW learning rate.

    Returns:
        ``{"variant", "steps", "seconds", "sequences", "positions", "padded_positions",
        "sequences_per_s", "positions_per_s", "ms_per_step", "final_loss"}`` (seconds are wall time).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    module = make_module()
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr)
    use_bf16 = variant == "bf16_autocast"
    all_positions = variant in ("padded_all_positions", "dynamic_padding")

    def step(batch: dict[str, Tensor]) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            if all_positions:
                loss = all_positions_ce(module, batch["item_ids"], batch["targets"])
            else:
                loss = module.loss(batch["item_ids"], batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for batch in batches[:warmup_steps]:
        step(batch)
    timed = batches[warmup_steps:]
    start = time.perf_counter()
    loss = float("nan")
    for batch in timed:
        loss = step(batch)
    seconds = time.perf_counter() - start
    sequences = sum(int(b["item_ids"].shape[0]) for b in timed)
    positions = sum(int((b["targets"] != PAD_IDX).sum()) for b in timed)
    padded = sum(int(b["targets"].numel()) for b in timed)
    return {
        "variant": variant,
        "steps": len(timed),
        "seconds": seconds,
        "sequences": sequences,
        "positions": positions,
        "padded_positions": padded,
        "sequences_per_s": sequences / seconds,
        "positions_per_s": positions / seconds,
        "ms_per_step": 1e3 * seconds / max(len(timed), 1),
        "final_loss": loss,
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform``), for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, load average, torch version and threads (for the report)."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _duration(minutes: float) -> str:
    """``48.6 min`` or, under a minute, ``12 s``."""
    return f"{minutes:.1f} min" if minutes >= 1.0 else f"{minutes * 60:.0f} s"


def throughput_markdown(report: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_throughput_bench` report."""
    cfg, machine = report["config"], report["machine"]
    lines = [
        f"# Training throughput: {cfg['data']} ({cfg['num_items']:,} items)",
        "",
        f"Model d_model={cfg['d_model']}, {cfg['n_layers']} layers, max_len={cfg['max_len']}, "
        f"copy_mechanism={cfg['copy_mechanism']}; batch {cfg['batch_size']} windows; "
        f"{cfg['steps']} timed steps per variant after {cfg['warmup_steps']} warm-up step(s); "
        f"{machine['cpu']}, {machine['logical_cores']} logical cores, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, "
        f"load average {machine['load_average_1m_at_start']:.2f} at start.",
        "",
        "| variant | sequences/s | positions/s | ms/step | padded share | x before |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    before = report["results"].get(BEFORE, {}).get("sequences_per_s")
    for name, row in report["results"].items():
        padded_share = 1.0 - row["positions"] / max(row["padded_positions"], 1)
        ratio = f"{row['sequences_per_s'] / before:.2f}" if before else "-"
        lines.append(
            f"| {name} | {row['sequences_per_s']:.0f} | {row['positions_per_s']:.0f} | "
            f"{row['ms_per_step']:.0f} | {padded_share:.0%} | {ratio} |"
        )
    if report.get("speedup_after_vs_before") is not None:
        lines += [
            "",
            f"Default configuration (`{AFTER}`) vs before (`{BEFORE}`): "
            f"**{report['speedup_after_vs_before']:.2f}x** sequences/s; estimated epoch "
            f"({report['num_train_windows']:,} windows): "
            f"{_duration(report['epoch_minutes'][BEFORE])} before, "
            f"{_duration(report['epoch_minutes'][AFTER])} after.",
        ]
    return "\n".join(lines) + "\n"


def run_throughput_bench(cfg: Any) -> dict[str, Any]:
    """Run every configured variant on the configured data and write ``throughput.{json,md}``.

    Args:
        cfg: the composed ``conf/bench_train.yaml`` (data, model, steps, warmup_steps, variants,
            bucket_batches, num_threads, seed, report_dir).

    Returns:
        The report dict (also written as JSON).

    Raises:
        ValueError: an unknown variant, ``steps`` < 1 or ``warmup_steps`` < 0, a copy model with
            an all-positions variant, or fewer training windows than ``(warmup_steps + steps) * batch_size``.
    """
    from hydra.utils import instantiate

    from seqrec.pipeline import _ensure_prepared
    from seqrec.resume import EpochShuffleSampler

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    variants = list(cfg.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected a subset of {VARIANTS}")
    if cfg.model.get("copy_mechanism") and any(
        v in ("padded_all_positions", "dynamic_padding") for v in variants
    ):
        raise ValueError(
            "the all-positions variants implement plain SASRec: set copy_mechanism=false"
        )
    if int(cfg.steps) < 1 or int(cfg.warmup_steps) < 0:
        raise ValueError(
            f"need steps >= 1 and warmup_steps >= 0, got steps={cfg.steps}, "
            f"warmup_steps={cfg.warmup_steps}"
        )
    _ensure_prepared(cfg)
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.setup("fit")
    assert datamodule.train_set is not None
    windows = datamodule.train_set.windows
    batch_size = int(cfg.data.datamodule.batch_size)
    num_batches = int(cfg.warmup_steps) + int(cfg.steps)
    if len(windows) < num_batches * batch_size:
        raise ValueError(
            f"{len(windows)} training windows < (warmup_steps + steps) * batch_size = "
            f"{num_batches * batch_size}: lower steps or batch_size"
        )
    order = EpochShuffleSampler(len(windows), int(cfg.seed)).order()
    max_len = int(cfg.data.max_len)

    def make_module() -> Any:
        torch.manual_seed(int(cfg.seed))
        return instantiate(cfg.model, num_items=datamodule.num_items)

    results: dict[str, Any] = {}
    steps, warmup = int(cfg.steps), int(cfg.warmup_steps)
    # Timed steps see exactly the same windows in every variant (only their grouping differs);
    # the warm-up batches come from the windows after them.
    timed_order, warmup_order = order[: steps * batch_size], order[steps * batch_size :]
    for variant in variants:
        options = {
            "bucketed": variant in ("length_bucketing", "bf16_autocast"),
            "bucket_batches": int(cfg.bucket_batches),
            "pad_to": max_len if variant == "padded_all_positions" else None,
        }
        batches = make_batches(windows, warmup_order, batch_size, warmup, **options)
        batches += make_batches(windows, timed_order, batch_size, steps, **options)
        results[variant] = run_variant(
            variant, make_module, batches, int(cfg.warmup_steps), float(cfg.model.lr)
        )
        log.info("%s: %.0f sequences/s", variant, results[variant]["sequences_per_s"])
    epoch_minutes = {
        name: len(windows) / row["sequences_per_s"] / 60.0 for name, row in results.items()
    }
    report: dict[str, Any] = {
        "config": {
            "data": str(cfg.data.name),
            "num_items": int(datamodule.num_items),
            "d_model": int(cfg.model.d_model),
            "n_layers": int(cfg.model.n_layers),
            "max_len": max_len,
            "copy_mechanism": bool(cfg.model.get("copy_mechanism", False)),
            "batch_size": batch_size,
            "steps": int(cfg.steps),
            "warmup_steps": int(cfg.warmup_steps),
            "bucket_batches": int(cfg.bucket_batches),
            "seed": int(cfg.seed),
        },
        "machine": machine_info(),
        "num_train_windows": len(windows),
        "results": results,
        "epoch_minutes": epoch_minutes,
        "speedup_after_vs_before": (
            results[AFTER]["sequences_per_s"] / results[BEFORE]["sequences_per_s"]
            if AFTER in results and BEFORE in results
            else None
        ),
    }
    out_dir = Path(cfg.report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "throughput.md").write_text(throughput_markdown(report))
    report["paths"] = [str(out_dir / "throughput.json"), str(out_dir / "throughput.md")]
    return report
