"""Incremental serving: prefill + step graphs, the session-state cache, and the predictor using
them give exactly the rankings of the whole-session model."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import seqrec.predictor as predictor_mod
from _export_helpers import (
    FALLBACK_ITEMS,
    MAX_LEN,
    NUM_ITEMS,
    edit_meta,
    nan_item_rows,
    rehash,
    tiny_vocab,
)
from seqrec.export import ExportValidationError, ExportVariant, export_onnx
from seqrec.incremental import (
    CATALOG_NAME,
    INT8_SCORE_ATOL,
    STEP_FILE,
    _step_copy_log_probs,
    block_top_k,
    quantize_catalog,
    skip_empty_score_mask,
    top_k_block_size,
    validate_incremental,
)
from seqrec.kv_cache import (
    SessionState,
    StackScratch,
    StateCache,
    past_kv_feed,
    stack_past,
    states_from_prefill,
)
from seqrec.models.sasrec import SASRec, SASRecConfig
from seqrec.predictor import ArtifactIntegrityError, SessionRecommender
from seqrec.sequence import encode_prefixes


def _model(copy_mechanism: bool, n_layers: int = 2, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(
        num_items=NUM_ITEMS,
        max_len=MAX_LEN,
        d_model=16,
        n_heads=2,
        n_layers=n_layers,
        copy_mechanism=copy_mechanism,
    )
    model = SASRec(cfg).eval()
    with torch.no_grad():  # spread the scores (random init gives near-ties)
        for param in model.parameters():
            param.normal_(0.0, 0.3)
        model.item_emb.weight[0].zero_()
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["dot", "copy"])
def inc_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = _model(request.param)
    out = export_onnx(
        model,
        tiny_vocab(),
        tmp_path_factory.mktemp("incremental") / "export",
        fallback_items=FALLBACK_ITEMS,
        variant=ExportVariant(top_k_in_graph=True, incremental=True),
    )
    return model, out


def _eager(model: SASRec, session: list[str], k: int, exclude_seen: bool = False):
    idxs = [int(i) - 1000 for i in session][-MAX_LEN:]
    with torch.inference_mode():
        scores = model.score_last(torch.from_numpy(encode_prefixes([idxs], MAX_LEN)))[0].numpy()
    scores = scores.copy()
    scores[0] = -np.inf
    if exclude_seen:
        scores[idxs] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [str(1000 + i) for i in order], scores[order]


def _random_session(rng: np.random.Generator, length: int) -> list[str]:
    return [str(1000 + int(i)) for i in rng.integers(1, NUM_ITEMS + 1, size=length)]


# ----------------------------------------------------------------------------------- kv_cache


def _state(length: int, value: float, copy: bool = True) -> SessionState:
    kv = np.full((4, 2, length, 3), value, dtype=np.float32)
    keys = np.full((length, 6), value, dtype=np.float32) if copy else None
    return SessionState.frozen(kv, keys)


def test_past_kv_feed_gives_each_block_a_view_of_its_row() -> None:
    past_kv, _ = stack_past([_state(2, 1.0), _state(4, 2.0)])  # (4, 2, 2, 4, 3): 2 blocks
    feed = past_kv_feed(past_kv, ["item_ids", "past_kv_0", "past_kv_1", "past_kv_2", "past_kv_3"])
    assert list(feed) == ["past_kv_0", "past_kv_1", "past_kv_2", "past_kv_3"]
    for i, name in enumerate(feed):
        view = feed[name]
        assert view.shape == (2, 2, 4, 3) and view.flags.c_contiguous
        assert np.shares_memory(view, past_kv) and np.array_equal(view, past_kv[i])  # no copy
    # exports written before the per-block inputs take the stacked array as one input
    old = past_kv_feed(past_kv, ["item_ids", "past_kv", "score_mask", "k"])
    assert list(old) == ["past_kv"] and old["past_kv"] is past_kv


def test_stack_past_left_pads_each_row() -> None:
    past_kv, past_keys = stack_past([_state(2, 1.0), _state(4, 2.0)])
    assert past_kv.shape == (4, 2, 2, 4, 3) and past_keys.shape == (2, 4, 6)
    assert (past_kv[:, 0, :, :2] == 0).all() and (past_kv[:, 0, :, 2:] == 1).all()
    assert (past_kv[:, 1] == 2).all()
    assert (past_keys[0, :2] == 0).all() and (past_keys[0, 2:] == 1).all()
    single_kv, single_keys = stack_past([_state(3, 5.0, copy=False)])
    assert single_kv.shape == (4, 1, 2, 3, 3) and single_keys is None


def test_states_from_prefill_keeps_real_positions_only() -> None:
    kv = np.arange(4 * 2 * 2 * 5 * 3, dtype=np.float32).reshape(4, 2, 2, 5, 3)
    keys = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    short, full = states_from_prefill(kv, keys, [2, 5])
    np.testing.assert_array_equal(short.kv, kv[:, 0, :, 3:])
    np.testing.assert_array_equal(short.copy_keys, keys[0, 3:])
    np.testing.assert_array_equal(full.kv, kv[:, 1])
    assert not short.kv.flags.writeable


def test_extended_leaves_the_cached_state_unchanged() -> None:
    state = _state(2, 1.0)
    grown = state.extended(np.full((4, 2, 1, 3), 7.0, np.float32), np.full((1, 6), 7.0, np.float32))
    assert state.length == 2 and grown.length == 3
    assert (grown.kv[:, :, 2] == 7).all() and (grown.copy_keys[2] == 7).all()
    assert (state.kv == 1).all()


def _position(value: float) -> tuple[np.ndarray, np.ndarray]:
    return np.full((4, 2, 1, 3), value, np.float32), np.full((1, 6), value, np.float32)


def test_extended_appends_in_place_on_the_next_click_and_copies_on_a_branch() -> None:
    first = _state(2, 1.0).extended(*_position(3.0), max_length=5)  # copied, room for 5
    assert first.length == 3 and first.room is not None and first.room.kv.shape[2] == 5
    assert first.nbytes == 4 * 2 * 5 * 3 * 4 + 5 * 6 * 4  # the room counts
    second = first.extended(*_position(4.0), max_length=5)  # the next click: no copy
    assert second.room is first.room and np.shares_memory(second.kv, first.kv)
    assert (second.kv[:, :, 3] == 4).all() and (second.copy_keys[3] == 4).all()
    # another click after `first` (a second tab): position 3 is taken, so it gets its own copy
    branch = first.extended(*_position(9.0), max_length=5)
    assert branch.room is not first.room and not np.shares_memory(branch.kv, first.kv)
    assert (branch.kv[:, :, 3] == 9).all() and (second.kv[:, :, 3] == 4).all()
    np.testing.assert_array_equal(branch.kv[:, :, :3], first.kv)  # earlier positions copied
    # a reload of `second` (its first n - 1 positions) writes nothing over `second` either
    reload = second.without_last().extended(*_position(6.0), max_length=5)
    assert reload.room is not second.room and (second.kv[:, :, 3] == 4).all()
    full = second.extended(*_position(5.0), max_length=5)  # fills the room
    assert full.length == 5 and full.room is first.room
    beyond = full.extended(*_position(8.0), max_length=5)  # no room left: a copy, no overflow
    assert beyond.length == 6 and beyond.room is not first.room
    for state in (first, second, branch, reload, full):
        assert not state.kv.flags.writeable and not state.copy_keys.flags.writeable
    # every state still reads exactly its own positions
    assert [float(v) for v in full.kv[0, 0, :, 0]] == [1.0, 1.0, 3.0, 4.0, 5.0]
    assert [float(v) for v in first.kv[0, 0, :, 0]] == [1.0, 1.0, 3.0]


def test_extended_from_one_state_in_many_threads_writes_each_position_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    parent = _state(2, 1.0).extended(*_position(2.0), max_length=50)
    with ThreadPoolExecutor(8) as pool:
        children = list(pool.map(lambda v: parent.extended(*_position(v)), range(10, 74)))
    assert sum(child.room is parent.room for child in children) == 1  # one claims the slot
    assert [float(c.kv[0, 0, 3, 0]) for c in children] == [float(v) for v in range(10, 74)]


def test_stack_past_reuses_one_scratch_buffer_per_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor

    scratch = StackScratch()
    states = [_state(2, 1.0), _state(4, 2.0)]
    first, first_keys = stack_past(states, scratch)
    again, _ = stack_past([_state(3, 5.0), _state(1, 6.0)], scratch)  # other shapes, same memory
    assert np.shares_memory(first, again) and again.flags.c_contiguous
    assert (again[:, 0, :, :] == 5).all() and (again[:, 1, :, :2] == 0).all()
    assert (again[:, 1, :, 2:] == 6).all()  # the padding was zeroed over the old values
    want, want_keys = stack_past(states)  # no scratch: new arrays, same values
    got, got_keys = stack_past(states, scratch)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_keys, want_keys)
    with ThreadPoolExecutor(1) as pool:  # another thread gets memory of its own
        other = pool.submit(stack_past, states, scratch).result()[0]
    assert not np.shares_memory(other, got)
    big = StackScratch(max_bytes=64)  # larger than the bound: a fresh array every call
    assert not np.shares_memory(stack_past(states, big)[0], stack_past(states, big)[0])


def test_state_cache_is_lru_bounded_in_bytes_and_counts() -> None:
    one = _state(2, 1.0)  # 4*2*2*3*4 + 2*6*4 = 240 bytes
    cache = StateCache(max_bytes=2 * one.nbytes)
    cache.store((1, 2), one)
    cache.store((5, 6), _state(2, 2.0))
    assert cache.lookup((1, 2, 3)) is one  # the state of (1, 2); now the most recent
    cache.store((7, 8), _state(2, 3.0))  # evicts (5, 6)
    assert cache.lookup((5, 6, 9)) is None and cache.lookup((7, 8, 9)) is not None
    assert cache.lookup((4,)) is None  # one item: nothing earlier, not counted
    cache.store((9, 9), _state(20, 0.0))  # larger than the cache: not stored, nothing evicted
    info = cache.info()
    assert info == {
        "hits": 2,
        "misses": 1,
        "entries": 2,
        "bytes": 2 * one.nbytes,
        "max_bytes": 2 * one.nbytes,
    }
    with pytest.raises(ValueError, match="max_bytes"):
        StateCache(0)


def test_state_cache_keeps_one_state_per_visit_and_serves_reloads() -> None:
    cache = StateCache(max_bytes=10_000)
    cache.store((1, 2), _state(2, 1.0))
    grown = _state(3, 2.0)
    cache.store((1, 2, 3), grown)  # the parent (1, 2) is dropped: it is inside (1, 2, 3)
    assert cache.info()["entries"] == 1 and cache.info()["bytes"] == grown.nbytes
    again = cache.lookup((1, 2, 3))  # the same request again (a reload): positions 1..2 of it
    assert again is not None and again.length == 2
    np.testing.assert_array_equal(again.kv, grown.kv[:, :, :2])
    past_kv, past_keys = stack_past([again])  # views are made contiguous for onnxruntime
    assert past_kv.flags.c_contiguous and past_keys.flags.c_contiguous
    cache.store((1, 2, 3, 4), None)  # nothing to keep, but the parent goes
    assert cache.info()["entries"] == 0


def test_state_cache_batch_calls_equal_one_by_one_calls() -> None:
    """``lookup_many`` / ``store_many`` (one lock for a batch) do what ``lookup`` / ``store``
    do window by window, in order: a window stored after its parent in the same batch drops it,
    counters and LRU order included."""
    states = {w: _state(len(w), float(i)) for i, w in enumerate([(1,), (1, 2), (5, 6), (7, 8)])}
    windows = list(states)
    one_by_one, batched = StateCache(max_bytes=10_000), StateCache(max_bytes=10_000)
    for window in windows:
        one_by_one.store(window, states[window])
    batched.store_many(windows, [states[w] for w in windows])
    assert batched.info() == one_by_one.info() and batched.info()["entries"] == 3  # (1,) dropped
    asked = [(1, 2, 3), (1, 9), (5, 6, 7), (4,), (7, 8), (9, 9, 9)]
    got = batched.lookup_many(asked)
    for mine, theirs in zip(got, [one_by_one.lookup(w) for w in asked], strict=True):
        assert (mine is None) == (theirs is None)
        assert mine is None or np.array_equal(mine.kv, theirs.kv)
    assert got[0] is states[(1, 2)] and got[2] is states[(5, 6)] and got[3] is None
    assert got[4] is not None and got[4].length == 1  # a reload of (7, 8): its first position
    assert batched.info() == one_by_one.info() == {**batched.info(), "hits": 3, "misses": 2}
    with pytest.raises(ValueError):
        batched.store_many([(1, 2)], [])


# ------------------------------------------------------------------------------------ export


def test_variant_needs_top_k_in_graph_and_fp32() -> None:
    with pytest.raises(ValueError, match="top_k_in_graph"):
        ExportVariant(incremental=True)
    with pytest.raises(ValueError, match="fp32"):
        ExportVariant(top_k_in_graph=True, precision="fp16", incremental=True)


def test_a_context_too_short_for_the_step_graph_is_refused_before_exporting(tmp_path: Path) -> None:
    """max_len 2 leaves a past axis of exactly one position, which torch.export cannot trace
    (it used to fail with "Cannot create Dim with inconsistent min=1, max=1" after the prefill
    graph was written); the export now says what to do instead, and leaves nothing behind."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=NUM_ITEMS, max_len=2, d_model=16, n_heads=2)).eval()
    with pytest.raises(
        ValueError,
        match=r"max_len >= 3, got max_len=2; export with variant.incremental=false variant.precision=fp32",
    ):
        export_onnx(
            model,
            tiny_vocab(),
            tmp_path / "export",
            variant=ExportVariant(top_k_in_graph=True, incremental=True),
        )
    assert list(tmp_path.iterdir()) == []
    plain = export_onnx(
        model, tiny_vocab(), tmp_path / "plain", variant=ExportVariant(top_k_in_graph=True)
    )
    assert SessionRecommender.from_dir(plain).recommend(["1001", "1002", "1003"], k=3)


