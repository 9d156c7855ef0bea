"""Wiring of the four stages (prepare, train, evaluate, export); no math lives here."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PREFIX_ITEM_IDS, SESSION_ID, TS_MS

log = logging.getLogger(__name__)

if not OmegaConf.has_resolver("seqrec_pid"):
    OmegaConf.register_new_resolver("seqrec_pid", lambda: str(os.getpid()))


class EmptyDataError(ValueError):
    """Preparation left a split without sessions; the message names the rule and the numbers."""


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# --------------------------------------------------------------------------------------- prepare


def _examples_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Normalise an examples frame to ``session_id, prefix_item_ids, next_item_id, ts_ms``."""
    out = frame[[SESSION_ID, PREFIX_ITEM_IDS, NEXT_ITEM_ID, TS_MS]].copy()
    out[SESSION_ID] = out[SESSION_ID].astype(str)
    out[TS_MS] = out[TS_MS].astype("Int64")
    return out.reset_index(drop=True)


def _session_stats(sessions: pd.DataFrame) -> dict[str, Any]:
    lengths = sessions.groupby(SESSION_ID, sort=False).size()
    return {
        "num_events": len(sessions),
        "num_sessions": int(lengths.size),
        "num_items": int(sessions[ITEM_ID].nunique()),
        "session_len_mean": round(float(lengths.mean()), 3) if lengths.size else 0.0,
        "session_len_median": float(lengths.median()) if lengths.size else 0.0,
        "session_len_max": int(lengths.max()) if lengths.size else 0,
    }


def _row_accounting(
    num_rows_read: int, dropped: dict[str, int], kept: dict[str, int], source: str
) -> dict[str, Any]:
    """Check that every input row is either kept or dropped for exactly one named reason.

    Returns:
        ``{"num_rows_read", "dropped": {reason: rows}, "kept": {part: rows}, "num_rows_accounted"}``.

    Raises:
        RuntimeError: kept + dropped differs from the rows read (rows lost or counted twice).
    """
    accounted = sum(dropped.values()) + sum(kept.values())
    if accounted != num_rows_read:
        raise RuntimeError(
            f"{source}: {num_rows_read} rows read but kept + dropped = {accounted} "
            f"(kept {kept}, dropped {dropped}): rows were lost or counted twice"
        )
    return {
        "num_rows_read": num_rows_read,
        "dropped": dropped,
        "kept": kept,
        "num_rows_accounted": accounted,
    }


def _require_nonempty(
    raw_path: Path, span_days: float, holdout_days: float, **parts: pd.DataFrame
) -> None:
    """Raise :class:`EmptyDataError` naming the first empty split and the time span behind it."""
    for name, frame in parts.items():
        if frame.empty:
            raise EmptyDataError(
                f"{raw_path}: the kept sessions span {span_days:.1f} days; two holdouts of "
                f"{holdout_days:g} days leave no {name} sessions. Lower data.holdout_days or use a "
                f"longer period (train, validation and test need more than {2 * holdout_days:g} days)."
            )


