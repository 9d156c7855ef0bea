"""Export a trained :class:`~seqrec.models.sasrec.SASRec` to ONNX and verify it.

The export directory holds everything the torch-free predictor needs:

* ``model.onnx``, one of two graph layouts (:class:`ExportVariant`):

  - full scores (default): ``item_ids`` (batch, seq_len) int64, left-padded with PAD_IDX = 0
    -> ``scores`` (batch, C) float32, column PAD_IDX = float32 minimum (or -inf in fp16);
  - top-k in the graph: ``item_ids``, ``score_mask`` (1 or batch, C) float32 (0 = keep,
    -inf = excluded; built by ``seqrec.filters.mask_scores``) and ``k`` (1,) int64
    -> ``top_scores`` (batch, k) float32 and ``top_idx`` (batch, k) int64, best first;
    where ``export_meta.json`` has ``empty_score_mask: true`` a (0, C) ``score_mask`` means no
    filter and skips the mask's pass over the scores
    (``seqrec.incremental.skip_empty_score_mask``); ``top_k_block_size`` (an integer m, or
    null) says that the graph's top-k runs over blocks of m items, exactly for scores without
    NaN (``seqrec.incremental.block_top_k``; the predictor checks such exports' weights for NaN
    at load);

  in float32, float16 weights or dynamically quantised int8 weights; incremental exports
  (``seqrec.incremental``) add ``model_step.onnx`` and may keep an int8 copy of the item table
  for the catalog product (``int8_catalog``);
* ``item_vocab.json``: ``{"pad_idx": 0, "item_ids": [...]}``, index i <-> ``item_ids[i - 1]``;
* ``export_meta.json``: shapes, names, exporter, variant, validation and quality reports, sha256
  of the model and vocabulary files, fallback items (written last, so a directory without it is not
  a finished export).

Exports are verified, not trusted (house rule 9): :func:`validate_onnx` compares the float32 graph
with eager PyTorch on several batch shapes, then :func:`check_variant` compares the published
variant with PyTorch (top-k overlap and metric change on validation examples) before anything is
published.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.constants import (
    FORMAT_VERSION,
    GRAPH_OPTIMIZATION_LEVELS,
    INT8_PRECISIONS,
    INT8_SATURATION_SAFE,
    PAD_IDX,
    PRECISIONS,
)
from seqrec.data.vocab import ItemVocab
from seqrec.incremental import (
    STEP_FILE,
    block_top_k,
    export_incremental,
    skip_empty_score_mask,
)
from seqrec.models.sasrec import SASRec
from seqrec.predictor import file_sha256
from seqrec.sequence import encode_prefixes

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
VOCAB_FILE = "item_vocab.json"
META_FILE = "export_meta.json"
INPUT_NAME = "item_ids"
OUTPUT_NAME = "scores"
MASK_NAME = "score_mask"
K_NAME = "k"
TOP_SCORES_NAME = "top_scores"
TOP_IDX_NAME = "top_idx"
SCORING_MODES = ("last_position", "dot", "score_last")
"""Graphs :class:`ScoringModel` can write, fastest first; the export tries them in this order."""

_TOP_K_CHECK = 10
_PAD_SCORE_MAX = -1e30  # the PAD column must be at least this negative in both runtimes
_DUMMY_BATCH = 2  # > 1 so the exporter never specialises the batch axis
_DUMMY_LEN = 7  # < max_len (usually) so the sequence axis is never frozen at max_len


class ExportValidationError(RuntimeError):
    """onnxruntime and eager PyTorch disagree on an exported model."""


@dataclass(frozen=True)
class ExportVariant:
    """How the serving graph is laid out and stored (see the module docstring).

    The library default is the plain contract graph (``item_ids`` -> ``scores``, float32);
    ``conf/export.yaml`` defaults to top-k in the graph, which ``scripts/bench_latency.py``
    measured faster for one session and for batches on CPU.

    Attributes:
        top_k_in_graph: append ``Add(score_mask)`` + ``TopK(k)`` to the graph instead of returning
            the full (B, C) scores (the predictor then needs no numpy top-k); the ``Add`` is
            skipped for a (0, C) mask (no filter) where the PAD column is never scored.
        precision: ``fp32``; ``fp16`` (float16 weights and compute, float32 inputs/outputs);
            ``int8`` (``onnxruntime.quantization.quantize_dynamic``: int8 weights in 7 bits,
            ``reduce_range``, activations quantised per call); or ``int8_catalog`` (incremental
            exports only: float32 everywhere but the product of the hidden state with the item
            table, which reads an int8 copy of the table with one scale per item,
            :func:`seqrec.incremental.quantize_catalog`).
        graph_optimization_level: onnxruntime level the predictor should load the graph with
            (``disable``, ``basic``, ``extended``, ``all``); recorded in the metadata.
        min_top_k_overlap: smallest mean top-k overlap with PyTorch on the quality check that is
            accepted (float32 variants must match exactly up to ties anyway).
        incremental: also write the step graph ``model_step.onnx`` and make ``model.onnx`` the
            prefill graph that returns every position's states (``seqrec.incremental``), so the
            predictor computes only the newest item of a session it has seen one click earlier.
            Needs ``top_k_in_graph``, ``fp32`` or ``int8_catalog``, and the dynamo exporter.
    """

    top_k_in_graph: bool = False
    precision: str = "fp32"
    graph_optimization_level: str = "all"
    min_top_k_overlap: float = 0.9
    incremental: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}, "
                f"got {self.graph_optimization_level!r}"
            )
        if not 0.0 <= self.min_top_k_overlap <= 1.0:
            raise ValueError(f"min_top_k_overlap must be in [0, 1], got {self.min_top_k_overlap}")
        if self.incremental and (
            not self.top_k_in_graph or self.precision not in ("fp32", "int8_catalog")
        ):
            raise ValueError(
                "incremental=True needs top_k_in_graph=True and precision 'fp32' or "
                f"'int8_catalog', got top_k_in_graph={self.top_k_in_graph}, precision="
                f"{self.precision!r}; for other layouts set incremental=False with precision "
                "'fp32', 'fp16' or 'int8' (scripts/export_onnx.py: variant.incremental=false "
                "variant.precision=fp32)"
            )
        if self.precision == "int8_catalog" and not self.incremental:
            raise ValueError(
                "precision='int8_catalog' is written for incremental exports only (set "
                "incremental=True and top_k_in_graph=True); for a plain graph use precision "
                "'fp32', 'fp16' or 'int8' (scripts/export_onnx.py: variant.incremental=false "
                "variant.precision=fp32)"
            )


class ScoringModel(nn.Module):
    """The exported graph: item ids in, next-item scores for the whole catalog out.

    Same numbers as ``SASRec.score_last`` (``validate_onnx`` checks it), written for inference:

    * in mode ``last_position`` the final block runs only at the last position (its keys and
      values still cover every position): the other positions' outputs of that block are never
      used, and skipping them removes about a third of the transformer's work;
    * the real-item scores come from one MatMul against the constant table rows 1..C-1 and the
      PAD column is concatenated in front, instead of ``index_fill`` (which the dynamo exporter
      lowers to two (B, C) transposes around a ScatterND).

    The specialised path reuses the model's own modules (embeddings, blocks, LayerNorms); it needs
    the block layout of ``seqrec.models.sasrec`` and falls back to ``SASRec.forward`` otherwise.
    """

    def __init__(self, model: SASRec, mode: str = "last_position") -> None:
        """Wrap ``model``.

        Args:
            model: the trained model.
            mode: ``last_position`` (fastest), ``dot`` (full forward, then the dot-product
                scores, and for ``cfg.copy_mechanism`` the pointer mixture at the last position)
                or ``score_last`` (``SASRec.score_last`` as is, always exact). A copy model asked
                for ``last_position`` uses ``dot`` (the pointer needs every position's state); a
                mode the model cannot use (a different block layout) degrades to ``score_last``.
        """
        super().__init__()
        if mode not in SCORING_MODES:
            raise ValueError(f"mode must be one of {SCORING_MODES}, got {mode!r}")
        self.model = model
        self.is_copy = bool(getattr(model.cfg, "copy_mechanism", False))
        if mode == "last_position" and not _has_sasrec_blocks(model):
            mode = "score_last"
        if mode == "last_position" and self.is_copy:
            mode = "dot"  # the pointer's keys need every position's final state
        if mode == "dot" and self.is_copy and not _has_copy_head(model):
            mode = "score_last"
        self.mode = mode

    @property
    def last_position_only(self) -> bool:
        """Whether the final block runs only at the last position."""
        return self.mode == "last_position"

    def forward(self, item_ids: Tensor) -> Tensor:
        """Score the catalog for the next item of each session.

        Args:
            item_ids: (B, L) int64 item indices, left-padded with PAD_IDX = 0; 1 <= L <= max_len.

        Returns:
            (B, C) float32 scores (as ``SASRec.score_last``); column PAD_IDX is the float32
            minimum.
        """
        if self.mode == "score_last":
            return self.model.score_last(item_ids)
        if self.mode == "last_position":
            hidden = self._last_hidden(item_ids)  # (B, D)
        else:
            states = self.model(item_ids)  # (B, L, D)
            hidden = states[:, -1]  # (B, D) state after the most recent item
        real = hidden @ self.model.item_emb.weight[PAD_IDX + 1 :].t()  # (B, C-1)
        if self.is_copy:
            real = self.model.copy_log_probs_last(real, states, item_ids)  # (B, C-1)
        pad = torch.full(
            (hidden.shape[0], 1), torch.finfo(real.dtype).min, dtype=real.dtype
        )  # (B, 1)
        return torch.cat([pad, real], dim=1)  # (B, C); PAD_IDX = 0 is the first column

    def _last_hidden(self, item_ids: Tensor) -> Tensor:
        """``SASRec.forward(item_ids)[:, -1]`` with the final block computed at the last position.

        Args:
            item_ids: (B, L) int64, left-padded; the last position is always a real item here
                (an all-padding row gives the same zeros as ``SASRec.forward``).

        Returns:
            (B, D) float hidden state after the most recent item.
        """
        model = self.model
        cfg = model.cfg
        batch, length = item_ids.shape
        is_real = item_ids != PAD_IDX  # (B, L)
        positions = (torch.cumsum(is_real.to(torch.int64), dim=1) - 1).clamp(min=0)  # (B, L)
        hidden = model.item_emb(item_ids) * (cfg.d_model**0.5) + model.pos_emb(positions)
        hidden = model.emb_drop(hidden) * is_real.unsqueeze(-1).to(hidden.dtype)  # (B, L, D)
        idx = torch.arange(length, device=item_ids.device)
        is_causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (L, L): query row, key column
        is_self = idx.unsqueeze(0) == idx.unsqueeze(1)  # (L, L)
        is_allowed = (is_causal.unsqueeze(0) & is_real.unsqueeze(1)) | is_self.unsqueeze(0)
        neg = torch.finfo(hidden.dtype).min
        attn_bias = torch.zeros(is_allowed.shape, dtype=hidden.dtype, device=item_ids.device)
        attn_bias = attn_bias.masked_fill(~is_allowed, neg).unsqueeze(1)  # (B, 1, L, L)
        for block in model.blocks[:-1]:
            hidden = block(hidden, attn_bias)  # (B, L, D)

        block = model.blocks[-1]
        heads = block.attn.n_heads
        head_dim = cfg.d_model // heads
        qkv = block.attn.qkv(block.ln_attn(hidden))  # (B, L, 3D)
        qkv = qkv.view(batch, length, 3, heads, head_dim)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, Dh)
        attended = F.scaled_dot_product_attention(
            q[:, :, -1:], k, v, attn_mask=attn_bias[:, :, -1:]
        )  # (B, H, 1, Dh)
        attended = attended.transpose(1, 2).reshape(batch, 1, cfg.d_model)  # (B, 1, D)
        last = hidden[:, -1:] + block.drop(block.attn.proj(attended))  # (B, 1, D)
        last = last + block.drop(block.ffn(block.ln_ffn(last)))  # (B, 1, D)
        last = model.ln_out(last)[:, 0]  # (B, D)
        return last * is_real[:, -1:].to(last.dtype)  # (B, D); zeros for an all-padding row


def _has_sasrec_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has the block layout :meth:`ScoringModel._last_hidden` relies on."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        return False
    names = ("ln_attn", "attn", "ln_ffn", "ffn", "drop")
    return all(
        all(hasattr(block, name) for name in names)
        and hasattr(block.attn, "qkv")
        and hasattr(block.attn, "proj")
        and hasattr(block.attn, "n_heads")
        for block in blocks
    ) and all(hasattr(model, name) for name in ("item_emb", "pos_emb", "emb_drop", "ln_out"))


def _has_copy_head(model: nn.Module) -> bool:
    """Whether ``model`` has ``SASRec.copy_log_probs_last`` (the last-position copy mixture)."""
    return hasattr(model, "copy_log_probs_last")


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
EXPORTER_ORDER = ("dynamo", "legacy")
"""Order in which the exporters of ``_EXPORTERS`` are tried (not the dict's insertion order,
which a test that removes and restores an entry would change)."""


def _onnx_opset(path: Path) -> int:
    """The default-domain opset recorded in an ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def _remove_export_files(directory: Path) -> None:
    for name in os.listdir(directory):
        if name in (MODEL_FILE, STEP_FILE) or name.startswith(MODEL_FILE + "."):  # .onnx.data
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
    variant: ExportVariant | None = None,
    quality_examples: tuple[Sequence[Sequence[int] | np.ndarray], np.ndarray] | None = None,
    quality_k: int = 20,
    exporters: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` as a scoring graph, verify it, and write the serving directory.

    The float32 scores graph is exported first: the dynamo exporter is tried first; if it raises or
    its graph fails :func:`validate_onnx`, the legacy TorchScript exporter is used instead
    (``exporter`` in the metadata says which, and ``exporter_fallback_reason`` why). The dummy input
    is (2, 7) (shorter than ``max_len``) so no axis is frozen. The requested ``variant`` is then
    derived from it (precision, top-k in the graph) and compared with PyTorch by
    :func:`check_variant` (report under ``quality`` in the metadata). Files are written to a
    temporary sibling directory and published only after both checks passed,
    ``export_meta.json`` last; it records the sha256 of ``model.onnx`` and ``item_vocab.json`` so
    the predictor can refuse a mismatched pair.

    Args:
        model: trained model; exported in eval mode on the CPU (its own mode is restored).
        vocab: the training vocab; ``vocab.num_items`` must equal ``model.cfg.num_items``.
        out_dir: export directory (created or updated in place; unrelated files are kept).
        opset: ONNX opset to pin (the dynamo exporter needs >= 18).
        fallback_items: raw item ids recommended to sessions with no known item, best first
            (most popular train items). ``None`` stores an empty list.
        extra_meta: extra JSON-serialisable keys for ``export_meta.json``, e.g.
            ``source_checkpoint``, ``dataset``, ``test_metrics``.
        variant: graph layout and precision; ``None`` = ``ExportVariant()`` (full scores, fp32).
        quality_examples: (prefixes, next_items) of the validation split (item indices) for the
            quality check's metric change; ``None`` uses random sessions (overlap only).
        quality_k: k of the top-k overlap (metrics are computed at 10 and ``quality_k``).
        exporters: names to try, in order (``dynamo``, ``legacy``); ``None`` = both.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: vocab and model sizes differ, a fallback item is not in the vocab, or
            ``extra_meta`` overrides a reserved key.
        ExportValidationError: neither exporter produced a graph that matches eager PyTorch, or the
            variant's top-k overlap with PyTorch is below ``variant.min_top_k_overlap``.
    """
    out_dir = Path(out_dir)
    variant = variant or ExportVariant()
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
    base_path = tmp_dir / "scores_fp32.onnx"  # intermediate, removed before publishing
    incremental: dict[str, Any] | None = None
    try:
        with _eval_mode(cpu_model):
            if variant.incremental:
                if exporters is not None and "dynamo" not in exporters:
                    raise ValueError("incremental exports need the dynamo exporter")
                start = time.perf_counter()
                incremental = export_incremental(
                    cpu_model,
                    tmp_dir / MODEL_FILE,
                    tmp_dir / STEP_FILE,
                    opset,
                    int8_catalog=variant.precision == "int8_catalog",
                )
                export_time_s = time.perf_counter() - start
                exporter, fallback_reason = "dynamo", None
                validation = {
                    key: incremental.pop(key) for key in ("max_abs_diff", "batches_checked", "atol")
                }
                validation["scoring_graph"] = "incremental prefill + step"
                if variant.precision == "int8_catalog":
                    validation["graphs_checked"] = (
                        "float32, before quantize_catalog; the int8 graphs: "
                        "incremental.validation.int8_catalog and quality"
                    )
                actual_opset = _onnx_opset(tmp_dir / MODEL_FILE)
            else:
                exporter, validation, fallback_reason, export_time_s = _export_validated(
                    cpu_model, base_path, opset, exporters
                )
                actual_opset = _onnx_opset(base_path)
                build_variant(base_path, tmp_dir / MODEL_FILE, variant, cfg.num_items + 1)
                base_path.unlink()
            # top-k graphs take a (0, C) score_mask for no filter where the rewrite applies
            empty_mask = variant.top_k_in_graph and (
                incremental is not None or skip_empty_score_mask(tmp_dir / MODEL_FILE)
            )
            # exact two-stage top-k over blocks of items where the catalog size allows
            top_k_block = incremental.pop("top_k_block_size") if incremental else None
            if variant.top_k_in_graph and incremental is None:
                # the top-k reads the real items' scores where the mask rewrite found them
                width = cfg.num_items + (0 if empty_mask else 1)
                top_k_block = block_top_k(tmp_dir / MODEL_FILE, width)
            quality = check_variant(
                cpu_model,
                tmp_dir / MODEL_FILE,
                variant,
                quality_examples,
                k=quality_k,
                empty_mask=empty_mask,
            )
        if actual_opset != opset:
            logger.warning(
                "requested opset %d, the %s exporter wrote %d", opset, exporter, actual_opset
            )
        vocab.save(tmp_dir / VOCAB_FILE)
        files = (MODEL_FILE, VOCAB_FILE) + ((STEP_FILE,) if incremental else ())
        hashes = {name: file_sha256(tmp_dir / name) for name in files}
        if incremental:
            names = incremental.pop("names")
            input_names, output_names = names["prefill_inputs"], names["outputs"]
            incremental = {
                "step_file": STEP_FILE,
                "step_input_names": names["step_inputs"],
                "validation": incremental,
            }
        elif variant.top_k_in_graph:
            input_names = [INPUT_NAME, MASK_NAME, K_NAME]
            output_names = [TOP_SCORES_NAME, TOP_IDX_NAME]
        else:
            input_names, output_names = [INPUT_NAME], [OUTPUT_NAME]
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model_version": hashes[MODEL_FILE][:12],
            "max_len": cfg.max_len,
            "num_items": cfg.num_items,
            "pad_idx": PAD_IDX,
            "opset": actual_opset,
            "exporter": exporter,
            "input_name": INPUT_NAME,
            "output_name": output_names[0],
            "input_names": input_names,
            "output_names": output_names,
            "variant": asdict(variant),
            "empty_score_mask": empty_mask,
            "top_k_block_size": top_k_block,
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "fallback_items": fallback,
            "validation": validation,
            "quality": quality,
            "sha256": hashes,
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "export_time_s": round(export_time_s, 3),
            "torch_version": torch.__version__,
        }
        if fallback_reason is not None:
            meta["exporter_fallback_reason"] = fallback_reason
        if variant.precision in INT8_PRECISIONS:
            # integer inputs every CPU kernel multiplies exactly (7-bit activations or weights);
            # the predictor warns about int8 exports made before (see INT8_SATURATION_SAFE)
            meta[INT8_SATURATION_SAFE] = True
        if incremental:
            meta["incremental"] = incremental
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
        "exported %s (%s, top-k in graph: %s) with the %s exporter in %.1f s "
        "(max |diff| %.2e over %d batches; top-%d overlap %.4f)",
        out_dir,
        variant.precision,
        variant.top_k_in_graph,
        exporter,
        export_time_s,
        validation["max_abs_diff"],
        len(validation["batches_checked"]),
        quality["k"],
        quality["top_k_overlap_mean"],
    )
    return out_dir


# ------------------------------------------------------------------------------------- variants


def _convert_precision(src: Path, dst: Path, precision: str) -> None:
    """Write ``src`` (float32 scores graph) to ``dst`` in ``precision`` (inputs/outputs unchanged)."""
    import onnx

    if precision == "fp32":
        shutil.copyfile(src, dst)
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import (
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "values clipped to the fp16 range"
            proto = convert_float_to_float16(
                onnx.load(str(src)),
                keep_io_types=True,
                # onnxruntime's CPU ScatterElements has no float16 kernel with reduction="add"
                # (the copy mechanism's pointer scatter): it stays float32
                op_block_list=[*DEFAULT_OP_BLOCK_LIST, "ScatterElements"],
            )
        # the converter appends the Cast nodes around blocked ops at the end of the node list;
        # ONNX requires topological order
        import onnx_ir

        graph_ir = onnx_ir.from_proto(proto)
        graph_ir.graph.sort()
        proto = onnx_ir.to_proto(graph_ir)
        onnx.save(proto, str(dst))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # reduce_range: 7-bit weights, so that x86 kernels without VNNI (AVX2's saturating
        # int16 pair sums of u8 x s8 products) compute the product exactly; onnxruntime's own
        # advice for such CPUs (see seqrec.incremental.quantize_catalog for what 8 bits did)
        quantize_dynamic(
            src, dst, weight_type=QuantType.QInt8, per_channel=False, reduce_range=True
        )
    else:  # pragma: no cover - ExportVariant validates the name
        raise ValueError(f"unknown precision {precision!r}")


def _append_top_k(path: Path, num_columns: int) -> None:
    """Rewrite the scores graph at ``path`` to end in ``Add(score_mask)`` + ``TopK(k)``.

    New inputs: ``score_mask`` (1 or B, C) float32 added to the scores (0 keeps an item, -inf
    excludes it) and ``k`` (1,) int64. New outputs ``top_scores`` (B, k) float32 and ``top_idx``
    (B, k) int64 item indices, sorted best first; ONNX TopK puts the lower index first on ties, as
    the predictor's numpy top-k does.

    When the scores come from ``Concat([pad column, real scores], axis=1)`` (as
    :class:`ScoringModel` writes them) the top-k runs on the real-item scores directly (mask
    columns 1..C-1, indices shifted by one), so the (B, C) concatenation is never materialised;
    otherwise it runs on the full scores, whose PAD column the mask excludes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    if [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ExportValidationError(f"{path}: expected the single output {OUTPUT_NAME!r}")
    producer = next((n for n in graph.node if OUTPUT_NAME in n.output), None)
    axis = next((a.i for a in producer.attribute if a.name == "axis"), None) if producer else None
    is_pad_concat = (
        producer is not None
        and producer.op_type == "Concat"
        and len(producer.input) == 2
        and axis in (1, -1)
        and PAD_IDX == 0
    )
    graph.input.append(
        helper.make_tensor_value_info(MASK_NAME, TensorProto.FLOAT, ["mask_batch", num_columns])
    )
    graph.input.append(helper.make_tensor_value_info(K_NAME, TensorProto.INT64, [1]))
    if is_pad_concat:
        real_scores = producer.input[1]  # (B, C-1) scores of items 1..C-1
        graph.node.remove(producer)
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([1], dtype=np.int64), "seqrec_one"),
                numpy_helper.from_array(np.array([num_columns], dtype=np.int64), "seqrec_end"),
            ]
        )
        graph.node.extend(
            [
                helper.make_node(
                    "Slice",
                    [MASK_NAME, "seqrec_one", "seqrec_end", "seqrec_one"],
                    ["seqrec_real_mask"],
                    name="seqrec_real_mask",
                ),  # (1 or B, C-1)
                helper.make_node(
                    "Add", [real_scores, "seqrec_real_mask"], ["masked_scores"], name="seqrec_mask"
                ),
                helper.make_node(
                    "TopK",
                    ["masked_scores", K_NAME],
                    [TOP_SCORES_NAME, "seqrec_real_idx"],
                    name="seqrec_top_k",
                    axis=1,
                    largest=1,
                    sorted=1,
                ),
                helper.make_node(
                    "Add", ["seqrec_real_idx", "seqrec_one"], [TOP_IDX_NAME], name="seqrec_idx"
                ),
            ]
        )
    else:
        graph.node.extend(
            [
                helper.make_node(
                    "Add", [OUTPUT_NAME, MASK_NAME], ["masked_scores"], name="seqrec_mask"
                ),
                helper.make_node(
                    "TopK",
                    ["masked_scores", K_NAME],
                    [TOP_SCORES_NAME, TOP_IDX_NAME],
                    name="seqrec_top_k",
                    axis=1,
                    largest=1,
                    sorted=1,
                ),
            ]
        )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(TOP_SCORES_NAME, TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info(TOP_IDX_NAME, TensorProto.INT64, ["batch", "k"]),
        ]
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def build_variant(
    base_path: Path, out_path: Path, variant: ExportVariant, num_columns: int
) -> Path:
    """Derive the serving graph ``out_path`` from the validated float32 scores graph.

    Args:
        base_path: graph written by the exporter (``item_ids`` -> ``scores``), float32.
        out_path: where to write the variant (may not be ``base_path``).
        variant: precision and layout.
        num_columns: C = num_items + 1 (width of ``score_mask``).

    Returns:
        ``out_path``.
    """
    _convert_precision(base_path, out_path, variant.precision)
    if variant.top_k_in_graph:
        _append_top_k(out_path, num_columns)
    return out_path


def ort_session(
    path: Path, num_threads: int = 1, graph_optimization_level: str = "all"
) -> Any:  # onnxruntime.InferenceSession (imported lazily)
    """A CPU onnxruntime session with ``num_threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[graph_optimization_level]
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_top_k_scorer(
    session: Any,
    top_k_in_graph: bool,
    k: int,
    max_len: int,
    num_columns: int,
    empty_mask: bool = False,
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """``score(prefixes) -> (B, C)`` over an exported graph, for :func:`evaluate_scorer`.

    A full-scores graph returns its scores. A top-k graph returns a (B, C) matrix that holds the
    k best scores at their items and -inf elsewhere, so metrics at cut-offs <= k are exact. Its
    ``score_mask`` is the (1, C) PAD-only mask, or with ``empty_mask`` the (0, C) one that
    graphs rewritten by ``seqrec.incremental.skip_empty_score_mask`` take for no filter (what
    the predictor sends them).
    """
    mask = np.zeros((0 if empty_mask else 1, num_columns), dtype=np.float32)
    mask[:, PAD_IDX] = -np.inf

    def score(prefixes: list[np.ndarray]) -> np.ndarray:
        item_ids = encode_prefixes(prefixes, max_len)  # (B, L') int64
        if not top_k_in_graph:
            return session.run([OUTPUT_NAME], {INPUT_NAME: item_ids})[0]
        top_scores, top_idx = session.run(
            [TOP_SCORES_NAME, TOP_IDX_NAME],
            {INPUT_NAME: item_ids, MASK_NAME: mask, K_NAME: np.array([k], dtype=np.int64)},
        )  # (B, k) float32, (B, k) int64
        dense = np.full((len(prefixes), num_columns), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, top_idx, top_scores, axis=1)
        return dense

    return score


def check_variant(
    model: SASRec,
    onnx_path: Path,
    variant: ExportVariant,
    examples: tuple[Sequence[Sequence[int] | np.ndarray], np.ndarray] | None = None,
    k: int = 20,
    seed: int = 0,
    batch_size: int = 256,
    empty_mask: bool = False,
) -> dict[str, Any]:
    """Compare the published graph with eager PyTorch: top-k overlap and metric change.

    Args:
        model: the eager model (CPU, eval mode).
        onnx_path: the variant written by :func:`build_variant`.
        variant: what ``onnx_path`` is.
        examples: (prefixes, next_items) item indices, usually a capped slice of the validation
            split. ``None``: 512 random sessions, overlap only (no metrics).
        k: overlap cut-off; metrics are computed at 10 and k.
        seed: seed of the random sessions.
        batch_size: sessions per call.
        empty_mask: run a top-k graph with the (0, C) no-filter mask (:func:`onnx_top_k_scorer`),
            as the predictor does for graphs that take one.

    Returns:
        ``{"k", "num_examples", "source", "top_k_overlap_mean", "top_k_overlap_min",
        "metrics_pytorch", "metrics_onnx", "metric_change"}``: overlap = |onnx top-k ∩ eager
        top-k| / k per session; metric change = onnx - pytorch per metric (absolute).

    Raises:
        ExportValidationError: the mean overlap is below ``variant.min_top_k_overlap`` (1.0 minus
            exact ties for float32).
    """
    from seqrec.metrics import evaluate_scorer

    k = min(k, model.cfg.num_items)
    max_len = model.cfg.max_len
    if examples is None:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, max_len + 1, size=512)
        prefixes: list[np.ndarray] = [
            rng.integers(1, model.cfg.num_items + 1, size=n, dtype=np.int64) for n in lengths
        ]
        next_items = None
        source = "random sessions"
    else:
        prefixes = [np.asarray(p, dtype=np.int64) for p in examples[0]]
        next_items = np.asarray(examples[1], dtype=np.int64)
        source = "validation examples"
    session = ort_session(onnx_path, 1, variant.graph_optimization_level)
    onnx_score = onnx_top_k_scorer(
        session, variant.top_k_in_graph, k, max_len, model.cfg.num_items + 1, empty_mask
    )

    def eager_score(batch: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model.score_last(torch.from_numpy(encode_prefixes(batch, max_len))).numpy()

    overlaps: list[float] = []
    for start in range(0, len(prefixes), batch_size):
        batch = prefixes[start : start + batch_size]
        got, want = onnx_score(batch), eager_score(batch)
        if np.isnan(got).any():
            raise ExportValidationError(f"{variant}: NaN scores in the exported graph")
        for got_top, want_top in zip(_top_k_sets(got, k), _top_k_sets(want, k), strict=True):
            overlaps.append(len(got_top & want_top) / k)
    report: dict[str, Any] = {
        "k": k,
        "num_examples": len(prefixes),
        "source": source,
        "top_k_overlap_mean": float(np.mean(overlaps)) if overlaps else 1.0,
        "top_k_overlap_min": float(np.min(overlaps)) if overlaps else 1.0,
        "metrics_pytorch": None,
        "metrics_onnx": None,
        "metric_change": None,
    }
    if next_items is not None and len(prefixes):
        ks = sorted({min(10, k), k})
        want_metrics = evaluate_scorer(eager_score, prefixes, next_items, batch_size, ks)
        got_metrics = evaluate_scorer(onnx_score, prefixes, next_items, batch_size, ks)
        report["metrics_pytorch"] = want_metrics
        report["metrics_onnx"] = got_metrics
        report["metric_change"] = {
            name: got_metrics[name] - want_metrics[name]
            for name in want_metrics
            if name != "num_examples"
        }
    if report["top_k_overlap_mean"] < variant.min_top_k_overlap:
        raise ExportValidationError(
            f"{variant.precision} variant (top-k in graph: {variant.top_k_in_graph}): mean top-{k} "
            f"overlap with PyTorch {report['top_k_overlap_mean']:.4f} < "
            f"{variant.min_top_k_overlap} on {len(prefixes)} {source}"
        )
    logger.info(
        "variant %s: top-%d overlap mean %.4f min %.4f, metric change %s",
        asdict(variant),
        k,
        report["top_k_overlap_mean"],
        report["top_k_overlap_min"],
        report["metric_change"],
    )
    return report


def _export_validated(
    model: SASRec, onnx_path: Path, opset: int, exporters: Sequence[str] | None = None
) -> tuple[str, dict[str, Any], str | None, float]:
    """Export with the first exporter (of ``exporters``, default all in order) whose graph
    validates.

    Returns:
        (exporter name, validation report, why the dynamo exporter was not used or None,
        seconds spent in the successful export call).

    Raises:
        ExportValidationError: no exporter produced a valid graph.
    """
    max_len = model.cfg.max_len
    dummy = torch.randint(
        1, model.cfg.num_items + 1, (_DUMMY_BATCH, min(_DUMMY_LEN, max_len)), dtype=torch.int64
    )
    errors: dict[str, str] = {}
    # The fastest graph the model allows first; SASRec.score_last itself as the last resort.
    wrappers: list[ScoringModel] = []
    for mode in SCORING_MODES:
        wrapper = ScoringModel(model, mode).eval()
        if wrapper.mode not in [w.mode for w in wrappers]:
            wrappers.append(wrapper)
    for wrapper in wrappers:
        for name in EXPORTER_ORDER:
            export_fn = _EXPORTERS.get(name)
            if export_fn is None or (exporters is not None and name not in exporters):
                continue
            key = name if wrapper is wrappers[0] else f"{name} ({wrapper.mode} graph)"
            onnx_path.unlink(missing_ok=True)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore", message=r".*LeafSpec.*", category=FutureWarning
                    )
                    # the legacy exporter is deprecated as a whole; using it is logged instead
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                    export_fn(wrapper, dummy, onnx_path, opset, max_len)
                export_time_s = time.perf_counter() - start
                validation = validate_onnx(model, onnx_path)
            except Exception as exc:  # any failure moves on to the next exporter
                errors[key] = f"{type(exc).__name__}: {exc}"[:2000]
                logger.warning("%s ONNX export failed: %s", key, errors[key])
                continue
            validation["scoring_graph"] = wrapper.mode
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
