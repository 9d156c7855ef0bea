"""Export a trained :class:`~seqrec.models.sasrec.SASRec` to ONNX and verify it.

The export directory holds everything the torch-free predictor needs:

* ``model.onnx``: ``item_ids`` (batch, seq_len) int64, left-padded with PAD_IDX = 0
  -> ``scores`` (batch, C) float32, column PAD_IDX = float32 minimum;
* ``item_vocab.json``: ``{"pad_idx": 0, "item_ids": [...]}``, index i <-> ``item_ids[i - 1]``;
* ``export_meta.json``: shapes, names, exporter, validation report, fallback items (written last,
  so a directory without it is not a finished export).

Exports are verified, not trusted (house rule 9): :func:`validate_onnx` compares onnxruntime
with eager PyTorch on several batch shapes before anything is published.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from seqrec.constants import PAD_IDX
from seqrec.data.vocab import ItemVocab
from seqrec.models.sasrec import SASRec
from seqrec.sequence import encode_prefixes

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the export directory layout and ``export_meta.json`` schema."""
MODEL_FILE = "model.onnx"
VOCAB_FILE = "item_vocab.json"
META_FILE = "export_meta.json"
INPUT_NAME = "item_ids"
OUTPUT_NAME = "scores"

_TOP_K_CHECK = 10
_PAD_SCORE_MAX = -1e30  # the PAD column must be at least this negative in both runtimes
_DUMMY_BATCH = 2  # > 1 so the exporter never specialises the batch axis
_DUMMY_LEN = 7  # < max_len (usually) so the sequence axis is never frozen at max_len


class ExportValidationError(RuntimeError):
    """onnxruntime and eager PyTorch disagree on an exported model."""


class ScoringModel(nn.Module):
    """The exported graph: item ids in, next-item scores for the whole catalog out."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_ids: Tensor) -> Tensor:
        """Score the catalog for the next item of each session.

        Args:
            item_ids: (B, L) int64 item indices, left-padded with PAD_IDX = 0; 1 <= L <= max_len.

        Returns:
            (B, C) float32 scores (``SASRec.score_last``); column PAD_IDX is the float32 minimum.
        """
        return self.model.score_last(item_ids)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _on_cpu(model: SASRec) -> SASRec:
    """Return ``model`` itself if its parameters live on the CPU, else a CPU copy."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu()


def _export_dynamo(
    wrapper: ScoringModel, dummy: Tensor, path: Path, opset: int, max_len: int
) -> None:
    batch = torch.export.Dim("batch")
    seq_len = torch.export.Dim("seq_len", min=1, max=max_len)
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={INPUT_NAME: {0: batch, 1: seq_len}},
        external_data=False,
        verbose=False,
    )


def _export_legacy(
    wrapper: ScoringModel, dummy: Tensor, path: Path, opset: int, max_len: int
) -> None:
    del max_len  # the TorchScript exporter has no bounds on dynamic axes
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch", 1: "seq_len"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )


_EXPORTERS = {"dynamo": _export_dynamo, "legacy": _export_legacy}


def _onnx_opset(path: Path) -> int:
    """The default-domain opset recorded in an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def _remove_export_files(directory: Path) -> None:
    for name in os.listdir(directory):
        if name == MODEL_FILE or name.startswith(MODEL_FILE + "."):  # model.onnx.data etc.
            (directory / name).unlink()


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished export from ``tmp_dir`` to ``out_dir``; ``export_meta.json`` lands last.

    A new ``out_dir`` is created by one atomic rename. An existing one keeps its other files; its
    old metadata is removed first, so an interrupted publish never looks like a valid export.
    """
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"export target exists and is not a directory: {out_dir}")
    (out_dir / META_FILE).unlink(missing_ok=True)
    _remove_export_files(out_dir)
    for name in sorted(os.listdir(tmp_dir), key=lambda n: n == META_FILE):
        os.replace(tmp_dir / name, out_dir / name)
    tmp_dir.rmdir()