def _prepare_events(cfg: DictConfig) -> dict[str, Any]:
    from seqrec.data.events import read_events
    from seqrec.data.sessionize import drop_consecutive_repeats, filter_min_support, sessionize
    from seqrec.data.split import drop_unknown_items, sessions_to_examples, temporal_split

    raw_path = Path(cfg.data.raw_path)
    if not raw_path.exists():
        if not cfg.data.get("generate", False):
            raise FileNotFoundError(
                f"{raw_path} not found. Download RetailRocket from Kaggle (see README, 'Real data') "
                "or set SEQREC_DATA_DIR / data.raw_path."
            )
        from seqrec.data.synthetic import write_events_csv

        log.info("generating the demo shop at %s", raw_path)
        write_events_csv(raw_path, **OmegaConf.to_container(cfg.data.generator))
    event_types = list(cfg.data.event_types) if cfg.data.event_types is not None else None
    events, read_stats = read_events(
        raw_path,
        event_types=event_types,
        ts_unit=cfg.data.ts_unit,
        id_pattern=cfg.data.get("id_pattern"),
    )
    stats: dict[str, Any] = {"source": str(raw_path), "read": read_stats}

    sessions = sessionize(events, gap_s=int(cfg.data.gap_s))
    stats["sessionize"] = {
        "gap_s": int(cfg.data.gap_s),
        "num_sessions": int(sessions[SESSION_ID].nunique()),
    }
    num_repeats = 0
    if cfg.data.collapse_repeats:
        sessions, num_repeats = drop_consecutive_repeats(sessions)
        stats["num_consecutive_repeats_dropped"] = num_repeats
    sessions, filter_stats = filter_min_support(
        sessions,
        min_session_len=int(cfg.data.min_session_len),
        min_item_support=int(cfg.data.min_item_support),
    )
    stats["filter"] = filter_stats

    if sessions.empty:
        raise EmptyDataError(
            f"{raw_path}: no sessions left after sessionizing and filtering "
            f"(min_session_len={cfg.data.min_session_len}, min_item_support={cfg.data.min_item_support}; "
            f"see the counts: {filter_stats}). Lower data.min_item_support / data.min_session_len "
            "or use more data."
        )
    holdout_days = float(cfg.data.holdout_days)
    span_days = (int(sessions[TS_MS].max()) - int(sessions[TS_MS].min())) / 86_400_000
    train, test, test_split = temporal_split(sessions, holdout_days=holdout_days)
    _require_nonempty(raw_path, span_days, holdout_days, training=train, test=test)
    train, valid, valid_split = temporal_split(train, holdout_days=holdout_days)
    _require_nonempty(raw_path, span_days, holdout_days, training=train, validation=valid)
    stats["split_test"], stats["split_valid"] = test_split, valid_split
    known = set(train[ITEM_ID].unique().tolist())
    valid, stats["unknown_valid"] = drop_unknown_items(valid, known, int(cfg.data.min_session_len))
    test, stats["unknown_test"] = drop_unknown_items(test, known, int(cfg.data.min_session_len))
    stats["row_accounting"] = {
        str(raw_path): _row_accounting(
            read_stats["num_rows_read"],
            dropped={
                "other_event_type": read_stats["num_rows_other_event_type"],
                "duplicate_row": read_stats["num_duplicate_rows"],
                "consecutive_repeat": num_repeats,
                "rare_item": filter_stats["num_events_rare_items"],
                "short_session": filter_stats["num_events_short_sessions"],
                "unknown_item_valid": stats["unknown_valid"]["num_events_unknown_item"],
                "unknown_item_test": stats["unknown_test"]["num_events_unknown_item"],
                "short_after_unknown_valid": stats["unknown_valid"][
                    "num_events_too_short_after_unknown"
                ],
                "short_after_unknown_test": stats["unknown_test"][
                    "num_events_too_short_after_unknown"
                ],
            },
            kept={"train": len(train), "valid": len(valid), "test": len(test)},
            source=str(raw_path),
        )
    }
    return _write_processed(
        cfg,
        train=train,
        valid=valid,
        test=test,
        valid_examples=sessions_to_examples(valid),
        test_examples=sessions_to_examples(test),
        stats=stats,
    )


