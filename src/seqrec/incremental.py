"""Incremental (key/value-cached) serving graphs for :class:`~seqrec.models.sasrec.SASRec`.

On a product page the widget asks again after every click with the same session plus one item.
A causal transformer's earlier positions do not change when an item is appended, so the serving
export can keep each session's states (:mod:`seqrec.kv_cache`) and compute only the new position:

* **prefill** (``model.onnx`` of an incremental export): ``item_ids`` (B, L) int64 left-padded,
  ``score_mask`` (1 or B, C) float32 (or (0, C): no filter) and ``k`` (1,) int64 ->
  ``top_scores`` (B, k) float32,
  ``top_idx`` (B, k) int64 (best first) and the states of every position, ``present_kv``
  (2 * n_layers, B, H, L, Dh) float32 and, for copy models, ``present_copy_keys`` (B, L, D);
* **step** (``model_step.onnx``): ``item_ids`` (B, P + 1) (the cached P positions, left-padded,
  then the new item), ``past_kv_0`` ... ``past_kv_{2 * n_layers - 1}`` (each (B, H, P, Dh)
  float32: the keys, then the values, of each block, as the rows of ``present_kv``; left-padded
  like ``item_ids``, padded slots are masked; ``seqrec.kv_cache.past_kv_feed``),
  ``past_copy_keys`` (B, P, D) for copy models, the same
  ``score_mask`` and ``k`` -> the same top-k outputs and the new position's ``present_kv``
  (2 * n_layers, B, H, 1, Dh) and ``present_copy_keys`` (B, 1, D).

Both give the numbers of ``SASRec.score_last`` on the whole session (same modules, same masking,
eval mode), which :func:`validate_incremental` checks on several batch shapes before an export is
published. The step graph is the decoding step of autoregressive transformers with a KV cache
(Vaswani et al., 2017; Pope et al., MLSys 2023); the last-position scoring, filters and top-k are
those of the plain export (``seqrec.export``).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqrec.constants import BLOCK_TOP_K_MIN_WIDTH, INT8_SCORE_ATOL, PAD_IDX
from seqrec.kv_cache import (
    PAST_KV_NAME,
    past_kv_feed,
    past_kv_names,
    stack_past,
    states_from_prefill,
)
from seqrec.models.sasrec import SASRec
from seqrec.predictor import onnx_graphs
from seqrec.sequence import encode_prefixes

logger = logging.getLogger(__name__)


class _DropTorchvisionNotice(logging.Filter):
    """Drops the dynamo exporter's "torchvision is not installed. Skipping torchvision::nms"
    notices (four per process): seqrec models use no torchvision operator, so they only alarm
    users reading ``make demo`` or export logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


# the logger of torch.onnx._internal.exporter._registration (torch 2.5+); this import is used by
# both exports (seqrec.export imports this module)
logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_DropTorchvisionNotice())

STEP_FILE = "model_step.onnx"
PAST_COPY_KEYS_NAME = "past_copy_keys"
PRESENT_KV_NAME = "present_kv"
PRESENT_COPY_KEYS_NAME = "present_copy_keys"
_INPUT, _MASK, _K = "item_ids", "score_mask", "k"
_TOP_SCORES, _TOP_IDX = "top_scores", "top_idx"
CATALOG_NAME = "catalog"
"""Initializer of the (D, C-1) catalog matrix in graphs exported for :func:`quantize_catalog`."""
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators (MatMulIntegerToFloat)
ACTIVATION_LEVELS = 63
"""Largest |value| of a hidden state quantised by :func:`quantize_catalog` (7 bits, see there)."""
ACTIVATION_ZERO_POINT = 64
"""uint8 zero point of those hidden states: they are stored in [1, 127]."""


def supports_incremental(model: nn.Module) -> bool:
    """Whether the incremental graphs can be written for ``model`` (a ``SASRec``: they reuse its
    embeddings, blocks and LayerNorms)."""
    return isinstance(model, SASRec)


def _heads(model: SASRec) -> tuple[int, int]:
    heads = model.blocks[0].attn.n_heads
    return heads, model.cfg.d_model // heads


def _feed_forward(block: nn.Module, hidden: Tensor) -> Tensor:
    """``hidden + block.ffn(block.ln_ffn(hidden))`` (Linear, GELU, Linear) with the GELU's erf
    form written in the operand order that onnxruntime's Gelu fusion recognises (x * (1 +
    erf(x / sqrt 2)) * 0.5), so each graph runs one Gelu (or BiasGelu) node per block instead of
    five elementwise ones. Any leading shape: (B, L, D) or (B, D)."""
    ffn = block.ffn
    x = ffn[0](block.ln_ffn(hidden))
    return hidden + ffn[2](x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5)