def export_onnx(
    model: SASRec,
    vocab: ItemVocab,
    out_dir: Path,
    opset: int = 18,
    fallback_items: list[str] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Export ``model`` as a scoring graph, verify it, and write the serving directory.

    The dynamo exporter is tried first; if it raises or its graph fails :func:`validate_onnx`, the
    legacy TorchScript exporter is used instead (``exporter`` in the metadata says which, and
    ``exporter_fallback_reason`` why). The dummy input is (2, 7) (shorter than ``max_len``) so no
    axis is frozen. Files are written to a temporary sibling directory and published only after
    validation passed, ``export_meta.json`` last.

    Args:
        model: trained model; exported in eval mode on the CPU (its own mode is restored).
        vocab: the training vocab; ``vocab.num_items`` must equal ``model.cfg.num_items``.
        out_dir: export directory (created or updated in place; unrelated files are kept).
        opset: ONNX opset to pin (the dynamo exporter needs >= 18).
        fallback_items: raw item ids recommended to sessions with no known item, best first
            (most popular train items). ``None`` stores an empty list.
        extra_meta: extra JSON-serialisable keys for ``export_meta.json``, e.g.
            ``source_checkpoint``, ``dataset``, ``test_metrics``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: vocab and model sizes differ, a fallback item is not in the vocab, or
            ``extra_meta`` overrides a reserved key.
        ExportValidationError: neither exporter produced a graph that matches eager PyTorch.
    """
    out_dir = Path(out_dir)
    cfg = model.cfg
    if vocab.num_items != cfg.num_items:
        raise ValueError(f"vocab has {vocab.num_items} items but the model {cfg.num_items}")
    fallback = [str(i) for i in (fallback_items or [])]
    missing = [i for i in fallback if i not in vocab]
    if missing:
        raise ValueError(
            f"{len(missing)} fallback item(s) not in the vocab, e.g. {missing[:5]}: "
            "fallback items must be catalog items"
        )
    if len(set(fallback)) != len(fallback):
        logger.warning("fallback_items has duplicates; keeping the first occurrence of each")
        fallback = list(dict.fromkeys(fallback))

    cpu_model = _on_cpu(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the published directory should not be
    try:
        with _eval_mode(cpu_model):
            exporter, validation, fallback_reason, export_time_s = _export_validated(
                cpu_model, tmp_dir / MODEL_FILE, opset
            )
        actual_opset = _onnx_opset(tmp_dir / MODEL_FILE)
        if actual_opset != opset:
            logger.warning(
                "requested opset %d, the %s exporter wrote %d", opset, exporter, actual_opset
            )
        vocab.save(tmp_dir / VOCAB_FILE)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "max_len": cfg.max_len,
            "num_items": cfg.num_items,
            "pad_idx": PAD_IDX,
            "opset": actual_opset,
            "exporter": exporter,
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "fallback_items": fallback,
            "validation": validation,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "export_time_s": round(export_time_s, 3),
            "torch_version": torch.__version__,
        }
        if fallback_reason is not None:
            meta["exporter_fallback_reason"] = fallback_reason
        clashes = sorted(set(meta) & set(extra_meta or {}))
        if clashes:
            raise ValueError(f"extra_meta may not override reserved keys: {clashes}")
        meta.update(extra_meta or {})
        (tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        _publish(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(
        "exported %s with the %s exporter in %.1f s (max |diff| %.2e over %d batches)",
        out_dir,
        exporter,
        export_time_s,
        validation["max_abs_diff"],
        len(validation["batches_checked"]),
    )
    return out_dir


def _export_validated(
    model: SASRec, onnx_path: Path, opset: int
) -> tuple[str, dict[str, Any], str | None, float]:
    """Export with the first exporter whose graph validates.

    Returns:
        (exporter name, validation report, why the dynamo exporter was not used or None,
        seconds spent in the successful export call).

    Raises:
        ExportValidationError: no exporter produced a valid graph.
    """
    wrapper = ScoringModel(model).eval()
    max_len = model.cfg.max_len
    dummy = torch.randint(
        1, model.cfg.num_items + 1, (_DUMMY_BATCH, min(_DUMMY_LEN, max_len)), dtype=torch.int64
    )
    errors: dict[str, str] = {}
    for name, export_fn in _EXPORTERS.items():
        onnx_path.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
                # the legacy exporter is deprecated as a whole; using it is logged instead
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                export_fn(wrapper, dummy, onnx_path, opset, max_len)
            export_time_s = time.perf_counter() - start
            validation = validate_onnx(model, onnx_path)
        except Exception as exc:  # any failure moves on to the next exporter
            errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
            logger.warning("%s ONNX export failed: %s", name, errors[name])
            continue
        return name, validation, errors.get("dynamo"), export_time_s
    raise ExportValidationError(
        "no exporter produced a valid ONNX graph: "
        + "; ".join(f"{name}: {err}" for name, err in errors.items())
    )


def _validation_batches(model: SASRec, rng: np.random.Generator) -> list[np.ndarray]:
    """Inputs that cover the cases the predictor sends (all (B, L') int64, left-padded).

    1. a mixed batch padded to max_len: lengths 1, 2, max_len // 2, max_len and max_len + 3
       (truncated by ``encode_prefixes``);
    2. an all-padding-except-one batch: a fully padded row and rows holding one item at the end;
    3. random real items of shapes (1, 1), (3, 7), (1, max_len), (4, max_len) (7 capped at max_len).
    """
    num_items, max_len = model.cfg.num_items, model.cfg.max_len

    def items(count: int) -> list[int]:
        return rng.integers(1, num_items + 1, size=count).tolist()

    lengths = [1, 2, max(1, max_len // 2), max_len, max_len + 3]
    mixed = encode_prefixes([items(n) for n in lengths], max_len, pad_to_longest=False)
    one_item = encode_prefixes([[], *([i] for i in items(3))], max_len, pad_to_longest=False)
    batches = [mixed, one_item]
    for batch, length in [(1, 1), (3, min(7, max_len)), (1, max_len), (4, max_len)]:
        batches.append(rng.integers(1, num_items + 1, size=(batch, length), dtype=np.int64))
    return batches


def _top_k_sets(scores: np.ndarray, k: int) -> list[set[int]]:
    """Per-row sets of the k best real item indices of (B, C) ``scores`` (PAD ignored)."""
    real = scores[:, 1:]
    top = np.argsort(-real, axis=1, kind="stable")[:, :k] + 1
    return [set(row.tolist()) for row in top]


def validate_onnx(
    model: SASRec, onnx_path: Path, atol: float = 1e-4, seed: int = 0
) -> dict[str, Any]:
    """Compare onnxruntime (CPU) with eager PyTorch on batches that cover the serving cases.

    Checks per batch (see :func:`_validation_batches` for the inputs):

    * output name ``scores``, shape (B, C), float32, no NaN in either runtime;
    * real-item columns 1..C-1 ``np.allclose(onnx, eager, rtol=1e-5, atol=atol)``;
    * PAD column <= -1e30 in both (it holds the float32 minimum);
    * identical top-10 item sets per row (PAD ignored). Items swapped only across an exact tie at
      the cut (eager scores within ``atol`` of the 10th best) are tolerated and counted in
      ``top10_tie_swaps``.

    Args:
        model: the eager model the file was exported from (run in eval mode on the CPU; its mode
            is restored).
        onnx_path: the exported graph with input ``item_ids`` and output ``scores``.
        atol: absolute tolerance on scores.
        seed: seed for the random item ids.

    Returns:
        ``{"max_abs_diff": float, "top10_identical": True, "top10_tie_swaps": int,
        "batches_checked": [[B, L], ...], "atol": atol}``.

    Raises:
        ExportValidationError: naming the batch shape and the difference, on any failed check.
    """
    import onnxruntime as ort

    cpu_model = _on_cpu(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]
    if input_names != [INPUT_NAME] or output_names != [OUTPUT_NAME]:
        raise ExportValidationError(
            f"{onnx_path}: expected input {[INPUT_NAME]} and output {[OUTPUT_NAME]}, "
            f"got {input_names} -> {output_names}"
        )

    num_columns = cpu_model.cfg.num_items + 1
    k = min(_TOP_K_CHECK, cpu_model.cfg.num_items)
    rng = np.random.default_rng(seed)
    max_abs_diff = 0.0
    tie_swaps = 0
    shapes: list[list[int]] = []
    with _eval_mode(cpu_model), torch.inference_mode():
        for item_ids in _validation_batches(cpu_model, rng):
            shape = list(item_ids.shape)
            got = session.run([OUTPUT_NAME], {INPUT_NAME: item_ids})[0]
            want = cpu_model.score_last(torch.from_numpy(item_ids)).numpy()
            if got.shape != (item_ids.shape[0], num_columns) or got.dtype != np.float32:
                raise ExportValidationError(
                    f"batch {shape}: onnx output {got.shape} {got.dtype}, "
                    f"expected ({item_ids.shape[0]}, {num_columns}) float32"
                )
            if np.isnan(got).any() or np.isnan(want).any():
                raise ExportValidationError(
                    f"batch {shape}: NaN scores (onnx: {int(np.isnan(got).sum())}, "
                    f"eager: {int(np.isnan(want).sum())})"
                )
            diff = float(np.abs(got[:, 1:] - want[:, 1:]).max())
            max_abs_diff = max(max_abs_diff, diff)
            if not np.allclose(got[:, 1:], want[:, 1:], rtol=1e-5, atol=atol):
                raise ExportValidationError(
                    f"batch {shape}: onnxruntime and eager scores differ, max |diff| = {diff:.3e} "
                    f"(atol {atol:g})"
                )
            if (got[:, PAD_IDX] > _PAD_SCORE_MAX).any() or (
                want[:, PAD_IDX] > _PAD_SCORE_MAX
            ).any():
                raise ExportValidationError(
                    f"batch {shape}: PAD column not masked (onnx {got[:, PAD_IDX].max():.3e}, "
                    f"eager {want[:, PAD_IDX].max():.3e})"
                )
            for row, (got_top, want_top) in enumerate(
                zip(_top_k_sets(got, k), _top_k_sets(want, k), strict=True)
            ):
                swapped = got_top ^ want_top
                if not swapped:
                    continue
                cut = np.sort(want[row, 1:])[::-1][k - 1]
                if np.abs(want[row, sorted(swapped)] - cut).max() > atol:
                    raise ExportValidationError(
                        f"batch {shape}, row {row}: top-{k} items differ: onnx-only "
                        f"{sorted(got_top - want_top)}, eager-only {sorted(want_top - got_top)}"
                    )
                tie_swaps += len(swapped) // 2
            shapes.append(shape)
    logger.info("validated %s on %d batches, max |diff| %.2e", onnx_path, len(shapes), max_abs_diff)
    return {
        "max_abs_diff": max_abs_diff,
        "top10_identical": True,
        "top10_tie_swaps": tie_swaps,
        "batches_checked": shapes,
        "atol": atol,
    }