def _prepare_benchmark(cfg: DictConfig) -> dict[str, Any]:
    from seqrec.data.sources import (
        TEST_FILE,
        TEST_SESSIONS_FILE,
        TRAIN_FILE,
        read_benchmark,
        read_benchmark_test_sessions,
        split_last_sessions,
    )
    from seqrec.data.split import sessions_to_examples

    full_train, test_examples = read_benchmark(
        cfg.data.benchmark_dir, id_pattern=cfg.data.get("id_pattern")
    )
    train, valid = split_last_sessions(full_train, float(cfg.data.valid_fraction))
    stats: dict[str, Any] = {
        "source": str(cfg.data.benchmark_dir),
        "valid_fraction": float(cfg.data.valid_fraction),
        "train_file": _session_stats(full_train),
        "num_test_examples_read": len(test_examples),
    }
    # The test set is kept exactly as shipped, so its catalog is the whole shipped train file (vocab
    # below). A shipped example with an item outside that catalog cannot be ranked: it is dropped,
    # counted and logged (none in the RetailRocket benchmark).
    catalog = set(full_train[ITEM_ID].unique().tolist())
    is_ranked = _examples_within(test_examples, catalog)
    num_unknown_test = int((~is_ranked).sum())
    if num_unknown_test:
        log.warning(
            "%d of %d shipped test examples have an item outside the train file: dropped",
            num_unknown_test,
            len(test_examples),
        )
    test_examples = test_examples[is_ranked]
    # Validation examples use only items the model trains on.
    known = set(train[ITEM_ID].unique().tolist())
    # No timestamps in this format: click order stands in for time, and example times stay missing.
    valid_examples = sessions_to_examples(
        valid.assign(**{TS_MS: np.arange(len(valid), dtype=np.int64)})
    )
    valid_examples[TS_MS] = pd.array([pd.NA] * len(valid_examples), dtype="Int64")
    is_known = _examples_within(valid_examples, known)
    stats["num_valid_examples_unknown_item_dropped"] = int((~is_known).sum())
    root = Path(cfg.data.benchmark_dir)
    stats["row_accounting"] = {
        str(root / TRAIN_FILE): _row_accounting(
            stats["train_file"]["num_sessions"],
            dropped={},
            kept={
                "train": int(train[SESSION_ID].nunique()),
                "valid": int(valid[SESSION_ID].nunique()),
            },
            source=str(root / TRAIN_FILE),
        ),
        str(root / TEST_FILE): _row_accounting(
            stats["num_test_examples_read"],
            dropped={"unknown_item": num_unknown_test},
            kept={"test": len(test_examples)},
            source=str(root / TEST_FILE),
        ),
    }
    # Whole test sessions, when shipped, are kept as test.parquet for the click-by-click widget
    # replay; the metrics use the shipped examples above, never these.
    test_sessions = read_benchmark_test_sessions(root, id_pattern=cfg.data.get("id_pattern"))
    if test_sessions is not None:
        stats["row_accounting"][str(root / TEST_SESSIONS_FILE)] = _row_accounting(
            len(test_sessions),
            dropped={},
            kept={"test_sessions (replay only)": len(test_sessions)},
            source=str(root / TEST_SESSIONS_FILE),
        )
    return _write_processed(
        cfg,
        train=train,
        valid=valid,
        test=test_sessions,
        valid_examples=valid_examples[is_known],
        test_examples=test_examples,
        stats=stats,
        vocab_items=full_train[ITEM_ID],
    )


