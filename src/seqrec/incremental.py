"""Incremental (key/value-cached) serving graphs for :class:`~seqrec.models.sasrec.SASRec`.

On a product page the widget asks again after every click with the same session plus one item.
A causal transformer's earlier positions do not change when an item is appended, so the serving
export can keep each session's states (:mod:`seqrec.kv_cache`) and compute only the new position:

* **prefill** (``model.onnx`` of an incremental export): ``item_ids`` (B, L) int64 left-padded,
  ``score_mask`` (1 or B, C) float32 and ``k`` (1,) int64 -> ``top_scores`` (B, k) float32,
  ``top_idx`` (B, k) int64 (best first) and the states of every position, ``present_kv``
  (2 * n_layers, B, H, L, Dh) float32 and, for copy models, ``present_copy_keys`` (B, L, D);
* **step** (``model_step.onnx``): ``item_ids`` (B, P + 1) (the cached P positions, left-padded,
  then the new item), ``past_kv`` (2 * n_layers, B, H, P, Dh) float32 (left-padded like
  ``item_ids``; padded slots are masked), ``past_copy_keys`` (B, P, D) for copy models, the same
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from seqrec.constants import PAD_IDX
from seqrec.kv_cache import stack_past, states_from_prefill
from seqrec.models.sasrec import SASRec
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
PAST_KV_NAME = "past_kv"
PAST_COPY_KEYS_NAME = "past_copy_keys"
PRESENT_KV_NAME = "present_kv"
PRESENT_COPY_KEYS_NAME = "present_copy_keys"
_INPUT, _MASK, _K = "item_ids", "score_mask", "k"
_TOP_SCORES, _TOP_IDX = "top_scores", "top_idx"


def supports_incremental(model: nn.Module) -> bool:
    """Whether the incremental graphs can be written for ``model`` (a ``SASRec``: they reuse its
    embeddings, blocks and LayerNorms)."""
    return isinstance(model, SASRec)


def _heads(model: SASRec) -> tuple[int, int]:
    heads = model.blocks[0].attn.n_heads
    return heads, model.cfg.d_model // heads


def _block(
    block: nn.Module,
    hidden: Tensor,
    attn_bias: Tensor,
    past_k: Tensor | None,
    past_v: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pre-LN block (``seqrec.models.sasrec.Block`` in eval mode) over new positions.

    Args:
        hidden: (B, T, D) float inputs of the T new positions.
        attn_bias: (B, 1, T, P + T) float additive mask over past then new key positions.
        past_k, past_v: (B, H, P, Dh) float keys / values of earlier positions, or None (P = 0).

    Returns:
        (B, T, D) outputs and the new positions' keys and values, each (B, H, T, Dh).
    """
    batch, length, d_model = hidden.shape
    heads = block.attn.n_heads
    qkv = block.attn.qkv(block.ln_attn(hidden)).view(batch, length, 3, heads, d_model // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
    k, v = k.contiguous(), v.contiguous()  # (torch.export cannot stack the strided views)
    keys = k if past_k is None else torch.cat([past_k, k], dim=2)  # (B, H, P + T, Dh)
    values = v if past_v is None else torch.cat([past_v, v], dim=2)
    # F.scaled_dot_product_attention written out: the dynamo exporter lowers SDPA with a
    # reshape/transpose chain for the keys that costs a dozen extra nodes per block
    att = (q @ keys.transpose(2, 3)) * (d_model // heads) ** -0.5 + attn_bias  # (B, H, T, P + T)
    out = torch.softmax(att, dim=-1) @ values  # (B, H, T, Dh)
    hidden = hidden + block.attn.proj(out.transpose(1, 2).reshape(batch, length, d_model))
    hidden = hidden + block.ffn(block.ln_ffn(hidden))
    return hidden, k, v


def _top_k(
    model: SASRec,
    last: Tensor,
    keys: Tensor | None,
    item_ids: Tensor,
    score_mask: Tensor,
    k: Tensor,
) -> tuple[Tensor, Tensor]:
    """The best k real items for the last state ``last`` (B, D): ``score_last``'s scores plus the
    mask, top-k. For copy models (``keys`` (B, L, D)) the constant log(gate) of each row is added
    to the k values only (see ``SASRec.copy_log_probs_from_keys``)."""
    logits = last @ model.item_emb.weight[PAD_IDX + 1 :].t()  # (B, C-1)
    shift = None
    if keys is not None:
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
    """Holds the wrapped model; refuses models without the standard SASRec blocks."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        if not supports_incremental(model):
            raise ValueError("incremental graphs need seqrec.models.sasrec.SASRec blocks")
        self.model = model


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
            hidden, k_new, v_new = _block(block, hidden, attn_bias, None, None)
            kv += [k_new, v_new]
        states = model.ln_out(hidden) * is_real.unsqueeze(-1).to(hidden.dtype)  # (B, L, D)
        last = states[:, -1]  # (B, D)
        copy_keys = model.copy_key(states) if cfg.copy_mechanism else None  # (B, L, D)
        top_scores, top_idx = _top_k(model, last, copy_keys, item_ids, score_mask, k)
        outputs = [] if copy_keys is None else [copy_keys]
        return (top_scores, top_idx, torch.cat([t.unsqueeze(0) for t in kv]), *outputs)


class StepModel(_IncrementalGraph):
    """One new item per session on top of cached states (see the module docstring)."""

    def forward(
        self,
        item_ids: Tensor,
        past_kv: Tensor,
        past_copy_keys: Tensor,
        score_mask: Tensor,
        k: Tensor,
    ) -> tuple[Tensor, ...]:
        """Args:
            item_ids: (B, P + 1) int64: the cached positions' items (left-padded with PAD_IDX)
                and the new item last (a real item).
            past_kv: (2 * n_layers, B, H, P, Dh) float32 cached keys and values, aligned with
                ``item_ids[:, :-1]``; slots of PAD items are ignored.
            past_copy_keys: (B, P, D) float32 cached pointer keys (copy models; ignored
                otherwise, see :class:`StepModelNoCopy`).
            score_mask: (1 or B, C) float32 and k: (1,) int64 as in :class:`PrefillModel`.

        Returns:
            ``top_scores`` (B, k), ``top_idx`` (B, k), ``present_kv`` (2 * n_layers, B, H, 1, Dh)
            [, ``present_copy_keys`` (B, 1, D) for copy models].
        """
        model, cfg = self.model, self.model.cfg
        new_item = item_ids[:, -1:]  # (B, 1)
        is_real_past = item_ids[:, :-1] != PAD_IDX  # (B, P)
        is_real_new = (new_item != PAD_IDX).unsqueeze(-1).to(past_kv.dtype)  # (B, 1, 1)
        position = is_real_past.to(torch.int64).sum(1, keepdim=True)  # (B, 1)
        hidden = model.item_emb(new_item) * (cfg.d_model**0.5) + model.pos_emb(position)
        hidden = hidden * is_real_new  # (B, 1, D)
        is_allowed = torch.cat([is_real_past, torch.ones_like(new_item, dtype=torch.bool)], dim=1)
        attn_bias = torch.zeros(is_allowed.shape, dtype=hidden.dtype)
        attn_bias = attn_bias.masked_fill(~is_allowed, torch.finfo(hidden.dtype).min)
        attn_bias = attn_bias[:, None, None, :]  # (B, 1, 1, P + 1)
        kv: list[Tensor] = []
        for layer, block in enumerate(model.blocks):
            hidden, k_new, v_new = _block(
                block, hidden, attn_bias, past_kv[2 * layer], past_kv[2 * layer + 1]
            )
            kv += [k_new, v_new]
        state = model.ln_out(hidden) * is_real_new  # (B, 1, D)
        last = state[:, 0]  # (B, D)
        new_key = model.copy_key(state) if cfg.copy_mechanism else None  # (B, 1, D)
        keys = None if new_key is None else torch.cat([past_copy_keys, new_key], dim=1)
        top_scores, top_idx = _top_k(model, last, keys, item_ids, score_mask, k)  # keys (B, P+1, D)
        outputs = [] if new_key is None else [new_key]
        return (top_scores, top_idx, torch.cat([t.unsqueeze(0) for t in kv]), *outputs)


class StepModelNoCopy(StepModel):
    """:class:`StepModel` without the ``past_copy_keys`` input (models without copy mechanism)."""

    def forward(  # type: ignore[override]
        self, item_ids: Tensor, past_kv: Tensor, score_mask: Tensor, k: Tensor
    ) -> tuple[Tensor, ...]:
        """See :class:`StepModel`; returns ``top_scores``, ``top_idx`` and ``present_kv``."""
        return super().forward(item_ids, past_kv, past_kv, score_mask, k)


def graph_names(copy_mechanism: bool) -> dict[str, list[str]]:
    """Input and output names of both graphs (see the module docstring)."""
    copy_in = [PAST_COPY_KEYS_NAME] if copy_mechanism else []
    copy_out = [PRESENT_COPY_KEYS_NAME] if copy_mechanism else []
    outputs = [_TOP_SCORES, _TOP_IDX, PRESENT_KV_NAME, *copy_out]
    return {
        "prefill_inputs": [_INPUT, _MASK, _K],
        "step_inputs": [_INPUT, PAST_KV_NAME, *copy_in, _MASK, _K],
        "outputs": outputs,
    }


def export_incremental(
    model: SASRec, prefill_path: Path, step_path: Path, opset: int = 18
) -> dict[str, Any]:
    """Write the prefill and step graphs with the dynamo exporter and validate them.

    Args:
        model: the trained model (CPU, eval mode).
        prefill_path, step_path: output files.
        opset: ONNX opset (>= 18).

    Returns:
        The :func:`validate_incremental` report plus ``names`` (:func:`graph_names`).

    Raises:
        ValueError: the model is not a ``SASRec`` with the standard blocks.
        seqrec.export.ExportValidationError: a graph differs from ``SASRec.score_last``.
    """
    cfg = model.cfg
    heads, head_dim = _heads(model)
    names = graph_names(cfg.copy_mechanism)
    num_columns = cfg.num_items + 1
    rng = torch.Generator().manual_seed(0)
    batch, past_len = 2, min(6, cfg.max_len - 1)
    batch_dim = torch.export.Dim("batch")
    # one mask row per session at export (torch.export would freeze a size-1 axis); onnxruntime
    # broadcasts a (1, C) mask at run time (ONNX Add), as the predictor sends without filters
    mask = torch.zeros(batch, num_columns)
    k = torch.tensor([min(5, cfg.num_items)], dtype=torch.int64)
    seq = torch.randint(1, cfg.num_items + 1, (batch, past_len + 1), generator=rng)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*axis name.*", category=UserWarning)
        seq_dim = torch.export.Dim("seq_len", min=1, max=cfg.max_len)
        torch.onnx.export(
            PrefillModel(model).eval(),
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
        if cfg.max_len < 2:
            raise ValueError("incremental serving needs max_len >= 2")
        past_dim = torch.export.Dim("past_len", min=1, max=cfg.max_len - 1)
        past_kv = torch.randn(2 * cfg.n_layers, batch, heads, past_len, head_dim, generator=rng)
        inputs: list[Tensor] = [seq, past_kv]
        shapes: dict[str, Any] = {
            _INPUT: {0: batch_dim, 1: past_dim + 1},
            PAST_KV_NAME: {1: batch_dim, 3: past_dim},
        }
        if cfg.copy_mechanism:
            inputs.append(torch.randn(batch, past_len, cfg.d_model, generator=rng))
            shapes[PAST_COPY_KEYS_NAME] = {0: batch_dim, 1: past_dim}
        shapes.update({_MASK: {0: batch_dim}, _K: None})
        torch.onnx.export(
            (StepModel if cfg.copy_mechanism else StepModelNoCopy)(model).eval(),
            (*inputs, mask, k),
            str(step_path),
            dynamo=True,
            opset_version=opset,
            input_names=names["step_inputs"],
            output_names=names["outputs"],
            dynamic_shapes=tuple(shapes[name] for name in names["step_inputs"]),
            external_data=False,
            verbose=False,
        )
    report = validate_incremental(model, prefill_path, step_path)
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
    model: SASRec, prefill_path: Path, step_path: Path, atol: float = 1e-4, k: int = 10
) -> dict[str, Any]:
    """Check both graphs against eager ``SASRec.score_last`` on the whole session.

    For each batch of :func:`_sessions`: the prefill graph on the sessions, and the step graph on
    the sessions given the prefill states of each session minus its last item, must both return
    the eager top-k items (up to exact ties within ``atol``) with scores within ``atol`` (rtol
    1e-5), and the step's new states must equal the prefill states of the whole session.

    Returns:
        ``{"max_abs_diff", "max_state_diff", "batches_checked": [[B, L], ...], "atol", "k"}``.

    Raises:
        seqrec.export.ExportValidationError: naming the graph, batch shape and difference.
    """
    import onnxruntime as ort

    from seqrec.export import ExportValidationError

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    prefill = ort.InferenceSession(str(prefill_path), options, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(step_path), options, providers=["CPUExecutionProvider"])
    cfg = model.cfg
    k = min(k, cfg.num_items)
    mask = np.zeros((1, cfg.num_items + 1), dtype=np.float32)
    mask[0, PAD_IDX] = -np.inf
    k_arr = np.array([k], dtype=np.int64)
    is_copy = cfg.copy_mechanism
    rng = np.random.default_rng(0)
    max_diff = max_state_diff = 0.0
    shapes: list[list[int]] = []

    def run_prefill(sessions: list[list[int]]) -> list[np.ndarray]:
        ids = encode_prefixes(sessions, cfg.max_len)
        return prefill.run(None, {_INPUT: ids, _MASK: mask, _K: k_arr})

    def compare(name: str, shape: list[int], got: list[np.ndarray], want: np.ndarray) -> float:
        top_scores, top_idx = got[0], got[1]
        want_order = np.argsort(-want[:, 1:], axis=1, kind="stable")[:, :k] + 1
        want_scores = np.take_along_axis(want, want_order, axis=1)
        diff = float(np.abs(top_scores - want_scores).max())
        if not np.allclose(top_scores, want_scores, rtol=1e-5, atol=atol):
            raise ExportValidationError(
                f"{name} graph, batch {shape}: top-{k} scores differ from eager, max |diff| "
                f"{diff:.3e} (atol {atol:g})"
            )
        for row in range(len(want)):
            swapped = set(top_idx[row].tolist()) ^ set(want_order[row].tolist())
            if swapped and np.abs(want[row, sorted(swapped)] - want_scores[row, -1]).max() > atol:
                raise ExportValidationError(
                    f"{name} graph, batch {shape}, row {row}: top-{k} items differ from eager"
                )
        return diff

    with torch.inference_mode():
        for sessions in _sessions(model, rng):
            ids = encode_prefixes(sessions, cfg.max_len)
            shape = list(ids.shape)
            want = model.score_last(torch.from_numpy(ids)).numpy()  # (B, C)
            full = run_prefill(sessions)
            max_diff = max(max_diff, compare("prefill", shape, full, want))
            rows = [i for i, s in enumerate(sessions) if len(s) >= 2]
            if not rows:
                shapes.append(shape)
                continue
            prefixes = [sessions[i][:-1] for i in rows]
            before = run_prefill(prefixes)
            states = states_from_prefill(
                before[2], before[3] if is_copy else None, [len(p) for p in prefixes]
            )
            past_kv, past_copy = stack_past(states)
            step_ids = encode_prefixes([sessions[i] for i in rows], cfg.max_len)
            feed = {_INPUT: step_ids, PAST_KV_NAME: past_kv, _MASK: mask, _K: k_arr}
            if is_copy:
                feed[PAST_COPY_KEYS_NAME] = past_copy
            got = step.run(None, feed)
            max_diff = max(max_diff, compare("step", list(step_ids.shape), got, want[rows]))
            after = states_from_prefill(
                full[2][:, rows],
                full[3][rows] if is_copy else None,
                [len(sessions[i]) for i in rows],
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
        "validated incremental graphs on %d batches: max |diff| %.2e, states %.2e",
        len(shapes),
        max_diff,
        max_state_diff,
    )
    return {
        "max_abs_diff": max_diff,
        "max_state_diff": max_state_diff,
        "batches_checked": shapes,
        "atol": atol,
        "k": k,
    }