def _block(block: nn.Module, hidden: Tensor, attn_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-LN block (``seqrec.models.sasrec.Block`` in eval mode) over whole sessions (the
    prefill graph); :func:`_step_block` is the step graph's.

    Args:
        hidden: (B, L, D) float inputs of every position.
        attn_bias: (B, 1, L, L) float additive causal/padding mask.

    Returns:
        (B, L, D) outputs and every position's keys and values, each (B, H, L, Dh).
    """
    batch, length, d_model = hidden.shape
    heads = block.attn.n_heads
    qkv = block.attn.qkv(block.ln_attn(hidden))  # (B, L, 3 * D): q, k, v, each H x Dh
    q, k, v = qkv.view(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    k, v = k.contiguous(), v.contiguous()  # (torch.export cannot stack the strided views)
    scale = (d_model // heads) ** -0.5
    # F.scaled_dot_product_attention written out: the dynamo exporter lowers SDPA with a
    # reshape/transpose chain for the keys that costs a dozen extra nodes per block
    att = (q @ k.transpose(2, 3)) * scale + attn_bias  # (B, H, L, L)
    out = (torch.softmax(att, dim=-1) @ v).transpose(1, 2)  # (B, L, H, Dh)
    hidden = hidden + block.attn.proj(out.reshape(batch, length, d_model))
    return _feed_forward(block, hidden), k, v


def _step_block(
    block: nn.Module, hidden: Tensor, past_bias: Tensor, past_k: Tensor, past_v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-LN block (``seqrec.models.sasrec.Block`` in eval mode) for the one new position
    of the step graph: the arithmetic of :func:`_block` with past keys and values, written on
    (B, D) rows (each ``nn.Linear`` exports as one Gemm) and with fewer reshapes, so that the
    step graph has fewer nodes (onnxruntime spends about 1 us per node on one session's step).

    Args:
        hidden: (B, D) float inputs of the new position.
        past_bias: (B, 1, 1, P) float additive mask over the past positions (the new position
            always attends to itself).
        past_k, past_v: (B, H, P, Dh) float keys / values of the earlier positions.

    Returns:
        (B, D) outputs and the new position's keys and values, each (B, H, 1, Dh).
    """
    batch, d_model = hidden.shape
    heads = block.attn.n_heads
    qkv = block.attn.qkv(block.ln_attn(hidden))  # (B, 3 * D): q, k, v, each H x Dh
    q, k, v = qkv.view(batch, 3 * heads, 1, d_model // heads).split(heads, dim=1)
    scale = (d_model // heads) ** -0.5
    # the new position attends to the past keys and to itself; the past is never copied into a
    # (P + 1)-long tensor (onnxruntime's Concat would copy every cached state)
    # the scale after the Concat: onnxruntime would fold it into the MatMul (FusedMatMul's
    # alpha), which ran the (64, H, 1, P) product at half speed on the AMD VM
    att = torch.cat([q @ past_k.transpose(2, 3) + past_bias, (q * k).sum(-1, keepdim=True)], -1)
    weights = torch.softmax(att * scale, dim=-1)  # (B, H, 1, P + 1)
    out = weights[..., :-1] @ past_v + weights[..., -1:] * v  # (B, H, 1, Dh)
    hidden = hidden + block.attn.proj(out.reshape(batch, d_model))
    return _feed_forward(block, hidden), k, v


def _step_copy_log_probs(
    model: SASRec,
    logits: Tensor,
    last: Tensor,
    past_keys: Tensor,
    new_key: Tensor,
    item_ids: Tensor,
    past_bias: Tensor,
) -> tuple[Tensor, Tensor]:
    """``SASRec.copy_log_probs_from_keys(..., split_gate=True, new_key=new_key)`` for the step
    graph: the same numbers (up to float rounding) from about 20 fewer ONNX nodes, which
    onnxruntime dispatches one by one (about 1 us each for one session on the AMD VM).

    - the pointer mask is the attention's padding bias (``past_bias``), added before the new
      position's logit is appended (instead of a mask built from ``Range``/``Equal``/``Or``);
    - the 1 / sqrt(D) scale sits in the query's weights (onnxruntime folds the constant
      product);
    - log-add-exp and log-sigmoid are written with softplus (a + softplus(b - a) and
      -softplus(-x); 3 and 5 nodes instead of 8 and 10; onnxruntime's ``Softplus`` is finite
      for any finite input);
    - padded positions need no ``Where``: their pointer mass is exactly 0 (their softmax weight
      underflows to 0), so they write log_gen's own value into column 0, which the scatter's
      max reduction leaves unchanged (a session item's mixed value is never below its
      log_gen, so the max keeps it).

    Args:
        logits: (B, C-1) float generator logits of the real items.
        last: (B, D) float final state of the new position.
        past_keys: (B, P, D) float cached pointer keys; new_key: (B, 1, D) the new position's.
        item_ids: (B, P + 1) int64: the cached positions' items (PAD_IDX where padded), the
            new (real) item last.
        past_bias: (B, P, 1) float 0 at real past positions, a large negative value at padded
            ones (the step graph's attention mask).

    Returns:
        ``(log p - log(gate), log(gate))``: (B, C-1) and (B, 1) float, as ``split_gate``.
    """
    cfg = model.cfg
    scale = cfg.d_model**-0.5
    query = F.linear(last, model.copy_query.weight * scale, model.copy_query.bias * scale)
    query = query.unsqueeze(-1)  # (B, D, 1), scaled
    att = torch.cat([past_keys @ query + past_bias, new_key @ query], dim=1).squeeze(-1)
    if cfg.copy_recency:  # (B, P + 1) + (1, P + 1)
        length = item_ids.shape[1]
        att = att + model.copy_recency_bias(torch.arange(length)[-1:], length)
    alpha = torch.softmax(att, dim=-1)  # (B, P + 1): exactly 0 at padded positions
    # pointer mass of each position's item, summed over its repeats: (B, P + 1), 0 at padding
    same = (item_ids.unsqueeze(2) == item_ids.unsqueeze(1)).to(alpha.dtype)  # (B, L, L)
    mass = (same @ alpha.unsqueeze(-1)).squeeze(-1)
    log_gen = torch.log_softmax(logits, dim=-1)  # (B, C-1)
    col = (item_ids - (PAD_IDX + 1)).clamp(min=0)  # (B, P + 1); padding: column 0
    gen = log_gen.gather(1, col)
    gate_logit = model.copy_gate(last)  # (B, 1)
    # log(1 - gate) - log(gate) = -x for the gate logit x; logaddexp(a, b) = a + softplus(b - a)
    mixed = gen + F.softplus(torch.log(mass) - gate_logit - gen)  # >= gen; == gen at padding
    ranked = log_gen.scatter_reduce(1, col, mixed, "amax", include_self=True)
    return ranked, -F.softplus(-gate_logit)  # log(sigmoid(x))


def _top_k(
    model: SASRec,
    last: Tensor,
    keys: Tensor | None,
    item_ids: Tensor,
    score_mask: Tensor,
    k: Tensor,
    catalog: Tensor | None = None,
    new_key: Tensor | None = None,
    past_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The best k real items for the last state ``last`` (B, D): ``score_last``'s scores plus the
    mask, top-k. For copy models (``keys`` (B, L, D)) the constant log(gate) of each row is added
    to the k values only (see ``SASRec.copy_log_probs_from_keys``). ``catalog``: the (D, C-1)
    transposed real-item rows of the table as a graph constant of its own (``CATALOG_NAME``, for
    :func:`quantize_catalog`); None reads them from the embedding table. ``new_key`` (B, 1, D):
    the last position's pointer key when ``keys`` holds only the cached ones (step graph, with
    its (B, P, 1) padding bias ``past_bias``: :func:`_step_copy_log_probs`)."""
    if catalog is None:
        catalog = model.item_emb.weight[PAD_IDX + 1 :].t()
    logits = last @ catalog  # (B, C-1)
    shift = None
    if keys is not None and new_key is not None:  # the step graph
        assert past_bias is not None
        logits, shift = _step_copy_log_probs(
            model, logits, last, keys, new_key, item_ids, past_bias
        )  # (B, C-1), (B, 1)
    elif keys is not None:
        logits, shift = model.copy_log_probs_from_keys(
            logits, last, keys, item_ids, split_gate=True
        )  # (B, C-1), (B, 1)
    count = k[0].item()
    torch._check(count >= 1)
    torch._check(count <= logits.shape[1])
    top_scores, top = torch.topk(logits + score_mask[:, PAD_IDX + 1 :], count, dim=1)
    if shift is not None:
        top_scores = top_scores + shift
    return top_scores, top + (PAD_IDX + 1)  # (B, k) float, (B, k) int64 item indices


class _IncrementalGraph(nn.Module):
    """Holds the wrapped model; refuses models without the standard SASRec blocks.

    With ``catalog_constant`` the catalog product reads a (D, C-1) copy of the real items' rows,
    exported as the initializer ``CATALOG_NAME`` that :func:`quantize_catalog` replaces."""

    def __init__(self, model: SASRec, catalog_constant: bool = False) -> None:
        super().__init__()
        if not supports_incremental(model):
            raise ValueError("incremental graphs need seqrec.models.sasrec.SASRec blocks")
        self.model = model
        table = None
        if catalog_constant:
            table = model.item_emb.weight.detach()[PAD_IDX + 1 :].t().contiguous()  # (D, C-1)
        self.catalog: Tensor | None
        self.register_buffer(CATALOG_NAME, table)


class PrefillModel(_IncrementalGraph):
    """Whole sessions in, top-k and every position's states out (see the module docstring)."""

    def forward(self, item_ids: Tensor, score_mask: Tensor, k: Tensor) -> tuple[Tensor, ...]:
        """Args:
            item_ids: (B, L) int64 left-padded with PAD_IDX; the last column is a real item.
            score_mask: (1 or B, C) float32, 0 keeps an item, -inf excludes it.
            k: (1,) int64 number of items, 1 <= k <= C - 1.

        Returns:
            ``top_scores`` (B, k) float32, ``top_idx`` (B, k) int64, ``present_kv``
            (2 * n_layers, B, H, L, Dh) float32 [, ``present_copy_keys`` (B, L, D) float32].
        """
        model, cfg = self.model, self.model.cfg
        is_real = item_ids != PAD_IDX  # (B, L)
        positions = (torch.cumsum(is_real.to(torch.int64), dim=1) - 1).clamp(min=0)  # (B, L)
        hidden = model.item_emb(item_ids) * (cfg.d_model**0.5) + model.pos_emb(positions)
        hidden = hidden * is_real.unsqueeze(-1).to(hidden.dtype)  # (B, L, D)
        is_allowed = SASRec.attention_mask(item_ids)  # (B, L, L)
        attn_bias = torch.zeros(is_allowed.shape, dtype=hidden.dtype)
        attn_bias = attn_bias.masked_fill(~is_allowed, torch.finfo(hidden.dtype).min).unsqueeze(1)
        kv: list[Tensor] = []
        for block in model.blocks:
            hidden, k_new, v_new = _block(block, hidden, attn_bias)
            kv += [k_new, v_new]
        states = model.ln_out(hidden) * is_real.unsqueeze(-1).to(hidden.dtype)  # (B, L, D)
        last = states[:, -1]  # (B, D)
        copy_keys = model.copy_key(states) if cfg.copy_mechanism else None  # (B, L, D)
        top_scores, top_idx = _top_k(model, last, copy_keys, item_ids, score_mask, k, self.catalog)
        outputs = [] if copy_keys is None else [copy_keys]
        return (top_scores, top_idx, torch.cat([t.unsqueeze(0) for t in kv]), *outputs)


class StepModel(_IncrementalGraph):
    """One new item per session on top of cached states (see the module docstring)."""

    def forward(
        self,
        item_ids: Tensor,
        past_kv: tuple[Tensor, ...],
        past_copy_keys: Tensor,
        score_mask: Tensor,
        k: Tensor,
    ) -> tuple[Tensor, ...]:
        """Args:
            item_ids: (B, P + 1) int64: the cached positions' items (left-padded with PAD_IDX)
                and the new item last: a real item, never PAD_IDX (the graph does not mask
                it, so a PAD there would not score as ``SASRec.score_last``; the predictor
                only sends known items).
            past_kv: 2 * n_layers tensors (B, H, P, Dh) float32: each block's cached keys, then
                values (exported as the inputs ``past_kv_0``, ``past_kv_1``, ...), aligned with
                ``item_ids[:, :-1]``; slots of PAD items are ignored.
            past_copy_keys: (B, P, D) float32 cached pointer keys (copy models; ignored
                otherwise, see :class:`StepModelNoCopy`).
            score_mask: (1 or B, C) float32 and k: (1,) int64 as in :class:`PrefillModel`.

        Returns:
            ``top_scores`` (B, k), ``top_idx`` (B, k), ``present_kv`` (2 * n_layers, B, H, 1, Dh)
            [, ``present_copy_keys`` (B, 1, D) for copy models].
        """
        model, cfg = self.model, self.model.cfg
        # is_real is written as copy_log_probs_from_keys writes it, on the whole item_ids, so
        # that onnxruntime's common-subexpression pass computes it once
        is_real = item_ids != PAD_IDX  # (B, P + 1)
        is_real_past = is_real[:, :-1]  # (B, P)
        position = is_real_past.to(torch.int64).sum(1)  # (B,)
        # the new item is a real item (the predictor never sends PAD last), so its embedding is
        # not multiplied by is_real as the prefill graph's padded positions are
        hidden = model.item_emb(item_ids[:, -1]) * (cfg.d_model**0.5) + model.pos_emb(position)
        past_bias = torch.where(is_real_past, 0.0, torch.finfo(hidden.dtype).min)  # (B, P)
        attn_bias = past_bias[:, None, None, :]  # (B, 1, 1, P) float32
        kv: list[Tensor] = []
        for layer, block in enumerate(model.blocks):
            hidden, k_new, v_new = _step_block(
                block, hidden, attn_bias, past_kv[2 * layer], past_kv[2 * layer + 1]
            )
            kv += [k_new, v_new]
        last = model.ln_out(hidden)  # (B, D)
        new_key = model.copy_key(last).unsqueeze(1) if cfg.copy_mechanism else None  # (B, 1, D)
        top_scores, top_idx = _top_k(
            model,
            last,
            None if new_key is None else past_copy_keys,  # (B, P, D), plus new_key
            item_ids,
            score_mask,
            k,
            self.catalog,
            new_key,
            past_bias[:, :, None],  # (B, P, 1)
        )
        outputs = [] if new_key is None else [new_key]
        batch, heads, _, head_dim = kv[0].shape
        present = torch.cat(kv).view(len(kv), batch, heads, 1, head_dim)
        return (top_scores, top_idx, present, *outputs)


class StepModelNoCopy(StepModel):
    """:class:`StepModel` without the ``past_copy_keys`` input (models without copy mechanism)."""

    def forward(  # type: ignore[override]
        self, item_ids: Tensor, past_kv: tuple[Tensor, ...], score_mask: Tensor, k: Tensor
    ) -> tuple[Tensor, ...]:
        """See :class:`StepModel`; returns ``top_scores``, ``top_idx`` and ``present_kv``."""
        return super().forward(item_ids, past_kv, past_kv[0], score_mask, k)


def int8_columns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantisation with one scale per column, as :func:`quantize_catalog`
    stores the catalog.

    Args:
        weights: (D, N) float32.

    Returns:
        ``(quantized, scale)``: (D, N) int8 ``round(weights / scale)`` in [-127, 127] and (N,)
        float32 ``scale = max|weights[:, j]| / 127`` (1 for an all-zero column, which stays 0).
    """
    scale = (np.abs(weights).max(axis=0) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.rint(weights / scale), -127, 127).astype(np.int8), scale


def _if_branch(name: str, nodes: list[Any], outputs: dict[str, int]) -> Any:
    """An ``If`` branch: a subgraph named ``name`` of ``nodes`` (each named after its first
    output) with ``outputs`` (value name -> ONNX element type, shapes left to inference)."""
    from onnx import helper

    for node in nodes:
        node.name = node.output[0]
    values = [helper.make_tensor_value_info(out, kind, None) for out, kind in outputs.items()]
    return helper.make_graph(nodes, name, [], values)


def quantize_catalog(path: Path) -> dict[str, Any]:
    """Rewrite the catalog product of a graph exported with ``catalog_constant`` in int8.

    The (B, D) x (D, C-1) product of the last hidden states with the item table is what one
    request streams from memory; this makes it read a quarter of the bytes. The table gets one
    symmetric int8 scale per item (column), ``W ~ Wq * col_scale`` with ``col_scale = max|W[:, j]|
    / 127``; each hidden state row is quantised when the graph runs with its own symmetric scale
    ``s = max|h| / 63`` (7 bits: values in [-63, 63]), stored as uint8 with zero point 64 so that
    onnxruntime runs its fast u8 x s8 integer kernel: ``scores ~ MatMulInteger(round(h / s) + 64,
    Wq, 64) * s * col_scale``. The 7-bit activations keep every uint8 input at most 127: x86
    kernels without VNNI (AVX2's ``vpmaddubsw``) add two u8 x s8 products in a saturating int16,
    which 2 * 127 * 127 never exceeds but 2 * 255 * 127 does (with 8-bit activations an AMD EPYC
    AVX2 machine got 6.8% of the scores of a random 128 x 3,000 product wrong, by up to 13, a
    fifth of the largest score; onnxruntime documents the same issue for ``quantize_dynamic``
    and its ``reduce_range``). Per-row (not per-batch) scales keep a session's scores
    independent of the other sessions in its batch. The product runs as ``MatMulInteger`` +
    ``Cast`` + ``Mul(col_scale)`` + ``Mul(s)`` for one session and as onnxruntime's fused
    contrib operator ``MatMulIntegerToFloat`` (``com.microsoft``, the same numbers) for
    batches, chosen by an ``If`` on B: the fused operator saves the ``Cast`` and ``Mul``
    passes over the (B, C-1) product (measured on a 37k catalog when it replaced them: 2.7 ->
    2.0 ms at batch 64) and is slower for one row (0.29 -> 0.38 ms). It gets the (B, 1) row
    scales as its ``a_scale``, which it multiplies into its own output in place
    (``ScaleOutput`` in onnxruntime's ``dynamic_quantize_matmul.cc``) instead of a separate
    ``Mul`` writing another (B, C-1) tensor: the same numbers, and the whole int8 step graph of
    a 37k-item copy model took 10.3 instead of 10.8 ms at batch 64 (AMD VM, interleaved, two
    runs).
    Everything else in the graph stays float32. This is post-training dynamic quantisation
    (Jacob et al., CVPR 2018; ONNX ``MatMulInteger``) of one matrix product.

    Args:
        path: an ONNX file whose ``MatMul`` reads the (D, C-1) float32 initializer
            ``CATALOG_NAME``; rewritten in place.

    Returns:
        ``{"catalog_shape": [D, C-1], "max_abs_weight_error": float}`` (largest |W - Wq *
        col_scale|, half a quantisation step at most).

    Raises:
        ValueError: the graph has no such initializer or it does not feed exactly one MatMul.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    init = next((t for t in graph.initializer if t.name == CATALOG_NAME), None)
    users = [n for n in graph.node if CATALOG_NAME in n.input]
    if init is None or len(users) != 1 or users[0].op_type != "MatMul":
        raise ValueError(
            f"{path}: expected the initializer {CATALOG_NAME!r} feeding one MatMul, found "
            f"{'no initializer' if init is None else [n.op_type for n in users]}"
        )
    weights = numpy_helper.to_array(init).astype(np.float32)  # (D, C-1)
    quantized, col_scale = int8_columns(weights)
    error = float(np.abs(weights - quantized * col_scale).max())
    node = users[0]
    hidden, out = node.input[0], node.output[0]
    p = "seqrec_catalog_"  # prefix of every name added here
    graph.initializer.remove(init)
    graph.initializer.extend(
        [
            numpy_helper.from_array(quantized, p + "int8"),
            numpy_helper.from_array(col_scale.astype(np.float32), p + "col_scale"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), p + "axis"),
            numpy_helper.from_array(np.array(1e-30, dtype=np.float32), p + "tiny"),
            numpy_helper.from_array(
                np.array(1.0 / ACTIVATION_LEVELS, np.float32), p + "inv_levels"
            ),
            numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.float32), p + "offset"),
            numpy_helper.from_array(np.array(ACTIVATION_ZERO_POINT, np.uint8), p + "zero_point"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), p + "one"),
        ]
    )
    # one session (B = 1): MatMulInteger, Cast and the column and row Muls; batches: the fused
    # MatMulIntegerToFloat (same numbers; measured slower for one row, faster for 64 rows)
    single = _if_branch(
        p + "one_row",
        [
            helper.make_node(
                "MatMulInteger", [p + "uint8", p + "int8", p + "zero_point"], [p + "int32"]
            ),  # (1, C-1) int32
            helper.make_node("Cast", [p + "int32"], [p + "float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "float", p + "col_scale"], [p + "col_scaled_1"]),
            helper.make_node("Mul", [p + "col_scaled_1", p + "row_scale"], [p + "scaled_1"]),
        ],
        {p + "scaled_1": TensorProto.FLOAT},
    )
    batch = _if_branch(
        p + "rows",
        [
            helper.make_node(
                "MatMulIntegerToFloat",
                [p + "uint8", p + "int8", p + "row_scale", p + "col_scale", p + "zero_point"],
                [p + "scaled_b"],
                domain=MS_DOMAIN,
            )  # (B, C-1) float32: the int32 product times col_scale, then times row_scale
        ],
        {p + "scaled_b": TensorProto.FLOAT},
    )
    new_nodes = [
        helper.make_node("Abs", [hidden], [p + "abs"]),
        helper.make_node("ReduceMax", [p + "abs", p + "axis"], [p + "max"], keepdims=1),
        helper.make_node("Max", [p + "max", p + "tiny"], [p + "max_pos"]),  # all-zero rows
        helper.make_node("Mul", [p + "max_pos", p + "inv_levels"], [p + "row_scale"]),  # (B, 1)
        helper.make_node("Div", [hidden, p + "row_scale"], [p + "ratio"]),  # in [-63, 63]
        helper.make_node("Round", [p + "ratio"], [p + "rounded"]),
        helper.make_node("Add", [p + "rounded", p + "offset"], [p + "shifted"]),  # [1, 127]
        helper.make_node("Cast", [p + "shifted"], [p + "uint8"], to=TensorProto.UINT8),
        helper.make_node("Shape", [p + "uint8"], [p + "batch"], start=0, end=1),  # (1,) B
        helper.make_node("Equal", [p + "batch", p + "one"], [p + "is_single"]),
        helper.make_node(
            "If", [p + "is_single"], [out], then_branch=single, else_branch=batch
        ),  # (B, C-1) float32
    ]
    for n in new_nodes:
        n.name = n.output[0]
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, n in enumerate(new_nodes):
        graph.node.insert(position + offset, n)
    if all(o.domain != MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"catalog_shape": list(weights.shape), "max_abs_weight_error": error}


def skip_empty_score_mask(path: Path) -> bool:
    """Let a top-k graph skip its score mask when the mask has no rows.

    Most requests have no filter, yet ``Add(scores, score_mask[:, 1:])`` before ``TopK`` is one
    more pass over the (B, C-1) scores (0.7 ms of about 8 at batch 64 on a 37k catalog). This
    rewrites ``TopK(Add(scores, Slice(score_mask)), k)`` as an ``If`` on the number of mask rows:
    a (0, C) ``score_mask`` runs ``TopK(scores, k)``, any other the graph as before (same outputs,
    same numbers). Only the pattern whose mask is sliced to the real items is rewritten: there
    the PAD column is never scored, so no mask still excludes it.

    Args:
        path: an ONNX file with one ``TopK`` (prefill, step or plain top-k graph); rewritten in
            place when the pattern is found.

    Returns:
        True when the graph was rewritten (record it: the predictor sends a (0, C) mask only to
        graphs that accept one), False when the pattern is not there (the file is unchanged).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    producers = {out: n for n in graph.node for out in n.output}
    tops = [n for n in graph.node if n.op_type == "TopK"]
    add = producers.get(tops[0].input[0]) if len(tops) == 1 else None
    if add is None or add.op_type != "Add":
        return False
    sliced = [producers.get(name) for name in add.input]
    mask_side = [
        i
        for i, n in enumerate(sliced)
        if n is not None and n.op_type == "Slice" and n.input[0] == _MASK
    ]
    if len(mask_side) != 1:
        return False
    top = tops[0]
    scores = add.input[1 - mask_side[0]]  # (B, C-1); the other input is score_mask[:, 1:]
    p = "seqrec_mask_"  # prefix of every name added here

    def top_k(source: str, branch: str) -> list[Any]:
        """The TopK of ``source`` as ``top`` computes it, with its outputs named for ``branch``."""
        node = helper.make_node(
            "TopK", [source, top.input[1]], [p + "values_" + branch, p + "indices_" + branch]
        )
        node.attribute.extend(top.attribute)
        return [node]

    def outputs(branch: str) -> dict[str, int]:
        return {
            p + "values_" + branch: TensorProto.FLOAT,
            p + "indices_" + branch: TensorProto.INT64,
        }

    unmasked = _if_branch(p + "none", top_k(scores, "0"), outputs("0"))
    masked = _if_branch(
        p + "rows",
        [helper.make_node("Add", list(add.input), [p + "masked"]), *top_k(p + "masked", "1")],
        outputs("1"),
    )
    graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), p + "zero"))
    new_nodes = [
        helper.make_node("Shape", [_MASK], [p + "rows"], start=0, end=1),  # (1,) mask rows
        helper.make_node("Equal", [p + "rows", p + "zero"], [p + "is_empty"]),
        helper.make_node(
            "If", [p + "is_empty"], list(top.output), then_branch=unmasked, else_branch=masked
        ),
    ]
    for n in new_nodes:
        n.name = n.output[0] if n.op_type != "If" else p + "if"
    position = list(graph.node).index(top)  # after everything the Add and TopK read
    graph.node.remove(top)
    for offset, n in enumerate(new_nodes):
        graph.node.insert(position + offset, n)
    graph.node.remove(add)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return True


def top_k_block_size(width: int, min_width: int = BLOCK_TOP_K_MIN_WIDTH) -> int | None:
    """The block size :func:`block_top_k` uses for scores of ``width`` columns: the divisor m
    of ``width`` nearest (in ratio) to ``sqrt(width / 20)``, which balances the block maxima's
    top-k (``width / m`` values) against the candidates' (``k * m`` values at k = 20), among
    those within a factor of 3 of it (``sqrt(width / 20) / 3 <= m <= 3 * sqrt(width / 20)``);
    None when there is none (blocks need an exact reshape) or ``width`` is below
    ``min_width``."""
    if width < min_width:
        return None
    target = float(np.sqrt(width / 20))
    divisors = [
        m
        for m in range(max(2, math.ceil(target / 3)), math.floor(3 * target) + 1)
        if width % m == 0 and width // m >= 2
    ]
    return min(divisors, key=lambda m: abs(np.log(m / target))) if divisors else None


def block_top_k(path: Path, width: int, block: int | None = None) -> int | None:
    """Rewrite every ``TopK`` of a graph (its ``If`` branches included) over (B, ``width``)
    scores as an exact two-stage top-k over blocks of m consecutive items.

    onnxruntime's ``TopK`` compares every score with a heap of k (2.7 of about 9 ms in the
    int8 step graph at batch 64 on a 37k catalog). The rewrite reshapes the scores to
    (B, width / m, m) (no copy), takes each block's maximum (``ReduceMax``, one vectorised pass),
    the k blocks with the highest maxima (at most width / m of them), and the top-k of those
    blocks' k * m scores, gathered in ascending item order. It is exact, ties included: an item
    of the true top-k has fewer than k items ahead of it (a higher score, or the same score and
    a lower index), and every block ranked ahead of its own block holds one of them (its
    maximum), so its block is among the k chosen; the candidates keep item order, so ``TopK``'s
    tie rule (lower index first) picks the same items. Scores, indices and their order are
    those of the plain ``TopK`` (tested against it, ties, -inf and empty batches included) for
    scores without NaN. A NaN score is another matter: ``TopK`` ranks it first, but
    onnxruntime's ``ReduceMax`` may drop it from its block's maximum, so the top-k may come out
    finite (and without the item). Only damaged weights produce NaN scores in seqrec's graphs,
    and the predictor refuses an export with non-finite weights at load when its
    ``top_k_block_size`` is set (``SessionRecommender.from_dir``). This is the exact
    form of the bucketed top-k of Chern et al., "TPU-KNN: K Nearest Neighbor Search at Peak
    FLOP/s" (NeurIPS 2022), which keeps only each bucket's maximum and is approximate.

    Args:
        path: an ONNX file whose ``TopK`` nodes take (B, ``width``) float scores
            on their last axis, largest first, sorted (the export's top-k graphs); rewritten in
            place when a block size is found.
        width: number of score columns (C - 1 real items, or C where the scores keep the PAD
            column).
        block: the block size, a divisor of ``width`` below it; None: :func:`top_k_block_size`.

    Returns:
        The block size m (record it), or None when :func:`top_k_block_size` finds none, the
        graph has no ``TopK``, a ``TopK`` that is not of that kind, an opset below 13, or was
        rewritten already; then the file is unchanged.

    Raises:
        ValueError: ``block`` does not divide ``width`` into two blocks or more.
    """
    import onnx
    from onnx import helper, numpy_helper

    if block is None:
        block = top_k_block_size(width)
        if block is None:
            return None
    elif block < 1 or width % block or width // block < 2:
        raise ValueError(f"block {block} does not divide {width} columns into 2 blocks or more")
    proto = onnx.load(str(path))

    def plain(node: Any) -> bool:
        """A TopK over the last axis of 2-D scores, largest first and sorted."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return (
            attrs.get("axis", -1) in (-1, 1)
            and attrs.get("largest", 1) == 1
            and (attrs.get("sorted", 1) == 1)
        )

    p = "seqrec_blocks_"  # prefix of every name added here
    every = [(g, n) for g in onnx_graphs(proto.graph) for n in g.node]
    tops = [(g, n) for g, n in every if n.op_type == "TopK"]
    opset = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    if (
        not tops
        or not all(plain(n) for _, n in tops)
        or opset < 13  # Unsqueeze takes its axes as an input from opset 13
        or any(n.name.startswith(p) for _, n in every)  # rewritten already
    ):
        return None
    num_blocks = width // block
    constants = {
        "shape3": np.array([0, num_blocks, block], dtype=np.int64),  # 0: keep B
        "zero": np.array([0], dtype=np.int64),
        "num_blocks": np.array([num_blocks], dtype=np.int64),
        "block": np.array(block, dtype=np.int64),
        "one": np.array([1], dtype=np.int64),
        "block1": np.array([block], dtype=np.int64),
        "axis2": np.array([2], dtype=np.int64),
    }
    proto.graph.initializer.extend(
        numpy_helper.from_array(value, p + name) for name, value in constants.items()
    )
    for i, (graph, top) in enumerate(tops):
        scores, k = top.input[0], top.input[1]
        values, indices = top.output[0], top.output[1]
        q = f"{p}{i}_"  # this TopK's values

        def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
            return helper.make_node(op, inputs, [output], name=output, **attrs)

        reduce_max = (  # (B, nb): each block's highest score
            node("ReduceMax", [q + "blocks", p + "axis2"], q + "block_max", keepdims=0)
            if opset >= 18  # axes became an input in opset 18
            else node("ReduceMax", [q + "blocks"], q + "block_max", keepdims=0, axes=[2])
        )
        new_nodes = [
            node("Reshape", [scores, p + "shape3"], q + "blocks"),  # (B, nb, m)
            reduce_max,
            node("Min", [k, p + "num_blocks"], q + "kb"),  # (1,): at most nb blocks
            helper.make_node(
                "TopK",
                [q + "block_max", q + "kb"],
                [q + "best_max", q + "best"],
                name=q + "best",
            ),  # (B, kb) block ids, highest maximum first
            helper.make_node(
                "TopK",
                [q + "best", q + "kb"],
                [q + "chosen", q + "chosen_pos"],
                name=q + "chosen",
                largest=0,
            ),  # (B, kb) the same ids in ascending (item) order
            node("Unsqueeze", [q + "chosen", p + "axis2"], q + "chosen3"),  # (B, kb, 1)
            node("Concat", [p + "one", q + "kb", p + "block1"], q + "expand", axis=0),
            node("Expand", [q + "chosen3", q + "expand"], q + "gather_idx"),  # (B, kb, m)
            node("GatherElements", [q + "blocks", q + "gather_idx"], q + "cand3", axis=1),
            node("Mul", [q + "kb", p + "block1"], q + "kbm"),  # (1,) kb * m
            # (B, kb * m); 0 keeps B, and an explicit width (not -1) also reshapes B = 0
            node("Concat", [p + "zero", q + "kbm"], q + "cand_shape", axis=0),
            node("Reshape", [q + "cand3", q + "cand_shape"], q + "cand"),
            helper.make_node(
                "TopK", [q + "cand", k], [values, q + "pos"], name=q + "top"
            ),  # (B, k) values and candidate positions
            node("Div", [q + "pos", p + "block"], q + "slot"),  # which chosen block
            node("Mod", [q + "pos", p + "block"], q + "offset"),  # where in it
            node("GatherElements", [q + "chosen", q + "slot"], q + "top_block", axis=1),
            node("Mul", [q + "top_block", p + "block"], q + "start"),
            node("Add", [q + "start", q + "offset"], indices),
        ]
        position = list(graph.node).index(top)
        graph.node.remove(top)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(position + offset, new)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return block


def graph_names(copy_mechanism: bool, n_layers: int) -> dict[str, list[str]]:
    """Input and output names of both graphs (see the module docstring)."""
    copy_in = [PAST_COPY_KEYS_NAME] if copy_mechanism else []
    copy_out = [PRESENT_COPY_KEYS_NAME] if copy_mechanism else []
    outputs = [_TOP_SCORES, _TOP_IDX, PRESENT_KV_NAME, *copy_out]
    return {
        "prefill_inputs": [_INPUT, _MASK, _K],
        "step_inputs": [_INPUT, *past_kv_names(2 * n_layers), *copy_in, _MASK, _K],
        "outputs": outputs,
    }


def export_incremental(
    model: SASRec,
    prefill_path: Path,
    step_path: Path,
    opset: int = 18,
    int8_catalog: bool = False,
) -> dict[str, Any]:
    """Write the prefill and step graphs with the dynamo exporter and validate them.

    Args:
        model: the trained model (CPU, eval mode).
        prefill_path, step_path: output files.
        opset: ONNX opset (>= 18).
        int8_catalog: after validating the float32 graphs against eager PyTorch, rewrite their
            catalog product in int8 (:func:`quantize_catalog`) and check that the step graph
            still agrees with the prefill graph (scores within ``INT8_SCORE_ATOL``; the states
            are float32 and must still match within 1e-4).

    Both graphs are written so that a (0, C) ``score_mask`` means no filter
    (:func:`skip_empty_score_mask`), and their top-k runs over blocks of items where the
    catalog size allows (:func:`block_top_k`).

    Returns:
        The :func:`validate_incremental` report plus ``names`` (:func:`graph_names`) and
        ``top_k_block_size`` (:func:`block_top_k`'s block size, or None); with
        ``int8_catalog`` also ``int8_catalog``: the second validation and the
        :func:`quantize_catalog` report.

    Raises:
        ValueError: the model is not a ``SASRec`` with the standard blocks, its ``max_len`` is
            below 3, or an exported graph lacks the mask ``Add`` before its ``TopK``.
        seqrec.export.ExportValidationError: a graph differs from ``SASRec.score_last``.
    """
    cfg = model.cfg
    if cfg.max_len < 3:  # torch.export cannot trace a past axis of 1 to max_len - 1 = 1 positions
        raise ValueError(
            f"incremental serving needs max_len >= 3, got max_len={cfg.max_len}; "
            "export with variant.incremental=false variant.precision=fp32 (or fp16, int8: "
            "int8_catalog is for incremental exports only)"
        )
    heads, head_dim = _heads(model)
    names = graph_names(cfg.copy_mechanism, cfg.n_layers)
    num_columns = cfg.num_items + 1
    rng = torch.Generator().manual_seed(0)
    batch, past_len = 2, min(6, cfg.max_len - 1)
    batch_dim = torch.export.Dim("batch")
    # one mask row per session at export (torch.export would freeze a size-1 axis); onnxruntime
    # broadcasts a (1, C) mask at run time (ONNX Add); a (0, C) mask skips it (no filter)
    mask = torch.zeros(batch, num_columns)
    k = torch.tensor([min(5, cfg.num_items)], dtype=torch.int64)
    seq = torch.randint(1, cfg.num_items + 1, (batch, past_len + 1), generator=rng)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*axis name.*", category=UserWarning)
        seq_dim = torch.export.Dim("seq_len", min=1, max=cfg.max_len)
        torch.onnx.export(
            PrefillModel(model, catalog_constant=int8_catalog).eval(),
            (seq, mask, k),
            str(prefill_path),
            dynamo=True,
            opset_version=opset,
            input_names=names["prefill_inputs"],
            output_names=names["outputs"],
            dynamic_shapes={_INPUT: {0: batch_dim, 1: seq_dim}, _MASK: {0: batch_dim}, _K: None},
            external_data=False,
            verbose=False,
        )
        past_dim = torch.export.Dim("past_len", min=1, max=cfg.max_len - 1)
        past_kv = torch.randn(2 * cfg.n_layers, batch, heads, past_len, head_dim, generator=rng)
        inputs: list[Any] = [seq, tuple(past_kv.unbind(0))]
        shapes: dict[str, Any] = {
            _INPUT: {0: batch_dim, 1: past_dim + 1},
            PAST_KV_NAME: tuple({0: batch_dim, 2: past_dim} for _ in range(2 * cfg.n_layers)),
        }
        copy_inputs = [PAST_COPY_KEYS_NAME] if cfg.copy_mechanism else []
        if cfg.copy_mechanism:
            inputs.append(torch.randn(batch, past_len, cfg.d_model, generator=rng))
            shapes[PAST_COPY_KEYS_NAME] = {0: batch_dim, 1: past_dim}
        shapes.update({_MASK: {0: batch_dim}, _K: None})
        step_model = StepModel if cfg.copy_mechanism else StepModelNoCopy
        torch.onnx.export(
            step_model(model, catalog_constant=int8_catalog).eval(),
            (*inputs, mask, k),
            str(step_path),
            dynamo=True,
            opset_version=opset,
            input_names=names["step_inputs"],
            output_names=names["outputs"],
            dynamic_shapes=tuple(
                shapes[name] for name in [_INPUT, PAST_KV_NAME, *copy_inputs, _MASK, _K]
            ),
            external_data=False,
            verbose=False,
        )
    skips = [skip_empty_score_mask(path) for path in (prefill_path, step_path)]
    if not all(skips):
        raise ValueError(
            f"the score mask Add before TopK was not found in {prefill_path} / {step_path} "
            f"(rewritten: {skips}); seqrec.incremental._top_k writes it"
        )
    blocks = [block_top_k(path, cfg.num_items) for path in (prefill_path, step_path)]
    if blocks[0] != blocks[1]:  # both top-k read (B, C-1) scores: rewritten alike or not at all
        raise ValueError(f"block_top_k rewrote {prefill_path} / {step_path} differently: {blocks}")
    report = validate_incremental(model, prefill_path, step_path)
    report["top_k_block_size"] = blocks[0]
    if int8_catalog:
        quantized = quantize_catalog(prefill_path)
        quantize_catalog(step_path)
        report["int8_catalog"] = {
            **quantized,
            "validation": validate_incremental(
                model, prefill_path, step_path, reference="prefill", score_atol=INT8_SCORE_ATOL
            ),
        }
    report["names"] = names
    return report


def _sessions(model: SASRec, rng: np.random.Generator) -> list[list[list[int]]]:
    """Batches of sessions (item indices, oldest first) that cover the serving cases: lengths 1,
    2, max_len // 2 and max_len mixed in one batch, a repeated item, shapes (1, 1), (1, L),
    (3, 7) and (64, L)."""
    num_items, max_len = model.cfg.num_items, model.cfg.max_len

    def items(count: int) -> list[int]:
        return rng.integers(1, num_items + 1, size=count).tolist()

    mixed = [items(n) for n in [1, 2, max(2, max_len // 2), max_len]]
    repeat = items(min(6, max_len))
    repeat[-1] = repeat[0]
    batches = [mixed + [repeat], [items(1)], [items(max_len)], [items(min(7, max_len))] * 3]
    batches.append([items(int(n)) for n in rng.integers(1, max_len + 1, size=64)])
    return batches


def validate_incremental(
    model: SASRec,
    prefill_path: Path,
    step_path: Path,
    atol: float = 1e-4,
    k: int = 10,
    reference: str = "eager",
    score_atol: float | None = None,
) -> dict[str, Any]:
    """Check both graphs against eager ``SASRec.score_last`` on the whole session.

    For each batch of :func:`_sessions`: the prefill graph on the sessions, and the step graph on
    the sessions given the prefill states of each session minus its last item (no past states
    for one-item sessions: a past of length 0, or left-padding in a batch), must both return
    the reference top-k items (up to exact ties within the score tolerance) with scores within it
    (rtol 1e-5), and the step's new states must equal the prefill states of the whole session
    (within ``atol``). Each graph run is repeated with a (0, C) ``score_mask`` (no filter),
    which must give the same top-k exactly.

    Args:
        reference: ``eager`` (``SASRec.score_last``) or ``prefill``: the prefill graph's own scores
            of every item (for int8 catalogs, :func:`quantize_catalog`, whose agreement with eager
            PyTorch ``seqrec.export.check_variant`` measures; the step graph must then agree
            with the prefill graph).
        score_atol: tolerance of the scores; None = ``atol``.

    Returns:
        ``{"max_abs_diff", "max_state_diff", "batches_checked": [[B, L], ...], "atol", "k",
        "reference", "score_atol"}``.

    Raises:
        seqrec.export.ExportValidationError: naming the graph, batch shape and difference.
        ValueError: unknown ``reference``.
    """
    if reference not in ("eager", "prefill"):
        raise ValueError(f"reference must be 'eager' or 'prefill', got {reference!r}")
    score_atol = atol if score_atol is None else score_atol
    import onnxruntime as ort

    from seqrec.export import ExportValidationError

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    prefill = ort.InferenceSession(str(prefill_path), options, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(step_path), options, providers=["CPUExecutionProvider"])
    step_names = [arg.name for arg in step.get_inputs()]
    cfg = model.cfg
    k = min(k, cfg.num_items)
    mask = np.zeros((1, cfg.num_items + 1), dtype=np.float32)
    mask[0, PAD_IDX] = -np.inf
    empty_mask = np.zeros((0, cfg.num_items + 1), dtype=np.float32)
    k_arr = np.array([k], dtype=np.int64)
    is_copy = cfg.copy_mechanism
    rng = np.random.default_rng(0)
    max_diff = max_state_diff = 0.0
    shapes: list[list[int]] = []

    def unmasked_agrees(name: str, graph: Any, feed: dict[str, Any], got: list[np.ndarray]) -> None:
        """A (0, C) mask (no filter, :func:`skip_empty_score_mask`) must give the PAD-only mask's
        top-k exactly."""
        plain = graph.run(None, {**feed, _MASK: empty_mask})
        if not all(np.array_equal(a, b) for a, b in zip(plain[:2], got[:2], strict=True)):
            raise ExportValidationError(
                f"{name} graph, batch {list(feed[_INPUT].shape)}: the top-k without a score mask "
                "differs from the top-k with the PAD-only mask"
            )

    def run_prefill(sessions: list[list[int]]) -> list[np.ndarray]:
        feed = {_INPUT: encode_prefixes(sessions, cfg.max_len), _MASK: mask, _K: k_arr}
        outputs = prefill.run(None, feed)
        unmasked_agrees("prefill", prefill, feed, outputs)
        return outputs

    def compare(name: str, shape: list[int], got: list[np.ndarray], want: np.ndarray) -> float:
        top_scores, top_idx = got[0], got[1]
        want_order = np.argsort(-want[:, 1:], axis=1, kind="stable")[:, :k] + 1
        want_scores = np.take_along_axis(want, want_order, axis=1)
        diff = float(np.abs(top_scores - want_scores).max())
        if not np.allclose(top_scores, want_scores, rtol=1e-5, atol=score_atol):
            raise ExportValidationError(
                f"{name} graph, batch {shape}: top-{k} scores differ from {reference}, max "
                f"|diff| {diff:.3e} (atol {score_atol:g})"
            )
        for row in range(len(want)):
            swapped = set(top_idx[row].tolist()) ^ set(want_order[row].tolist())
            if (
                swapped
                and np.abs(want[row, sorted(swapped)] - want_scores[row, -1]).max() > score_atol
            ):
                raise ExportValidationError(
                    f"{name} graph, batch {shape}, row {row}: top-{k} items differ from {reference}"
                )
        return diff

    def prefill_scores(sessions: list[list[int]]) -> np.ndarray:
        """(B, C) every item's score from the prefill graph (k = C - 1), PAD column -inf."""
        ids = encode_prefixes(sessions, cfg.max_len)
        everything = np.array([cfg.num_items], dtype=np.int64)
        top_scores, top_idx = prefill.run(None, {_INPUT: ids, _MASK: mask, _K: everything})[:2]
        dense = np.full((len(sessions), cfg.num_items + 1), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, top_idx, top_scores, axis=1)
        return dense

    with torch.inference_mode():
        for sessions in _sessions(model, rng):
            ids = encode_prefixes(sessions, cfg.max_len)
            shape = list(ids.shape)
            full = run_prefill(sessions)
            if reference == "eager":
                want = model.score_last(torch.from_numpy(ids)).numpy()  # (B, C)
                max_diff = max(max_diff, compare("prefill", shape, full, want))
            else:
                want = prefill_scores(sessions)
            # the step graph on every session: the prefill states of all but its newest item,
            # or (one-item sessions, as the predictor serves a first click) no past at all
            no_past = states_from_prefill(full[2][:, :1], full[3][:1] if is_copy else None, [0])
            states = no_past * len(sessions)
            heads = [i for i, session in enumerate(sessions) if len(session) >= 2]
            if heads:
                prefixes = [sessions[i][:-1] for i in heads]
                before = run_prefill(prefixes)
                computed = states_from_prefill(
                    before[2], before[3] if is_copy else None, [len(p) for p in prefixes]
                )
                for i, state in zip(heads, computed, strict=True):
                    states[i] = state
            past_kv, past_copy = stack_past(states)
            step_ids = encode_prefixes(sessions, cfg.max_len)
            feed = {_INPUT: step_ids, **past_kv_feed(past_kv, step_names), _MASK: mask, _K: k_arr}
            if is_copy:
                feed[PAST_COPY_KEYS_NAME] = past_copy
            got = step.run(None, feed)
            unmasked_agrees("step", step, feed, got)
            max_diff = max(max_diff, compare("step", list(step_ids.shape), got, want))
            after = states_from_prefill(
                full[2],
                full[3] if is_copy else None,
                [len(session) for session in sessions],
            )
            for j, (prev, whole) in enumerate(zip(states, after, strict=True)):
                grown = prev.extended(got[2][:, j], got[3][j] if is_copy else None)
                state_diff = float(np.abs(grown.kv - whole.kv).max())
                if is_copy:
                    state_diff = max(
                        state_diff, float(np.abs(grown.copy_keys - whole.copy_keys).max())
                    )
                max_state_diff = max(max_state_diff, state_diff)
                if state_diff > atol:
                    raise ExportValidationError(
                        f"step graph, batch {shape}, row {j}: new states differ from the prefill "
                        f"states of the whole session by {state_diff:.3e}"
                    )
            shapes.append(shape)
    logger.info(
        "validated incremental graphs on %d batches against %s: max |diff| %.2e, states %.2e",
        len(shapes),
        reference,
        max_diff,
        max_state_diff,
    )
    return {
        "max_abs_diff": max_diff,
        "max_state_diff": max_state_diff,
        "batches_checked": shapes,
        "atol": atol,
        "k": k,
        "reference": reference,
        "score_atol": score_atol,
    }