def test_export_writes_and_hashes_the_step_graph(inc_export) -> None:
    model, out = inc_export
    meta = json.loads((out / "export_meta.json").read_text())
    assert (out / STEP_FILE).is_file() and STEP_FILE in meta["sha256"]
    assert meta["incremental"]["step_file"] == STEP_FILE
    report = meta["incremental"]["validation"]
    assert report["max_state_diff"] <= 1e-4
    assert meta["validation"]["max_abs_diff"] <= 1e-4
    assert meta["quality"]["top_k_overlap_mean"] == 1.0
    # one cached-state input per block's keys and per block's values (no stacked input to split)
    past = [f"past_kv_{i}" for i in range(2 * model.cfg.n_layers)]
    want_inputs = ["item_ids", *past, "score_mask", "k"]
    if model.cfg.copy_mechanism:
        want_inputs.insert(1 + len(past), "past_copy_keys")
    assert meta["incremental"]["step_input_names"] == want_inputs


def _optimised_ops(path: Path, tmp_path: Path) -> list[onnx.NodeProto]:
    """The top-level nodes of ``path`` after onnxruntime's full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"optimised_{path.name}")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(options.optimized_model_filepath).graph.node)


def test_graphs_are_lean_after_onnxruntime_optimisation(inc_export, tmp_path: Path) -> None:
    """The graphs' arithmetic is written so that onnxruntime fuses it: one Gelu (or BiasGelu)
    node per block in both graphs (not the five elementwise nodes of the erf form); in the step
    graph no scale folded into the attention MatMul (a FusedMatMul with alpha != 1 ran at half
    speed), (B, D) rows, so every Linear is one Gemm, and the pointer mixture of
    ``_step_copy_log_probs`` (no mask built from Range/Or, softplus instead of Exp/Log forms,
    one max-reduction scatter)."""
    model, out = inc_export
    graphs = {name: _optimised_ops(out / name, tmp_path) for name in ("model.onnx", STEP_FILE)}
    for name, graph_nodes in graphs.items():
        ops = [node.op_type for node in graph_nodes]
        gelus = ops.count("Gelu") + ops.count("BiasGelu")  # BiasGelu: MatMul's Add fused too
        assert gelus == model.cfg.n_layers and "Erf" not in ops, name
    nodes = graphs[STEP_FILE]
    ops = [node.op_type for node in nodes]
    alphas = [
        onnx.helper.get_attribute_value(attr)
        for node in nodes
        if node.op_type == "FusedMatMul"
        for attr in node.attribute
        if attr.name == "alpha"
    ]
    assert ops.count("FusedMatMul") == model.cfg.n_layers and set(alphas) <= {1.0}
    linears = 4 * model.cfg.n_layers + (3 if model.cfg.copy_mechanism else 0)
    assert ops.count("Gemm") == linears
    if model.cfg.copy_mechanism:  # _step_copy_log_probs: no mask built, softplus, max scatter
        assert "Range" not in ops and "Or" not in ops and "Exp" not in ops
        assert ops.count("Softplus") == 2
        (scatter,) = [node for node in nodes if node.op_type == "ScatterElements"]
        reduction = next(a for a in scatter.attribute if a.name == "reduction")
        assert onnx.helper.get_attribute_value(reduction) == b"max"


@pytest.mark.parametrize("copy_recency", [False, True])
def test_step_copy_log_probs_equal_the_models(copy_recency: bool) -> None:
    """The step graph's pointer mixture (``_step_copy_log_probs``: the padding bias as the
    mask, softplus forms, a max-reduction scatter with padding writing column 0) gives
    ``SASRec.copy_log_probs_from_keys``' numbers: with left padding, repeated items, item 1
    (column 0, where padding writes) in a padded session and not, and the recency bias."""
    torch.manual_seed(3)
    cfg = SASRecConfig(
        num_items=40,
        max_len=MAX_LEN,
        d_model=16,
        n_heads=2,
        n_layers=1,
        copy_mechanism=True,
        copy_recency=copy_recency,
    )
    model = SASRec(cfg).eval()
    with torch.no_grad():
        if copy_recency:
            model.copy_distance_bias.normal_()
        item_ids = torch.tensor(
            [
                [0, 0, 0, 5, 6, 7],  # padded
                [0, 1, 9, 1, 9, 3],  # item 1 twice after padding, repeats
                [0, 0, 4, 8, 2, 1],  # item 1 new, after padding
                [3, 3, 3, 3, 3, 3],  # one item throughout
                [0, 0, 0, 0, 0, 2],  # first click: every past slot padded
            ]
        )
        batch, length = item_ids.shape
        last, logits = torch.randn(batch, 16), 3 * torch.randn(batch, 40)
        keys, new_key = torch.randn(batch, length - 1, 16), torch.randn(batch, 1, 16)
        want, want_gate = model.copy_log_probs_from_keys(
            logits, last, keys, item_ids, split_gate=True, new_key=new_key
        )
        bias = torch.where(item_ids[:, :-1] != 0, 0.0, torch.finfo(torch.float32).min)
        got, got_gate = _step_copy_log_probs(
            model, logits, last, keys, new_key, item_ids, bias[:, :, None]
        )
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_gate, want_gate, rtol=0, atol=1e-6)
    assert got[2, 0] > torch.log_softmax(logits, -1)[2, 0]  # item 1 mixed, not overwritten


def test_validation_catches_a_wrong_step_graph(inc_export, tmp_path: Path) -> None:
    model, out = inc_export
    other = _model(model.cfg.copy_mechanism, seed=1)  # same shapes, different weights
    with pytest.raises(ExportValidationError, match="graph"):
        validate_incremental(other, out / "model.onnx", out / STEP_FILE)


def _top_k_graph(path: Path, columns: int, slice_mask: bool = True) -> None:
    """``TopK(scores + score_mask[:, 1:], k)`` (or ``+ score_mask`` unsliced) as the exports end."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width = columns + 1 if slice_mask else columns
    nodes = [
        helper.make_node("Slice", ["score_mask", "one", "end", "one"], ["real_mask"]),
        helper.make_node("Add", ["scores", "real_mask" if slice_mask else "score_mask"], ["s"]),
        helper.make_node("TopK", ["s", "k"], ["top_scores", "top_idx"], axis=1),
    ]
    graph = helper.make_graph(
        nodes if slice_mask else nodes[1:],
        "top_k",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", columns]),
            helper.make_tensor_value_info("score_mask", TensorProto.FLOAT, ["M", width]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["B", "K"]),
            helper.make_tensor_value_info("top_idx", TensorProto.INT64, ["B", "K"]),
        ],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
            numpy_helper.from_array(np.array([width], dtype=np.int64), "end"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_skip_empty_score_mask_runs_top_k_without_the_mask_only_for_an_empty_mask(
    tmp_path: Path,
) -> None:
    import onnx
    import onnxruntime as ort

    columns, k = 30, 5
    path = tmp_path / "top_k.onnx"
    _top_k_graph(path, columns)
    assert skip_empty_score_mask(path) is True
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "If" in ops and "Add" not in ops and "TopK" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((4, columns)).astype(np.float32)
    k_arr = np.array([k], dtype=np.int64)

    def top_k(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, idx = session.run(None, {"scores": scores, "score_mask": mask, "k": k_arr})
        return values, idx

    def numpy_top_k(masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(masked, idx, axis=1), idx

    no_filter = top_k(np.zeros((0, columns + 1), dtype=np.float32))
    np.testing.assert_array_equal(no_filter[1], numpy_top_k(scores)[1])
    np.testing.assert_array_equal(no_filter[0], numpy_top_k(scores)[0])
    best = int(no_filter[1][0, 0])  # a (1, C) and a (B, C) mask still exclude items
    one_row = np.zeros((1, columns + 1), dtype=np.float32)
    one_row[0, 1 + best] = -np.inf
    got = top_k(one_row)
    assert best not in got[1].tolist()[0]
    np.testing.assert_array_equal(got[1], numpy_top_k(scores + one_row[:, 1:])[1])
    rows = np.zeros((4, columns + 1), dtype=np.float32)
    rows[2, 1:] = -np.inf
    rows[2, 1 + 3] = 0.0  # row 2 may only get item 3
    got = top_k(rows)
    assert got[1][2, 0] == 3 and np.isneginf(got[0][2, 1:]).all()
    np.testing.assert_array_equal(got[1][[0, 1, 3]], no_filter[1][[0, 1, 3]])
    before = path.read_bytes()  # already rewritten: nothing left to match
    assert skip_empty_score_mask(path) is False and path.read_bytes() == before


def test_skip_empty_score_mask_leaves_a_graph_whose_mask_also_excludes_pad(tmp_path: Path) -> None:
    """Without the slice the mask covers the PAD column, which only the mask excludes."""
    path = tmp_path / "unsliced.onnx"
    _top_k_graph(path, 30, slice_mask=False)
    before = path.read_bytes()
    assert skip_empty_score_mask(path) is False and path.read_bytes() == before


def test_block_top_k_gives_the_plain_top_k_ties_and_minus_inf_included(tmp_path: Path) -> None:
    """The two-stage top-k over blocks returns the values, indices and order of ``TopK``
    (lower index first on ties) for every k, with scores full of ties and of -inf, with an
    empty, a (1, C) and a (B, C) mask: its ``TopK`` nodes are inside the mask rewrite's ``If``
    branches, which it rewrites too."""
    import onnx
    import onnxruntime as ort

    columns, block = 60, 4  # 15 blocks
    plain, blocked = tmp_path / "plain.onnx", tmp_path / "blocked.onnx"
    for path in (plain, blocked):
        _top_k_graph(path, columns)
        assert skip_empty_score_mask(path) is True
    assert block_top_k(blocked, columns, block=block) == block
    branches = [a.g for n in onnx.load(str(blocked)).graph.node for a in n.attribute if a.g.node]
    for branch in branches:
        ops = [n.op_type for n in branch.node]
        assert "ReduceMax" in ops and ops.count("TopK") == 3, ops
    sessions = {
        p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for p in (plain, blocked)
    }
    rng = np.random.default_rng(0)
    checked = 0
    for rows in (0, 1, 3):  # 0: an empty batch gives (0, k), as TopK does
        scores = rng.integers(0, 4, size=(rows, columns)).astype(np.float32)  # many ties
        scores[rng.random((rows, columns)) < 0.2] = -np.inf
        some = np.where(rng.random((1, columns + 1)) < 0.3, -np.inf, 0.0).astype(np.float32)
        per_row = np.where(rng.random((rows, columns + 1)) < 0.9, -np.inf, 0.0).astype(np.float32)
        for mask in (np.zeros((0, columns + 1), dtype=np.float32), some, per_row):
            masked = scores + mask[:, 1:] if len(mask) else scores
            for k in (1, 2, 5, 14, 15, 16, 31, 59, 60):
                feed = {"scores": scores, "score_mask": mask, "k": np.array([k], dtype=np.int64)}
                want_values, want_idx = sessions[plain].run(None, feed)
                got_values, got_idx = sessions[blocked].run(None, feed)
                np.testing.assert_array_equal(got_idx, want_idx)
                np.testing.assert_array_equal(got_values, want_values)
                order = np.argsort(-masked, axis=1, kind="stable")[:, :k]  # lower index first
                np.testing.assert_array_equal(got_idx, order)
                checked += 1
    assert checked == 3 * 3 * 9


def test_block_top_k_leaves_a_graph_it_cannot_block_and_refuses_a_bad_block(
    tmp_path: Path,
) -> None:
    path = tmp_path / "top_k.onnx"
    _top_k_graph(path, 37)  # prime: no block size
    before = path.read_bytes()
    assert block_top_k(path, 37) is None and path.read_bytes() == before
    for bad in (5, 37, 0):  # not a divisor, one block, nonsense
        with pytest.raises(ValueError, match=f"block {bad} does not divide 37 columns"):
            block_top_k(path, 37, block=bad)
    assert path.read_bytes() == before
    rewritten = tmp_path / "rewritten.onnx"  # already rewritten: left as it is
    _top_k_graph(rewritten, 60)
    assert block_top_k(rewritten, 60, block=4) == 4
    before = rewritten.read_bytes()
    assert block_top_k(rewritten, 60, block=4) is None and rewritten.read_bytes() == before
    old = tmp_path / "opset12.onnx"  # Unsqueeze takes its axes as an input from opset 13
    _top_k_graph(old, 60)
    proto = onnx.load(str(old))
    proto.opset_import[0].version = 12
    onnx.save(proto, str(old))
    before = old.read_bytes()
    assert block_top_k(old, 60, block=4) is None and old.read_bytes() == before


@pytest.mark.parametrize(
    ("width", "min_width", "want"),
    [
        (37_000, None, 40),  # sqrt(37,000 / 20) = 43
        (100_000, None, 80),
        (235_000, None, 100),
        (20_000, None, 32),
        (10_000, None, None),  # below BLOCK_TOP_K_MIN_WIDTH: the rewrite costs more than it saves
        (37_003, None, None),  # prime
        (74_006, None, None),  # 2 x 37,003: no divisor within 3x of 61
        (30, 0, 2),
    ],
)
def test_top_k_block_size(width: int, min_width: int | None, want: int | None) -> None:
    got = top_k_block_size(width) if min_width is None else top_k_block_size(width, min_width)
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "copy_mechanism"),
    [
        ({"top_k_in_graph": True}, False),
        ({"top_k_in_graph": True, "incremental": True, "precision": "int8_catalog"}, True),
    ],
    ids=["top_k_dot", "incremental_int8_copy"],
)
def test_a_large_catalog_export_blocks_its_top_k_and_ranks_as_the_model(
    variant: dict, copy_mechanism: bool, tmp_path: Path
) -> None:
    """A 20,000-item export gets the block top-k (blocks of 32) in every graph, passes the
    export's own checks against PyTorch, and the predictor ranks as ``score_last`` does; an
    export whose weights hold NaN is refused at load, naming them."""
    import onnx

    num_items = 20_000
    torch.manual_seed(0)
    cfg = SASRecConfig(
        num_items=num_items,
        max_len=MAX_LEN,
        d_model=16,
        n_heads=2,
        n_layers=1,
        copy_mechanism=copy_mechanism,
    )
    model = SASRec(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
        model.item_emb.weight[0].zero_()
    out = export_onnx(
        model,
        tiny_vocab(num_items),
        tmp_path / "export",
        fallback_items=FALLBACK_ITEMS,
        variant=ExportVariant(**variant),
    )
    meta = json.loads((out / "export_meta.json").read_text())
    assert meta["top_k_block_size"] == 32
    names = ["model.onnx"] + ([STEP_FILE] if variant.get("incremental") else [])
    for name in names:
        graph = onnx.load(str(out / name)).graph
        nodes = [*graph.node, *(b for n in graph.node for a in n.attribute for b in a.g.node)]
        blocks = [n.op_type for n in nodes if n.name.startswith("seqrec_blocks_")]
        assert blocks.count("ReduceMax") == 2, (name, blocks)  # one per mask branch
        assert [n.op_type for n in nodes].count("TopK") == 6, name  # 3 per branch
    rec = SessionRecommender.from_dir(out)
    rng = np.random.default_rng(0)
    int8 = variant.get("precision") == "int8_catalog"
    for length in (1, 2, 5, MAX_LEN, MAX_LEN + 3, 4):  # 4 after 1 and 2: cached steps too
        session = [str(1000 + int(i)) for i in rng.integers(1, num_items + 1, size=length)]
        for k in (1, 20, 700):  # 700 > 625 blocks: every block is a candidate
            got = rec.recommend(session, k=k)
            idxs = [int(i) - 1000 for i in session][-MAX_LEN:]
            with torch.inference_mode():
                ids = torch.from_numpy(encode_prefixes([idxs], MAX_LEN))
                scores = model.score_last(ids)[0, 1:].numpy()
            # each item scored as the model scores it, and the k best scores (near-ties between
            # onnxruntime's and PyTorch's rounding may swap items); int8 moves scores by up to
            # INT8_SCORE_ATOL, and the k-th best score by no more
            atol = INT8_SCORE_ATOL if int8 else 1e-5
            got_scores = np.array([r.score for r in got])
            own = scores[[int(r.item_id) - 1001 for r in got]]
            np.testing.assert_allclose(got_scores, own, atol=atol, rtol=0)
            best = -np.sort(-scores)[:k]
            np.testing.assert_allclose(got_scores, best, atol=atol, rtol=0)
            assert len({r.item_id for r in got}) == k
    # a block's maximum may leave a NaN score out (TopK ranks it first, which the load check
    # relies on otherwise): the dot model with one NaN row scored finite top-k lists at load
    # without the weights check (mutation checked), so damaged weights are refused by name
    damaged = nan_item_rows(out, tmp_path / "damaged", [5])
    with pytest.raises(ValueError, match=r"the weights 'model.item_emb.weight' hold 16 NaN or"):
        SessionRecommender.from_dir(damaged)
    # the metadata has no hash: saying "no blocks" does not turn the check off (review)
    edit_meta(damaged, {"top_k_block_size": None})
    with pytest.raises(ValueError, match=r"the weights 'model.item_emb.weight' hold 16 NaN or"):
        SessionRecommender.from_dir(damaged)


def test_predictor_sends_an_empty_mask_without_filters_and_ranks_the_same(inc_export) -> None:
    """The export records that its graphs take a (0, C) mask; a predictor told otherwise (as for
    exports written before the rewrite) sends the (1, C) PAD mask and returns the same items and
    scores, from whole sessions and from cached states."""
    _, out = inc_export
    rec = SessionRecommender.from_dir(out)
    assert rec.meta["empty_score_mask"] is True
    old_meta = {**rec.meta, "empty_score_mask": False}
    old = SessionRecommender.from_dir(out)
    old = SessionRecommender(
        old._session,
        old._item_ids,
        old_meta,
        old._step_session,
        StateCache(2**24),
        old._prefill_states,
    )
    assert rec._unfiltered_mask.shape == (0, NUM_ITEMS + 1)
    assert old._unfiltered_mask.shape == (1, NUM_ITEMS + 1)
    rng = np.random.default_rng(3)
    sessions = [_random_session(rng, int(n)) for n in rng.integers(2, MAX_LEN + 1, size=9)]
    for grow in (-1, 0):  # whole sessions minus their last item, then the next click (cached)
        batch = [s[: len(s) + grow] for s in sessions]
        got_rows, want_rows = rec.recommend_batch(batch, k=7), old.recommend_batch(batch, k=7)
        for got, want in zip(got_rows, want_rows, strict=True):
            assert [(r.item_id, r.score) for r in got] == [(r.item_id, r.score) for r in want]
        single = rec.recommend(batch[0], k=7)
        assert [(r.item_id, r.score) for r in single] == [
            (r.item_id, r.score) for r in old.recommend(batch[0], k=7)
        ]
    assert rec.state_cache_info()["hits"] > 0 and old.state_cache_info()["hits"] > 0


def test_exclude_seen_alone_ranks_as_the_dense_mask_without_sending_it(tmp_path: Path) -> None:
    """exclude_seen without allow/deny lists (the widget's request) asks the graph for the
    unmasked top (k + the most distinct seen items of a row) and drops each row's seen items;
    with an (empty) deny list the predictor sends the (B, C) -inf mask. Both give the same
    items and scores, ties included (items 21-30 copy the embeddings of items 11-20, so their
    generator scores tie), for k up to the catalog minus the seen items; beyond that the mask
    is sent, and when a session has seen more than ``top_k_max_seen`` distinct items (the top-k
    and the dropping would cost more than the mask). (The copy model: the shortcut itself is the
    same for every model.)"""
    model = _model(copy_mechanism=True)
    with torch.no_grad():
        model.item_emb.weight[21:31] = model.item_emb.weight[11:21]
    out = export_onnx(
        model,
        tiny_vocab(),
        tmp_path / "export",
        fallback_items=FALLBACK_ITEMS,
        variant=ExportVariant(top_k_in_graph=True, incremental=True),
    )
    rec = SessionRecommender.from_dir(out)
    sent: list[tuple[int, int]] = []  # (mask rows, k asked of the graph) of each graph call
    run_top_k = rec._run_top_k

    def recording(prefixes, mask, k_arr):  # type: ignore[no-untyped-def]
        sent.append((mask.shape[0], int(k_arr[0])))
        return run_top_k(prefixes, mask, k_arr)

    rec._run_top_k = recording  # type: ignore[method-assign]
    rng = np.random.default_rng(11)
    sessions = [_random_session(rng, int(n)) for n in (1, 2, 5, MAX_LEN, 2 * MAX_LEN)]
    sessions[1] = sessions[1][:1] * 2  # one distinct item, twice
    sessions.append(["1012", "unknown", "1025"])
    distinct = max(len(set(s) - {"unknown"}) for s in sessions)
    ties = 0
    for k, most_allowed in itertools.product(
        (1, 8, NUM_ITEMS - distinct, NUM_ITEMS - distinct + 1),
        (SessionRecommender.top_k_max_seen, 3),
    ):
        rec.top_k_max_seen = most_allowed  # 3: sessions of more distinct items get the mask
        for batch in (sessions, sessions[2:3], sessions[:2]):
            rec.clear_state_cache()
            sent.clear()
            got = rec.recommend_batch(batch, k=k, exclude_seen=True)
            rec.clear_state_cache()
            want = rec.recommend_batch(batch, k=k, exclude_seen=True, deny_items=[])
            assert got == want
            for recs, session in zip(got, batch, strict=True):
                assert not {r.item_id for r in recs} & set(session)
                ties += sum(a.score == b.score for a, b in itertools.pairwise(recs))
            most = max(len(set(s) - {"unknown"}) for s in batch)
            shortcut = k + most <= NUM_ITEMS and most <= most_allowed
            assert sent[0] == ((0, k + most) if shortcut else (len(batch), k)), (k, sent)
            assert sent[1] == (len(batch), k)
    assert ties > 0  # the tie rule was exercised


# --------------------------------------------------------------------------------- predictor


def test_growing_session_matches_the_whole_session_model(inc_export) -> None:
    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    assert rec.incremental
    session = _random_session(np.random.default_rng(3), MAX_LEN + 4)
    for n in range(1, len(session) + 1):
        exclude = n % 3 == 0
        got = rec.recommend(session[:n], k=8, exclude_seen=exclude)
        want_ids, want_scores = _eager(model, session[:n], 8, exclude)
        assert [r.item_id for r in got] == want_ids, n
        np.testing.assert_allclose([r.score for r in got], want_scores, rtol=1e-5, atol=1e-4)
    info = rec.state_cache_info()
    # n = 2..MAX_LEN extend the previous window; past MAX_LEN the window slides (whole runs)
    assert info["hits"] == MAX_LEN - 1
    assert info["misses"] == len(session) - MAX_LEN
    # one state per visit, and none for windows of max_len items (the next click slides them)
    assert info["entries"] == 0 and info["bytes"] == 0


class _CountingGraph:
    """A real onnxruntime session whose runs are counted (and the width of the past they got)."""

    def __init__(self, inner, key: str, runs: dict[str, int], pasts: list[int]) -> None:
        self.inner, self.key, self.runs, self.pasts = inner, key, runs, pasts

    def run(self, names, feed, *args, **kwargs):
        self.runs[self.key] += 1
        if "past_kv_0" in feed:
            self.pasts.append(feed["past_kv_0"].shape[2])
        return self.inner.run(names, feed, *args, **kwargs)

    def __getattr__(self, item: str):
        return getattr(self.inner, item)


def test_first_clicks_run_the_step_graph_with_no_past(inc_export) -> None:
    """A one-item session the cache does not hold (a shopper's first click) is scored by the
    step graph with a past of length 0, alone or in a batch, so a visit never runs the prefill
    graph (whose own copy of the catalog would push the step graph's out of the CPU cache); a
    single new session is scored by the step graph too, after the states graph; the answers are
    the model's."""
    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    runs, pasts = {"prefill": 0, "step": 0}, []
    rec._session = _CountingGraph(rec._session, "prefill", runs, pasts)
    rec._step_session = _CountingGraph(rec._step_session, "step", runs, pasts)
    rng = np.random.default_rng(11)
    firsts = [_random_session(rng, 1) for _ in range(3)]
    got = rec.recommend_batch(firsts, k=7)
    assert runs == {"prefill": 0, "step": 1} and pasts == [0]
    for session, recs in zip(firsts, got, strict=True):
        want_ids, want_scores = _eager(model, session, 7)
        assert [r.item_id for r in recs] == want_ids
        np.testing.assert_allclose([r.score for r in recs], want_scores, rtol=1e-5, atol=1e-4)
    # a visit: first click, then one more item per request: the step graph only
    visit = _random_session(rng, 5)
    for n in range(1, len(visit) + 1):
        recs = rec.recommend(visit[:n], k=7, exclude_seen=True)
        assert [r.item_id for r in recs] == _eager(model, visit[:n], 7, True)[0]
    assert runs == {"prefill": 0, "step": 6} and pasts == [0, 0, 1, 2, 3, 4]
    # a first click beside cached sessions: its past is left-padded in the same step call
    mixed = rec.recommend_batch([visit, _random_session(rng, 1)], k=7)
    assert runs == {"prefill": 0, "step": 7} and pasts[-1] == 4
    assert [r.item_id for r in mixed[0]] == _eager(model, visit, 7)[0]
    # one new session of two or more items: the states of its earlier items (the prefill
    # graph's states part, no catalog), then the step graph, whose catalog copy stays the one
    # read; two new sessions: the prefill graph, whole
    rec._prefill_states = _CountingGraph(rec._prefill_states, "states", runs, pasts)
    runs["states"] = 0
    new = [_random_session(rng, 4), _random_session(rng, 3)]
    recs = rec.recommend(new[0], k=7)
    assert runs == {"prefill": 0, "states": 1, "step": 8} and pasts[-1] == 3
    want_ids, want_scores = _eager(model, new[0], 7)
    assert [r.item_id for r in recs] == want_ids
    np.testing.assert_allclose([r.score for r in recs], want_scores, rtol=1e-5, atol=1e-4)
    rec.recommend_batch(new, k=7)  # new[0] is cached now: the states graph and the step graph
    assert runs == {"prefill": 0, "states": 2, "step": 9}
    rec.clear_state_cache()
    rec.recommend_batch(new, k=7)
    assert runs == {"prefill": 1, "states": 2, "step": 9}


def test_reload_and_going_back_reuse_states(inc_export) -> None:
    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    session = _random_session(np.random.default_rng(4), 6)
    for n in range(1, 6):
        rec.recommend(session[:n], k=5)
    first = rec.recommend(session[:5], k=5)  # a reload of the same page
    assert [r.item_id for r in first] == _eager(model, session[:5], 5)[0]
    info = rec.state_cache_info()
    assert info["hits"] == 5 and info["misses"] == 0 and info["entries"] == 1
    other = [*session[:4], session[5]]  # back one page, then another product
    assert [r.item_id for r in rec.recommend(other, k=5)] == _eager(model, other, 5)[0]


def test_a_batch_mixing_cached_and_new_sessions_is_scored_in_one_step_call(inc_export) -> None:
    """Beside cached sessions, new sessions get the states of their earlier items from the
    prefill graph's states part (cut out at load, no scoring) and every session is scored in one
    step-graph call; a batch of new sessions only still runs the whole prefill graph once. The
    answers are the model's, and the states graph's states are the prefill graph's (up to float32
    rounding)."""
    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    runs, pasts = {"prefill": 0, "states": 0, "step": 0}, []
    rec._session = _CountingGraph(rec._session, "prefill", runs, pasts)
    rec._prefill_states = _CountingGraph(rec._prefill_states, "states", runs, pasts)
    rec._step_session = _CountingGraph(rec._step_session, "step", runs, pasts)
    assert [o.name for o in rec._prefill_states.get_outputs()] == [
        o.name for o in rec._session.get_outputs()
    ][2:]
    rng = np.random.default_rng(12)
    cached = [_random_session(rng, n) for n in (3, 6)]
    rec.recommend_batch([s[:-1] for s in cached], k=4)  # new sessions only: the prefill graph
    assert runs == {"prefill": 1, "states": 0, "step": 0}
    new = [_random_session(rng, n) for n in (2, MAX_LEN + 2)]
    batch = [cached[0], new[0], cached[1], new[1], _random_session(rng, 1)]
    got = rec.recommend_batch(batch, k=6, exclude_seen=True)
    assert runs == {"prefill": 1, "states": 1, "step": 1}
    assert pasts == [MAX_LEN - 1]  # the longest past: the slid window of the long new session
    for session, recs in zip(batch, got, strict=True):
        want_ids, want_scores = _eager(model, session, 6, True)
        assert [r.item_id for r in recs] == want_ids
        np.testing.assert_allclose([r.score for r in recs], want_scores, rtol=1e-5, atol=1e-4)
    ids = encode_prefixes([[3, 5, 7], [2, 9, 4, 1]], MAX_LEN)
    whole = rec._session.inner.run(
        None,
        {
            "item_ids": ids,
            "score_mask": np.zeros((0, NUM_ITEMS + 1), np.float32),
            "k": np.array([2]),
        },
    )
    cut = rec._prefill_states.inner.run(None, {"item_ids": ids})
    for a, b in zip(whole[2:], cut, strict=True):  # onnxruntime may fuse the cut graph apart
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_batches_mixing_cached_and_new_sessions(inc_export) -> None:
    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    plain = SessionRecommender.from_dir(out, state_cache_mb=0)
    assert not plain.incremental and plain.state_cache_info() is None
    rng = np.random.default_rng(5)
    sessions = [_random_session(rng, n) for n in (1, 2, 5, 9, MAX_LEN, MAX_LEN + 3)]
    rec.recommend_batch([s[:-1] for s in sessions[::2] if len(s) > 1])  # cache some prefixes
    filters = [
        {},
        {"exclude_seen": True},
        {"deny_items": ["1003", "1017"]},
        {"allow_items": ["1002", "1005", "1011", "1029"]},
        {"allow_items": []},
    ]
    for kwargs in filters:
        got = rec.recommend_batch(sessions, k=6, **kwargs)
        want = plain.recommend_batch(sessions, k=6, **kwargs)
        for a, b in zip(got, want, strict=True):
            assert [r.item_id for r in a] == [r.item_id for r in b], kwargs
            np.testing.assert_allclose([r.score for r in a], [r.score for r in b], atol=1e-5)
    assert rec.state_cache_info()["hits"] > 0


def test_threads_sharing_one_recommender(inc_export) -> None:
    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    rng = np.random.default_rng(11)
    # distinct first items: sessions sharing a prefix share its cached state, and the first
    # shopper's next click drops it (one state per visit), so the other's hit would depend on
    # thread timing
    firsts = rng.permutation(NUM_ITEMS)[:16] + 1
    sessions = [[str(1000 + int(f)), *_random_session(rng, MAX_LEN - 1)] for f in firsts]
    want = {
        (s, n): _eager(model, sessions[s][:n], 5)[0]
        for s in range(len(sessions))
        for n in range(1, MAX_LEN + 1)
    }
    errors: list[str] = []
    lock = threading.Lock()

    def shopper(s: int) -> None:
        for n in range(1, MAX_LEN + 1):
            got = [r.item_id for r in rec.recommend(sessions[s][:n], k=5)]
            if got != want[(s, n)]:
                with lock:
                    errors.append(f"session {s}, {n} items")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(shopper, range(len(sessions))))
    assert errors == []
    assert rec.state_cache_info()["hits"] == len(sessions) * (MAX_LEN - 1)


def test_tiny_cache_evicts_and_stays_correct(inc_export) -> None:
    model, out = inc_export
    rec = SessionRecommender.from_dir(out, state_cache_mb=0.002)  # ~2 KiB: a few short states
    rng = np.random.default_rng(2)
    for _ in range(3):
        session = _random_session(rng, MAX_LEN)
        for n in range(1, MAX_LEN + 1):
            got = [r.item_id for r in rec.recommend(session[:n], k=5)]
            assert got == _eager(model, session[:n], 5)[0]
    info = rec.state_cache_info()
    assert info["bytes"] <= info["max_bytes"] and info["misses"] > 0


def test_tampered_step_graph_is_refused(inc_export, tmp_path: Path) -> None:
    _, out = inc_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    with open(copy / STEP_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(
        ArtifactIntegrityError, match=f"Copy model.onnx, item_vocab.json, {STEP_FILE}"
    ):
        SessionRecommender.from_dir(copy)
    assert not SessionRecommender.from_dir(copy, state_cache_mb=0).incremental  # step not used
    (copy / STEP_FILE).unlink()
    for verify in (True, False):
        with pytest.raises(FileNotFoundError, match=f"missing export file: .*{STEP_FILE}"):
            SessionRecommender.from_dir(copy, verify_integrity=verify)


def test_a_step_graph_that_scores_nan_is_named(inc_export, tmp_path: Path) -> None:
    """NaN weights in model_step.onnx alone were reported as model.onnx's."""
    _, out = inc_export
    damaged = nan_item_rows(out, tmp_path / "export", [1], graph=STEP_FILE)  # the checked item
    with pytest.raises(ValueError, match=rf"export/{STEP_FILE}: the model .* returned NaN"):
        SessionRecommender.from_dir(damaged)
    assert not SessionRecommender.from_dir(damaged, state_cache_mb=0).incremental  # not loaded


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": 1}, r"n_layers is 1 and d_model 16, but .*model.onnx has 2 block\(s\) of "
         "width 16"),
        ({"d_model": 32}, r"n_layers is 2 and d_model 32, but .*model.onnx has 2 block\(s\) of "
         "width 16"),
        ({"n_layers": 10**15}, r"n_layers is 1000000000000000 and d_model 16, but"),
        ({"max_len": MAX_LEN - 1}, rf"max_len is {MAX_LEN - 1}, but .*model.onnx also scores "
         rf"sessions of {MAX_LEN} items: the model's context is longer"),
        ({"variant.incremental": False}, r"variant.incremental is False, expected true \(the "
         r"metadata has an incremental section\)"),
        ({"format_version": 1}, "format_version is 1, expected 2: variants and step graphs came "
         "with format 2"),
        ({"n_heads": 3}, r"n_heads is 3, but .*model.onnx has 2 attention heads"),
        ({"variant.precision": "fp16"}, r"variant.precision is 'fp16', expected 'fp32' or "
         r"'int8_catalog' \(an incremental export\)"),
    ],
)  # fmt: skip
def test_metadata_that_misdescribes_the_graphs_is_refused(
    inc_export, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    """n_layers / d_model are compared with the states the graph returns (a wrong n_layers
    was accepted, and 10**15 was blamed on state_cache_mb); a max_len below the model's context
    (sessions silently cut short) and contradicting variant / format keys are refused."""
    _, out = inc_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    with pytest.raises(ValueError, match=message):
        SessionRecommender.from_dir(edit_meta(copy, changes))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "finite number >= 0"),
        (float("nan"), "finite number >= 0"),
        (float("inf"), "finite number >= 0"),
        ("64", "finite number >= 0"),
        (True, "finite number >= 0"),
        (1e-7, "cannot hold the state of a single item"),
    ],
)
def test_bad_state_cache_sizes_are_refused(inc_export, value: object, message: str) -> None:
    _, out = inc_export
    with pytest.raises(ValueError, match=message):
        SessionRecommender.from_dir(out, state_cache_mb=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- copy mixture maths


def _copy_reference(model: SASRec, item_ids: torch.Tensor) -> torch.Tensor:
    """The copy mixture in probability space, as first written: log(g * softmax + (1-g) * ptr)."""
    states = model(item_ids)
    last = states[:, -1]
    logits = last @ model.item_emb.weight[1:].t()
    gate = torch.sigmoid(model.copy_gate(last))
    att = (model.copy_key(states) @ model.copy_query(last).unsqueeze(-1)).squeeze(-1)
    att = att / model.cfg.d_model**0.5
    is_last = torch.arange(item_ids.shape[1]) == item_ids.shape[1] - 1
    allowed = (item_ids != 0) | is_last
    alpha = torch.softmax(att.masked_fill(~allowed, torch.finfo(att.dtype).min), dim=-1)
    pointer = torch.zeros(item_ids.shape[0], logits.shape[1] + 1, dtype=torch.float64)
    pointer = pointer.scatter_add(1, item_ids, alpha.double())[:, 1:]
    probs = gate.double() * torch.softmax(logits.double(), -1) + (1 - gate.double()) * pointer
    return torch.log(probs)


def test_log_space_copy_mixture_equals_probability_space() -> None:
    model = _model(True)
    ids = torch.randint(1, NUM_ITEMS + 1, (6, 9), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = 0
    ids[1, :8] = 0  # one item
    ids[2, 2] = ids[2, 5] = ids[2, 8]  # a repeated item, also the last one
    with torch.inference_mode():
        got = model.score_last(ids)[:, 1:].double()
        want = _copy_reference(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(6, dtype=torch.float64))


def test_copy_mixture_stays_finite_for_extreme_gates() -> None:
    model = _model(True)
    ids = torch.randint(1, NUM_ITEMS + 1, (2, 5), generator=torch.Generator().manual_seed(1))
    for bias in (-200.0, 200.0):
        with torch.no_grad():
            model.copy_gate.bias.fill_(bias)
        with torch.inference_mode():
            scores = model.score_last(ids)[:, 1:]
        assert torch.isfinite(scores).all(), bias
        seen = torch.zeros(2, NUM_ITEMS, dtype=torch.bool).scatter(1, ids - 1, True)
        if bias < 0:  # gate ~ 0: all mass on the session's items
            torch.testing.assert_close(
                scores.exp()[seen].sum(), torch.tensor(2.0), atol=1e-4, rtol=0
            )
        else:  # gate ~ 1: the plain softmax
            states = model(ids)
            logits = states[:, -1] @ model.item_emb.weight[1:].t()
            torch.testing.assert_close(scores, torch.log_softmax(logits, -1), atol=1e-4, rtol=0)


def test_service_serves_a_growing_session_from_the_cache(inc_export) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from _serving_helpers import running_server
    from seqrec.serving.app import create_app

    model, out = inc_export
    rec = SessionRecommender.from_dir(out)
    session = _random_session(np.random.default_rng(8), 6)
    with (
        running_server(create_app(rec)) as url,
        httpx.Client(base_url=url, timeout=10.0) as http,
    ):
        for n in range(1, len(session) + 1):
            body = {"session": session[:n], "k": 4, "exclude_seen": True}
            items = http.post("/recommendations", json=body).json()["items"]
            assert [i["item_id"] for i in items] == _eager(model, session[:n], 4, True)[0]
        metrics = {
            sample.name: sample.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for sample in family.samples
        }
    # create_app's warm-up requests (both graphs) leave no state and no count behind
    assert metrics["seqrec_state_cache_hits_total"] == len(session) - 1
    assert metrics["seqrec_state_cache_misses_total"] == 0
    assert metrics["seqrec_state_cache_entries"] == 1  # this visit only
    assert metrics["seqrec_state_cache_bytes"] > 0


def test_service_warm_up_runs_every_graph_and_leaves_the_cache_empty(inc_export) -> None:
    from seqrec.serving.app import create_app

    _, out = inc_export
    rec = SessionRecommender.from_dir(out)
    runs = {"prefill": 0, "states": 0, "step": 0}
    for name, attr in (
        ("prefill", "_session"),
        ("states", "_prefill_states"),
        ("step", "_step_session"),
    ):
        graph = getattr(rec, attr)

        class Counting:  # the real onnxruntime session, its runs counted
            def __init__(self, inner, key: str) -> None:
                self.inner, self.key = inner, key

            def run(self, *args, **kwargs):
                runs[self.key] += 1
                return self.inner.run(*args, **kwargs)

            def __getattr__(self, item: str):
                return getattr(self.inner, item)

        setattr(rec, attr, Counting(graph, name))
    create_app(rec)
    assert runs == {"prefill": 1, "states": 1, "step": 2}
    info = rec.state_cache_info()
    assert (info["hits"], info["misses"], info["entries"], info["bytes"]) == (0, 0, 0, 0)


def test_latency_benchmark_times_the_real_step_graph_and_catalog_matmul(inc_export) -> None:
    """The breakdown rows of scripts/bench_latency.py: its step-graph inputs fit the exported step
    graph, and its one-node matmul computes the graph's catalog scores (h @ E[1:]^T)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_latency

    model, out = inc_export
    step = SessionRecommender.from_dir(out)._step_session
    feeds = bench_latency.step_graph_feeds(step, NUM_ITEMS, 3, MAX_LEN - 1, 5)
    assert set(feeds) == {arg.name for arg in step.get_inputs()}
    assert feeds["item_ids"].shape == (3, MAX_LEN) and feeds["item_ids"].min() >= 1
    top_scores, top_idx = step.run(None, feeds)[:2]
    assert top_scores.shape == (3, 5) and np.isfinite(top_scores).all()
    assert ((top_idx >= 1) & (top_idx <= NUM_ITEMS)).all()  # PAD is masked out

    table = model.item_emb.weight.detach().numpy()
    matmul = bench_latency.catalog_matmul_session(table, threads=1)
    hidden = np.random.default_rng(0).standard_normal((2, table.shape[1])).astype(np.float32)
    (scores,) = matmul.run(None, {"hidden": hidden})
    np.testing.assert_allclose(scores, hidden @ table[1:].T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- int8 catalog


def _catalog_graph(path: Path, weights: np.ndarray) -> None:
    """An ONNX graph ``scores = hidden @ catalog`` with ``weights`` (D, N) as the initializer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dim, cols = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", CATALOG_NAME], ["scores"])],
        "catalog",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", dim])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", cols])],
        [numpy_helper.from_array(weights, CATALOG_NAME)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _branch_ops(proto, name_prefix: str = "seqrec_catalog_") -> dict[str, list[str]]:
    """Operator types of each branch of the one ``If`` whose branches are named ``name_prefix``."""
    (node,) = [
        n
        for n in proto.graph.node
        if n.op_type == "If" and n.attribute[0].g.name.startswith(name_prefix)
    ]
    return {a.name: [n.op_type for n in a.g.node] for a in node.attribute}


def test_quantize_catalog_computes_the_int8_formula(tmp_path: Path) -> None:
    """scores = (round(h / s) @ Wq) * s * col_scale with s = max|h| / 63 per row (7-bit
    activations) and Wq = round(W / col_scale), col_scale = max|W[:, j]| / 127, written out in
    numpy."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 50)).astype(np.float32)
    weights[:, 7] = 0.0  # an all-zero item column
    path = tmp_path / "catalog.onnx"
    _catalog_graph(path, weights)
    report = quantize_catalog(path)
    proto = onnx.load(str(path))
    assert CATALOG_NAME not in {t.name for t in proto.graph.initializer}
    # one row: MatMulInteger; batches: the fused MatMulIntegerToFloat, chosen by an If on B;
    # the row scales are its a_scale (scaled in place, no Mul of their own)
    assert _branch_ops(proto) == {
        "then_branch": ["MatMulInteger", "Cast", "Mul", "Mul"],
        "else_branch": ["MatMulIntegerToFloat"],
    }
    (if_node,) = [n for n in proto.graph.node if n.op_type == "If"]
    batch_branch = next(a.g for a in if_node.attribute if a.name == "else_branch")
    assert batch_branch.node[0].input[2] == "seqrec_catalog_row_scale"
    col_scale = np.abs(weights).max(axis=0) / 127.0
    col_scale[7] = 1.0
    quantized = np.clip(np.rint(weights / col_scale), -127, 127)
    assert report["catalog_shape"] == [8, 50]
    assert report["max_abs_weight_error"] == pytest.approx(
        float(np.abs(weights - quantized * col_scale).max()), rel=1e-6
    )
    assert report["max_abs_weight_error"] <= col_scale.max() / 2 + 1e-7

    hidden = rng.standard_normal((4, 8)).astype(np.float32)
    hidden[2] = 0.0  # an all-zero hidden row scores 0, not NaN
    hidden[3] *= 1e-3  # a small row keeps its own scale
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"hidden": hidden})
    row_scale = np.maximum(np.abs(hidden).max(axis=1, keepdims=True), 1e-30) / 63.0
    want = (np.rint(hidden / row_scale) @ quantized) * row_scale * col_scale
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert (got[2] == 0).all() and (got[:, 7] == 0).all()
    for row in range(len(hidden)):  # one row at a time takes the other branch: same numbers
        (alone,) = session.run(None, {"hidden": hidden[row : row + 1]})
        np.testing.assert_allclose(alone[0], got[row], rtol=1e-6, atol=0)
    exact = hidden @ weights  # and it is close to the float32 product
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


def test_quantize_catalog_is_exact_where_int16_pair_sums_would_saturate(tmp_path: Path) -> None:
    """Regression: with 8-bit activations (uint8 up to 255) x86 kernels without VNNI (AVX2's
    vpmaddubsw) add two u8 x s8 products in a saturating int16 (255 * 127 * 2 > 32,767), and an
    AMD EPYC AVX2 machine returned wrong scores for 6.8% of a random product. Rows and columns
    at full scale with equal signs make every pair sum as large as it can be: the graph must
    still give the integer product exactly (on every CPU; 7-bit activations cap a pair at
    2 * 127 * 127 = 32,258)."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    dim, cols = 64, 40
    weights = np.where(rng.random((dim, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
    weights[:, : cols // 2] = 1.0  # columns of +1: every product positive, pair sums largest
    path = tmp_path / "catalog.onnx"
    _catalog_graph(path, weights)
    quantize_catalog(path)  # col_scale = 1 / 127: Wq = +-127
    hidden = np.ones((3, dim), dtype=np.float32)  # quantised to the largest level of each row
    hidden[1] = -1.0
    hidden[2, ::2] = 0.5  # levels 32 and 63
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    row_scale = np.abs(hidden).max(axis=1, keepdims=True) / 63.0
    levels = np.rint(hidden / row_scale)  # (3, 64) in [-63, 63]
    want = (levels @ np.rint(weights * 127.0)) * row_scale / 127.0  # the int8 formula, exactly
    assert want[0, 0] == pytest.approx(64.0)  # and what it means: 64 products of 1 x 1
    (batch,) = session.run(None, {"hidden": hidden})
    np.testing.assert_allclose(batch, want, rtol=1e-6, atol=1e-6)
    for row in range(len(hidden)):  # the one-row branch (MatMulInteger) as well
        (alone,) = session.run(None, {"hidden": hidden[row : row + 1]})
        np.testing.assert_allclose(alone[0], want[row], rtol=1e-6, atol=1e-6)


def test_quantize_catalog_needs_the_catalog_initializer(tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    _catalog_graph(path, np.ones((2, 3), dtype=np.float32))
    text = path.read_bytes().replace(CATALOG_NAME.encode(), b"weights")
    path.write_bytes(text)
    with pytest.raises(ValueError, match="'catalog' feeding one MatMul"):
        quantize_catalog(path)


def test_int8_catalog_needs_an_incremental_export() -> None:
    with pytest.raises(ValueError, match=r"incremental exports only.*'fp32'.*precision=fp32"):
        ExportVariant(top_k_in_graph=True, precision="int8_catalog")
    assert ExportVariant(top_k_in_graph=True, precision="int8_catalog", incremental=True)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory):
    model = _model(True)
    out = export_onnx(
        model,
        tiny_vocab(),
        tmp_path_factory.mktemp("incremental_int8") / "export",
        fallback_items=FALLBACK_ITEMS,
        variant=ExportVariant(top_k_in_graph=True, incremental=True, precision="int8_catalog"),
    )
    return model, out


def test_int8_catalog_export_is_validated_and_recorded(int8_export) -> None:
    import onnx

    model, out = int8_export
    meta = json.loads((out / "export_meta.json").read_text())
    assert meta["variant"]["precision"] == "int8_catalog"
    assert meta["validation"]["max_abs_diff"] <= 1e-4  # the float32 graphs, before quantising
    assert "before quantize_catalog" in meta["validation"]["graphs_checked"]
    int8 = meta["incremental"]["validation"]["int8_catalog"]
    assert int8["catalog_shape"] == [model.cfg.d_model, NUM_ITEMS]
    assert int8["validation"]["reference"] == "prefill"
    assert int8["validation"]["max_state_diff"] <= 1e-4  # states stay float32
    assert int8["validation"]["max_abs_diff"] <= int8["validation"]["score_atol"]
    assert meta["quality"]["top_k_overlap_mean"] >= 0.9
    assert meta["empty_score_mask"] is True
    assert meta["int8_saturation_safe"] is True  # 7-bit hidden states (quantize_catalog)
    for name in ("model.onnx", STEP_FILE):
        proto = onnx.load(str(out / name))
        assert _branch_ops(proto)["else_branch"] == ["MatMulIntegerToFloat"], name
        assert CATALOG_NAME not in {t.name for t in proto.graph.initializer}, name


def test_predictor_warns_about_int8_exports_from_before_the_7_bit_fix(
    int8_export, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An int8 export without ``int8_saturation_safe`` rounds hidden states to 8 bits, which
    x86 CPUs without VNNI multiply wrongly: it still loads (the hashes do not cover the
    metadata), with a warning that says to re-export; a current export loads silently."""
    _, out = int8_export
    with caplog.at_level(logging.WARNING, logger="seqrec.predictor"):
        SessionRecommender.from_dir(out)
    assert "Re-export" not in caplog.text
    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / "export_meta.json").read_text())
    del meta["int8_saturation_safe"]
    (old / "export_meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="seqrec.predictor"):
        assert SessionRecommender.from_dir(old).recommend(["1001"], k=3)
    assert "int8_catalog export was made before seqrec kept one side" in caplog.text
    assert "without VNNI" in caplog.text and "Re-export the model" in caplog.text


def _with_step(src: Path, dst: Path, step: Path, scale: str | None = None) -> Path:
    """Copy export ``src`` to ``dst`` with ``step`` as its step graph (the initializer named
    ``scale`` multiplied by 1.5: other weights) and the step's sha256 updated."""
    shutil.copytree(src, dst)
    model = onnx.load(step)
    if scale is not None:
        (init,) = [i for i in model.graph.initializer if i.name == scale]
        init.CopyFrom(numpy_helper.from_array(1.5 * numpy_helper.to_array(init), scale))
    onnx.save(model, dst / STEP_FILE)
    return rehash(dst, STEP_FILE)


def test_a_step_graph_from_another_export_is_refused(inc_export, tmp_path: Path) -> None:
    """A step graph of other weights (hash updated) loaded, and the second click of every
    session was scored by another model than the first (helper-30)."""
    _, out = inc_export
    mixed = _with_step(out, tmp_path / "export", out / STEP_FILE, "model.blocks.0.ln_attn.weight")
    with pytest.raises(
        ValueError,
        match=rf"export/{STEP_FILE} and .*export/model.onnx come from different exports: a "
        rf"session of {MAX_LEN - 1} items computed by the step graph from its first "
        rf"{MAX_LEN - 2} differs from the same session computed whole by up to [0-9.e-]+ in "
        r"its states \(keys and values\)",
    ):
        SessionRecommender.from_dir(mixed)
    assert not SessionRecommender.from_dir(mixed, state_cache_mb=0).incremental  # not used
    assert SessionRecommender.from_dir(out).incremental  # the export's own pair passes


def test_a_step_graph_with_the_same_states_and_other_scores_is_refused(
    int8_export, tmp_path: Path
) -> None:
    """A step graph whose catalog scales are 1.5x the export's (hash updated): the same states,
    other scores. The load check scores the session whole with the prefill graph, not with the
    states graph and the step graph that serve one new session (which would agree with the step
    graph it checks), and refuses it (helper-42)."""
    _, out = int8_export
    mixed = _with_step(out, tmp_path / "export", out / STEP_FILE, "seqrec_catalog_col_scale")
    with pytest.raises(ValueError, match=r"come from different exports: .* in its top-10 scores"):
        SessionRecommender.from_dir(mixed)


@pytest.mark.parametrize("inc_export", [True], indirect=True, ids=["copy"])
def test_step_scores_are_compared_with_the_int8_tolerance(
    inc_export, int8_export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The float32 step graph of the same model in the int8-catalog export has the same states;
    its scores differ from the int8 whole graph's by less than one int8 rounding step
    (INT8_SCORE_ATOL, the export's own tolerance: a tighter bound would refuse honest int8
    exports whose check session rounds one value the other way) and it loads; with a
    tolerance below its gap the scores are named."""
    mixed = _with_step(int8_export[1], tmp_path / "export", inc_export[1] / STEP_FILE)
    assert SessionRecommender.from_dir(mixed).incremental
    assert SessionRecommender.from_dir(int8_export[1]).incremental
    # measured: states 9e-8 apart, top-10 scores 0.004 (below 0.05, the int8 bound)
    monkeypatch.setattr(predictor_mod, "INT8_SCORE_ATOL", 1e-3)
    monkeypatch.setattr(predictor_mod, "STEP_CHECK_TOLERANCE", 1e-5)
    with pytest.raises(ValueError, match=r"come from different exports: .* in its top-10 scores"):
        SessionRecommender.from_dir(mixed)


def test_int8_catalog_predictor_ranks_like_the_model(int8_export) -> None:
    """Next clicks from cached states, whole sessions and eager PyTorch agree: same items, scores
    within the quantisation error."""
    model, out = int8_export
    rec = SessionRecommender.from_dir(out)
    plain = SessionRecommender.from_dir(out, state_cache_mb=0)
    session = _random_session(np.random.default_rng(6), MAX_LEN)
    overlaps = []
    for n in range(1, len(session) + 1):
        got = rec.recommend(session[:n], k=8)
        whole = plain.recommend(session[:n], k=8)
        assert [r.item_id for r in got] == [r.item_id for r in whole], n
        np.testing.assert_allclose(
            [r.score for r in got], [r.score for r in whole], atol=INT8_SCORE_ATOL
        )
        want_ids, want_scores = _eager(model, session[:n], 8)
        overlaps.append(len(set(want_ids) & {r.item_id for r in got}) / 8)
        np.testing.assert_allclose(sorted(r.score for r in got), sorted(want_scores), atol=0.03)
    assert rec.state_cache_info()["hits"] == MAX_LEN - 1
    assert np.mean(overlaps) >= 0.95