def _prepare_sessionrec(cfg: DictConfig) -> dict[str, Any]:
    """Session-rec split files (``<prefix>_train_full / _train_tr / _train_valid / _test.txt``).

    ``train_tr`` is the training part; its validation examples are every next click of the shipped
    ``train_valid`` sessions (session-rec already restricted them to ``train_tr`` items); the
    validation *sessions* used by a refit (``include_valid_in_train``) are the complete sessions of
    ``train_full`` that are not in ``train_tr``, so a refit trains on exactly ``train_full``. Test
    examples are every next click of the ``test`` sessions, catalog = ``train_full`` items.
    """
    from seqrec.data.sources import read_sessionrec
    from seqrec.data.split import sessions_to_examples

    root = Path(cfg.data.sessionrec_dir)
    pattern = cfg.data.get("id_pattern")
    paths = {part: root / f"{cfg.data.file_prefix}_{part}.txt" for part in SESSIONREC_PARTS}
    frames = {part: read_sessionrec(path, id_pattern=pattern) for part, path in paths.items()}
    full, train_tr = frames["train_full"], frames["train_tr"]
    tr_sessions = set(train_tr[SESSION_ID].unique().tolist())
    is_tr = full[SESSION_ID].isin(tr_sessions)
    train, valid = full[is_tr], full[~is_tr]
    _check_sessionrec_split(paths, frames, train, valid)
    stats: dict[str, Any] = {"source": str(root), "files": {p: str(f) for p, f in paths.items()}}
    stats["row_accounting"] = {
        str(paths["train_full"]): _row_accounting(
            len(full), {}, {"train": len(train), "valid": len(valid)}, str(paths["train_full"])
        ),
        str(paths["train_tr"]): _row_accounting(
            len(train_tr),
            {},
            {"train (same clicks as in train_full)": len(train_tr)},
            str(paths["train_tr"]),
        ),
    }
    examples = {}
    for part, catalog_frame in (("train_valid", train), ("test", full)):
        clicks = frames[part]
        part_examples = sessions_to_examples(clicks)
        is_known = _examples_within(part_examples, set(catalog_frame[ITEM_ID].unique().tolist()))
        num_unknown = int((~is_known).sum())
        if num_unknown:
            log.warning("%s: %d examples with an unknown item dropped", paths[part], num_unknown)
        examples[part] = part_examples[is_known]
        num_sessions = int(clicks[SESSION_ID].nunique())
        stats["row_accounting"][str(paths[part])] = _row_accounting(
            len(clicks),
            dropped={"example_with_unknown_item": num_unknown},
            kept={"examples": int(is_known.sum()), "first_click_of_session": num_sessions},
            source=str(paths[part]),
        )
    return _write_processed(
        cfg,
        train=train,
        valid=valid,
        test=frames["test"],
        valid_examples=examples["train_valid"],
        test_examples=examples["test"],
        stats=stats,
        vocab_items=full[ITEM_ID],
    )


def _check_sessionrec_split(
    paths: dict[str, Path],
    frames: dict[str, pd.DataFrame],
    train: pd.DataFrame,
    valid: pd.DataFrame,
) -> None:
    """Raise ValueError unless the four session-rec files are one split of one log.

    ``train_tr`` must be exactly the ``train_full`` clicks of its sessions; ``train_valid`` may
    only hold sessions of ``train_full`` that are not in ``train_tr``; ``test`` shares no session
    with ``train_full`` and does not end before it (a time split). Messages name the first
    offending session.
    """
    columns = [SESSION_ID, ITEM_ID, TS_MS]

    def rows(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[columns].astype({TS_MS: "int64"}).reset_index(drop=True)

    tr, full_tr = rows(frames["train_tr"]), rows(train)
    diff = tr.merge(full_tr, how="outer", indicator=True)
    diff = diff[diff["_merge"] != "both"]
    if len(tr) != len(full_tr) or not diff.empty:
        first = diff[SESSION_ID].iloc[0] if not diff.empty else tr[SESSION_ID].iloc[0]
        raise ValueError(
            f"{paths['train_tr']}: its clicks differ from those of the same sessions in "
            f"{paths['train_full']} (first differing session {first!r}; {len(tr)} vs "
            f"{len(full_tr)} clicks): the files are not one session-rec split"
        )
    valid_ids = set(valid[SESSION_ID].unique().tolist())
    outside = sorted(set(frames["train_valid"][SESSION_ID].unique().tolist()) - valid_ids)
    if outside:
        raise ValueError(
            f"{paths['train_valid']}: {len(outside)} session(s) that are not validation sessions "
            f"of {paths['train_full']} (in train_tr, or in no train file), first {outside[0]!r}: "
            "validation would leak into training or come from elsewhere"
        )
    test, full = frames["test"], frames["train_full"]
    shared = sorted(
        set(test[SESSION_ID].unique().tolist()) & set(full[SESSION_ID].unique().tolist())
    )
    if shared:
        raise ValueError(
            f"{paths['test']}: {len(shared)} session id(s) also in {paths['train_full']}, first "
            f"{shared[0]!r}: test sessions must be new sessions"
        )
    if test[TS_MS].max() < full[TS_MS].max():
        raise ValueError(
            f"{paths['test']}: its last click ({pd.to_datetime(int(test[TS_MS].max()), unit='ms')}) "
            f"is before the last training click ({pd.to_datetime(int(full[TS_MS].max()), unit='ms')}"
            f" in {paths['train_full']}): not a time split"
        )


SESSIONREC_PARTS = ("train_full", "train_tr", "train_valid", "test")
"""File suffixes of one session-rec split."""


def _examples_within(examples: pd.DataFrame, items: set[str]) -> pd.Series:
    """(N,) bool: the example's next item and every prefix item are in ``items``."""
    return examples[NEXT_ITEM_ID].isin(items) & examples[PREFIX_ITEM_IDS].map(
        lambda prefix: all(i in items for i in prefix)
    )


def _write_processed(
    cfg: DictConfig,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame | None,
    valid_examples: pd.DataFrame,
    test_examples: pd.DataFrame,
    stats: dict[str, Any],
    vocab_items: pd.Series | None = None,
) -> dict[str, Any]:
    from seqrec.data.vocab import ItemVocab

    out_dir = Path(cfg.data.processed_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [SESSION_ID, ITEM_ID, TS_MS]
    for name, frame in (("train", train), ("valid", valid), ("test", test)):
        if frame is None:
            continue
        part = frame[columns].copy()
        part[SESSION_ID] = part[SESSION_ID].astype(str)
        part[ITEM_ID] = part[ITEM_ID].astype(str)
        part[TS_MS] = part[TS_MS].astype("Int64")
        part.to_parquet(out_dir / f"{name}.parquet", index=False)
        stats[f"{name}_sessions"] = _session_stats(part)
    _examples_frame(valid_examples).to_parquet(out_dir / "valid_examples.parquet", index=False)
    _examples_frame(test_examples).to_parquet(out_dir / "test_examples.parquet", index=False)
    stats["num_valid_examples"] = len(valid_examples)
    stats["num_test_examples"] = len(test_examples)
    vocab = ItemVocab.fit((vocab_items if vocab_items is not None else train[ITEM_ID]).astype(str))
    vocab.save(out_dir / "item_vocab.json")
    stats["num_items"] = vocab.num_items
    _write_json(out_dir / "stats.json", stats)
    log.info(
        "wrote %s (%d items, %d valid / %d test examples)",
        out_dir,
        vocab.num_items,
        len(valid_examples),
        len(test_examples),
    )
    return stats


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Read the configured source, build sessions / examples / vocab, write ``data.processed_dir``.

    Returns:
        The stats written to ``stats.json``.

    Raises:
        FileNotFoundError: the source files are missing.
        ValueError: unknown ``data.source``.
    """
    source = cfg.data.source
    if source == "events":
        return _prepare_events(cfg)
    if source == "benchmark":
        return _prepare_benchmark(cfg)
    if source == "sessionrec":
        return _prepare_sessionrec(cfg)
    raise ValueError(
        f"unknown data.source {source!r}: expected 'events', 'benchmark' or 'sessionrec'"
    )


def _ensure_prepared(cfg: DictConfig) -> None:
    if not (Path(cfg.data.processed_dir) / "item_vocab.json").is_file():
        log.info("processed data missing in %s: preparing", cfg.data.processed_dir)
        prepare(cfg)


# ----------------------------------------------------------------------------------------- train


def _latest_pointer(cfg: DictConfig) -> Path:
    return Path(cfg.paths.artifacts_dir) / "runs" / f"{cfg.data.name}_latest_train.json"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train SASRec with Lightning on the processed data; early stopping on val/mrr@20.

    Returns:
        ``{"best_ckpt", "best_val_mrr@20", "val": {...}, "train_time_s", "epochs", "global_step",
        "output_dir"}``; also written to ``<output_dir>/train_result.json`` and to a per-dataset
        pointer used by ``evaluate`` / ``export`` when no ``ckpt_path`` is given.

    A run killed at any point resumes exactly with ``ckpt_path=<output_dir>/checkpoints/last.ckpt``
    (refreshed every ``callbacks.periodic_checkpoint.every_n_train_steps`` steps and at each
    validation; see :mod:`seqrec.resume`).

    Raises:
        seqrec.resume.RunDirectoryError: a fresh run (no ``ckpt_path``) would write into a
            checkpoint directory that already holds checkpoints.
        FileNotFoundError: ``ckpt_path`` does not exist.
    """
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    from seqrec.resume import check_output_dir

    # A fresh run never writes into a directory that holds checkpoints; resuming (ckpt_path) may.
    checkpoint_dirs = [Path(cfg.paths.output_dir) / "checkpoints"] + [
        Path(c.dirpath)
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and c.get("dirpath")
    ]
    check_output_dir(checkpoint_dirs, cfg.get("ckpt_path"))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(int(cfg.seed), workers=True)
    _ensure_prepared(cfg)
    datamodule = instantiate(cfg.data.datamodule)
    module = instantiate(cfg.model, num_items=datamodule.num_items)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    averaging = (cfg.get("callbacks") or {}).get("ema")
    averaging = OmegaConf.to_container(averaging, resolve=True) if averaging is not None else None
    if averaging:
        log.info(
            "weight averaging on (%s): validation and saved checkpoints use the averaged weights",
            averaging,
        )
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning's own pytree helper calls an API newer torch deprecates (noise, not ours)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_time_s = time.perf_counter() - start

    # The best-model checkpoint is the one that monitors a metric (others are periodic snapshots).
    checkpoints = [c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint)]
    ckpt_cb = next((c for c in checkpoints if c.monitor), checkpoints[0] if checkpoints else None)
    best_ckpt = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = {
        "dataset": cfg.data.name,
        "best_ckpt": str(Path(best_ckpt).resolve()) if best_ckpt else "",
        "best_val_mrr@20": float(ckpt_cb.best_model_score)
        if ckpt_cb and ckpt_cb.best_model_score is not None
        else None,
        "last_val": val,
        "train_time_s": round(train_time_s, 1),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "num_items": datamodule.num_items,
        "weight_averaging": averaging,  # callbacks.ema, or None
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
    if trainer.is_global_zero:  # one writer under DDP
        _write_json(Path(cfg.paths.output_dir) / "train_result.json", result)
        if best_ckpt:
            _write_json(_latest_pointer(cfg), result)
    log.info("training done in %.1f s: %s", train_time_s, result)
    return result


# -------------------------------------------------------------------------------------- evaluate


def resolve_ckpt(cfg: DictConfig) -> Path:
    """``cfg.ckpt_path`` if set, else the best checkpoint of the latest train run on ``cfg.data``.

    Raises:
        FileNotFoundError: no checkpoint given and no train run recorded for this data set, or
            the given local ``ckpt_path`` is not a file (named, instead of fsspec's error from
            deep inside Lightning's loader; URLs such as ``s3://...`` are left to fsspec).
    """
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if "://" not in str(cfg.ckpt_path) and not path.is_file():  # (remote URLs: fsspec's)
            what = "a directory" if path.is_dir() else "not found"
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: {what} (expected a .ckpt file)")
        return path
    pointer = _latest_pointer(cfg)
    if not pointer.is_file():
        raise FileNotFoundError(
            f"no ckpt_path given and no trained model for {cfg.data.name} ({pointer}); run scripts/train.py first"
        )
    return Path(json.loads(pointer.read_text())["best_ckpt"])


def load_module(ckpt_path: str | Path):  # noqa: ANN201 - SASRecModule (imported lazily)
    """Load a trained :class:`SASRecModule` on CPU in eval mode."""
    from seqrec.lit_module import SASRecModule

    return SASRecModule.load_from_checkpoint(str(ckpt_path), map_location="cpu").eval()


def model_scorer(module, max_len: int):  # noqa: ANN001, ANN201
    """Wrap a module as ``score(prefixes) -> (B, C)`` (the baselines' contract)."""
    import torch

    from seqrec.sequence import encode_prefixes

    def score(prefixes: list[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            return module(torch.from_numpy(encode_prefixes(prefixes, max_len)))

    return score


def metrics_table(results: dict[str, dict[str, float]], ks: list[int]) -> str:
    """Markdown table: one row per model, Recall/MRR/NDCG at each k."""
    cols = [f"{m}@{k}" for m in ("recall", "mrr", "ndcg") for k in ks]
    head = (
        "| model | "
        + " | ".join(
            c.replace("recall", "Recall").replace("mrr", "MRR").replace("ndcg", "NDCG")
            for c in cols
        )
        + " |"
    )
    sep = "|---|" + "---:|" * len(cols)
    rows = [
        f"| {name} | " + " | ".join(f"{res[c]:.4f}" for c in cols) + " |"
        for name, res in results.items()
    ]
    return "\n".join([head, sep, *rows])


def _item_idxs(vocab, item_ids) -> np.ndarray | None:  # noqa: ANN001 - ItemVocab, list | None
    """Known raw ids of a config list as (N,) int64 indices (unknown ids dropped); None stays None.

    Unknown ids are dropped exactly as ``SessionRecommender`` drops them.
    """
    if item_ids is None:
        return None
    idxs = vocab.encode(np.asarray([str(i) for i in item_ids], dtype=object))
    num_unknown = int((idxs == 0).sum())
    if num_unknown:
        log.warning("%d filter item id(s) not in the catalog; ignored", num_unknown)
    return idxs[idxs != 0]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rank every example of ``cfg.split`` against the full catalog with the model and baselines.

    Returns:
        ``{"split", "num_examples", "num_items", "ckpt", "results": {model: metrics}, "table_md"}``;
        written to ``<report_dir>/<split>_metrics.json`` and ``.md``.
    """
    import torch
    from hydra.utils import instantiate

    from seqrec import baselines as bl
    from seqrec.filters import filtered_scorer
    from seqrec.metrics import evaluate_scorer

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    ks = [int(k) for k in cfg.ks]
    ckpt = resolve_ckpt(cfg)  # a wrong path fails now, not after the data is loaded
    datamodule = instantiate(cfg.data.datamodule)
    examples = datamodule.examples(cfg.split)
    train_sessions = datamodule.train_sessions()
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}

    exclude_seen = bool(cfg.get("exclude_seen", False))
    allow_idxs = _item_idxs(datamodule.vocab, cfg.get("allow_items"))
    deny_idxs = _item_idxs(datamodule.vocab, cfg.get("deny_items"))

    def filtered(score_fn):  # noqa: ANN001, ANN202 - the filters SessionRecommender applies
        return filtered_scorer(score_fn, exclude_seen, allow_idxs, deny_idxs)

    module = load_module(ckpt)
    start = time.perf_counter()
    results["SASRec"] = evaluate_scorer(
        filtered(model_scorer(module, int(cfg.data.max_len))),
        examples.prefixes,
        examples.next_items,
        batch_size=int(cfg.data.datamodule.eval_batch_size),
        ks=ks,
        num_items=datamodule.num_items,
    )
    timings["SASRec"] = time.perf_counter() - start
    for name in cfg.baselines:
        baseline = getattr(bl, name)().fit(train_sessions, datamodule.num_items)
        start = time.perf_counter()
        results[name] = evaluate_scorer(
            filtered(baseline.score),
            examples.prefixes,
            examples.next_items,
            batch_size=512,
            ks=ks,
            num_items=datamodule.num_items,
        )
        timings[name] = time.perf_counter() - start

    table = metrics_table(results, ks)
    report = {
        "dataset": cfg.data.name,
        "split": cfg.split,
        "num_examples": len(examples),
        "num_items": datamodule.num_items,
        "exclude_seen": exclude_seen,
        "num_allow_items": None if allow_idxs is None else len(allow_idxs),
        "num_deny_items": None if deny_idxs is None else len(deny_idxs),
        "ckpt": str(ckpt),
        "protocol": "full-catalog ranking; rank = 1 + #other items scored >= next item (ties count against the model)",
        "results": results,
        "eval_time_s": {k: round(v, 2) for k, v in timings.items()},
        "table_md": table,
    }
    report_dir = Path(cfg.report_dir)
    # filtered runs get their own file name so they never overwrite the plain report
    stem = f"{cfg.split}_metrics" + ("_exclude_seen" if exclude_seen else "")
    _write_json(report_dir / f"{stem}.json", report)
    (report_dir / f"{stem}.md").write_text(
        f"# {cfg.data.name}: {cfg.split} split, {len(examples)} examples, {datamodule.num_items} items"
        + (", seen items excluded (exclude_seen=true)" if exclude_seen else "")
        + f"\n\n{table}\n"
    )
    return report


# ---------------------------------------------------------------------------------------- export


def export(cfg: DictConfig) -> Path:
    """Export the trained model to ``cfg.export_dir`` (ONNX + vocab + metadata), verified.

    The variant (``cfg.variant``: top-k in the graph, precision, onnxruntime optimisation level) is
    checked against PyTorch on at most ``cfg.quality_max_examples`` validation examples (evenly
    spaced over the split): top-k overlap and metric change go to ``quality`` in the metadata.

    Returns:
        The export directory.
    """
    from hydra.utils import instantiate

    from seqrec.baselines import item_counts
    from seqrec.export import ExportVariant, export_onnx

    ckpt = resolve_ckpt(cfg)
    module = load_module(ckpt)
    datamodule = instantiate(cfg.data.datamodule)
    counts = item_counts(datamodule.train_sessions(), datamodule.num_items)
    order = np.argsort(-counts[1:], kind="stable") + 1
    fallback = datamodule.vocab.decode(order[: int(cfg.num_fallback_items)])
    report_path = Path(cfg.report_path)
    test_metrics = json.loads(report_path.read_text()) if report_path.is_file() else None
    valid = datamodule.examples("valid")
    num_quality = min(len(valid), int(cfg.quality_max_examples))
    rows = (
        np.linspace(0, len(valid) - 1, num_quality).round().astype(np.int64) if num_quality else []
    )
    quality_examples = (
        ([valid.prefixes[i] for i in rows], valid.next_items[rows]) if num_quality else None
    )
    variant = ExportVariant(**OmegaConf.to_container(cfg.variant, resolve=True))
    return export_onnx(
        module.model,
        vocab=datamodule.vocab,
        out_dir=Path(cfg.export_dir),
        opset=int(cfg.opset),
        fallback_items=fallback,
        extra_meta={
            "source_checkpoint": str(ckpt),
            "dataset": cfg.data.name,
            "test_metrics": test_metrics["results"]["SASRec"] if test_metrics else None,
        },
        variant=variant,
        quality_examples=quality_examples,
        quality_k=int(cfg.quality_k),
    )


def _fmt_metric(value: float | None) -> str:
    """A metric for people: 4 decimals (the exact value stays in the JSON result); None as is."""
    return "None (no checkpoint kept)" if value is None else f"{value:.4f}"


def summarize(stage: str, result: Any) -> str:
    """Human-readable summary of a stage's result, printed by the scripts."""
    if stage == "evaluate":
        return (
            f"\n{result['dataset']} / {result['split']}: {result['num_examples']} examples ranked against "
            f"{result['num_items']} items (ties count against the model)\n\n{result['table_md']}\n"
        )
    if stage == "train":
        return (
            f"\ntrained {result['epochs']} epoch(s), {result['global_step']} steps in {result['train_time_s']} s; "
            f"best val MRR@20 = {_fmt_metric(result['best_val_mrr@20'])}\n"
            f"best checkpoint: {result['best_ckpt']}\n"
        )
    if stage == "prepare":
        keys = ("train_sessions", "valid_sessions", "test_sessions")
        parts = [
            f"{k}: {result[k]['num_sessions']} sessions / {result[k]['num_events']} events"
            for k in keys
            if k in result
        ]
        return (
            f"\nprepared {result['num_items']} items; "
            + "; ".join(parts)
            + f"; {result['num_valid_examples']} valid / {result['num_test_examples']} test examples\n"
        )
    return f"\n{stage}: {result}\n"
