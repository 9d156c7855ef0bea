"""ONNX export: onnxruntime matches eager PyTorch, metadata is complete, failures are loud."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import seqrec.export as export_mod
from _export_helpers import MAX_LEN, NUM_ITEMS, TinyExport, tiny_export, tiny_model, tiny_vocab
from seqrec.export import (
    ExportValidationError,
    ExportVariant,
    ScoringModel,
    export_onnx,
    validate_onnx,
)
from seqrec.predictor import SessionRecommender
from seqrec.sequence import encode_prefixes

META_KEYS = {
    "format_version",
    "max_len",
    "num_items",
    "pad_idx",
    "opset",
    "exporter",
    "input_name",
    "output_name",
    "d_model",
    "n_layers",
    "n_heads",
    "fallback_items",
    "validation",
    "created_utc",
    "dataset",
    "source_checkpoint",
    "test_metrics",
    "model_version",
    "input_names",
    "output_names",
    "variant",
    "quality",
    "sha256",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def ort_session(exported: TinyExport) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _both(exported: TinyExport, session: ort.InferenceSession, item_ids: np.ndarray):
    got = session.run(["scores"], {"item_ids": item_ids})[0]
    with torch.inference_mode():
        want = exported.model.score_last(torch.from_numpy(item_ids)).numpy()
    return got, want


def test_export_writes_files_and_metadata(exported: TinyExport) -> None:
    out = exported.export_dir
    assert {p.name for p in out.iterdir()} == {"model.onnx", "item_vocab.json", "export_meta.json"}
    meta = json.loads((out / "export_meta.json").read_text())
    assert set(meta) >= META_KEYS
    assert meta["exporter"] == "dynamo"
    assert "exporter_fallback_reason" not in meta
    assert meta["opset"] == 18
    assert (meta["max_len"], meta["num_items"], meta["pad_idx"]) == (MAX_LEN, NUM_ITEMS, 0)
    assert (meta["input_name"], meta["output_name"]) == ("item_ids", "scores")
    assert meta["validation"]["top10_identical"] is True
    assert meta["validation"]["max_abs_diff"] <= 1e-4
    assert [1, 1] in meta["validation"]["batches_checked"]
    assert [1, MAX_LEN] in meta["validation"]["batches_checked"]
    assert meta["fallback_items"] == ["1003", "1001", "1007", "1002", "1010"]
    assert exported.vocab.item_ids == json.loads((out / "item_vocab.json").read_text())["item_ids"]
    # no temporary directory left next to the export
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_graph_has_named_dynamic_axes(ort_session: ort.InferenceSession) -> None:
    (inp,), (out,) = ort_session.get_inputs(), ort_session.get_outputs()
    assert (inp.name, inp.type) == ("item_ids", "tensor(int64)")
    assert (out.name, out.type) == ("scores", "tensor(float)")
    assert all(isinstance(dim, str) for dim in inp.shape)  # batch and seq_len are symbolic
    assert isinstance(out.shape[0], str) and out.shape[1] == NUM_ITEMS + 1


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, MAX_LEN), (3, 7), (64, MAX_LEN), (1, 5), (7, 5), (7, MAX_LEN)]
)
def test_onnxruntime_matches_eager(
    exported: TinyExport, ort_session: ort.InferenceSession, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(sum(shape))
    item_ids = rng.integers(1, NUM_ITEMS + 1, size=shape, dtype=np.int64)
    got, want = _both(exported, ort_session, item_ids)
    assert got.shape == want.shape == (shape[0], NUM_ITEMS + 1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=1e-4)
    assert (got[:, 0] <= -1e30).all() and (want[:, 0] <= -1e30).all()


def test_left_padded_batch_is_finite_and_matches(
    exported: TinyExport, ort_session: ort.InferenceSession
) -> None:
    item_ids = np.array([[0, 0, 0, 0, 5], [0, 0, 3, 4, 5]], dtype=np.int64)
    got, want = _both(exported, ort_session, item_ids)
    assert np.isfinite(got).all() and np.isfinite(want).all()
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=1e-4)
    # extra left padding changes nothing: [5] alone scores like [0, 0, 0, 0, 5]
    single, _ = _both(exported, ort_session, np.array([[5]], dtype=np.int64))
    np.testing.assert_allclose(single[0, 1:], got[0, 1:], rtol=0, atol=1e-5)


def test_mixed_lengths_padded_by_encode_prefixes(
    exported: TinyExport, ort_session: ort.InferenceSession
) -> None:
    sessions = [[7], list(range(1, MAX_LEN + 1)), [3, 9, 2], list(range(1, MAX_LEN + 6))]
    item_ids = encode_prefixes(sessions, MAX_LEN, pad_to_longest=False)
    got, want = _both(exported, ort_session, item_ids)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=1e-4)


def test_validate_onnx_report(exported: TinyExport) -> None:
    report = validate_onnx(exported.model, exported.export_dir / "model.onnx", seed=3)
    assert report["top10_identical"] is True
    assert report["max_abs_diff"] <= 1e-4
    assert report["atol"] == 1e-4
    assert len(report["batches_checked"]) >= 6


def test_validate_onnx_rejects_other_weights(exported: TinyExport) -> None:
    other = tiny_model(seed=1)
    with pytest.raises(ExportValidationError, match=r"batch \[\d+, \d+\]"):
        validate_onnx(other, exported.export_dir / "model.onnx")


def test_scoring_model_is_score_last(exported: TinyExport) -> None:
    item_ids = torch.tensor([[0, 2, 3], [1, 1, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(
            ScoringModel(exported.model)(item_ids), exported.model.score_last(item_ids)
        )


def test_legacy_fallback_and_update_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_dynamo(*args: object) -> None:
        raise RuntimeError("dynamo exporter unavailable")

    monkeypatch.setitem(export_mod._EXPORTERS, "dynamo", broken_dynamo)
    out = tmp_path / "export"
    out.mkdir()
    (out / "NOTES.txt").write_text("keep me")
    (out / "export_meta.json").write_text("{}")
    model = tiny_model(num_items=5).train()
    export_onnx(model, tiny_vocab(5), out, fallback_items=[1002])
    meta = json.loads((out / "export_meta.json").read_text())
    assert meta["exporter"] == "legacy"
    assert "dynamo exporter unavailable" in meta["exporter_fallback_reason"]
    assert meta["fallback_items"] == ["1002"]
    assert (out / "NOTES.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert model.training is True  # exported in eval mode, caller's mode restored


def test_dynamo_is_tried_first_whatever_the_registry_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test that removes and restores the dynamo entry re-inserts it last in the dict; the
    exporters must still be tried dynamo first (this once made the test above depend on the
    order in which test files ran)."""

    def broken_dynamo(*args: object) -> None:
        raise RuntimeError("dynamo exporter unavailable")

    reordered = {"legacy": export_mod._EXPORTERS["legacy"], "dynamo": broken_dynamo}
    monkeypatch.setattr(export_mod, "_EXPORTERS", reordered)
    out = tmp_path / "export"
    export_onnx(tiny_model(num_items=5), tiny_vocab(5), out, fallback_items=[1002])
    meta = json.loads((out / "export_meta.json").read_text())
    assert meta["exporter"] == "legacy"
    assert "dynamo exporter unavailable" in meta["exporter_fallback_reason"]


def test_failed_validation_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_validate(*args: object, **kwargs: object) -> dict:
        raise ExportValidationError("batch [1, 1]: scores differ")

    def quick_legacy_only(*args: object) -> None:
        raise RuntimeError("skip dynamo")

    monkeypatch.setattr(export_mod, "validate_onnx", failing_validate)
    monkeypatch.setitem(export_mod._EXPORTERS, "dynamo", quick_legacy_only)
    out = tmp_path / "export"
    with pytest.raises(ExportValidationError, match="no exporter produced a valid ONNX graph"):
        export_onnx(tiny_model(num_items=5), tiny_vocab(5), out)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_bad_inputs_raise_before_exporting(tmp_path: Path) -> None:
    model = tiny_model(num_items=5)
    with pytest.raises(ValueError, match="fallback item"):
        export_onnx(model, tiny_vocab(5), tmp_path / "a", fallback_items=["1001", "9999"])
    with pytest.raises(ValueError, match="vocab has 6 items"):
        export_onnx(model, tiny_vocab(6), tmp_path / "b")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------ variants


def _examples(num: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in rng.integers(1, 2 * MAX_LEN, num)]
    return prefixes, rng.integers(1, NUM_ITEMS + 1, size=num)


def _legacy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(export_mod._EXPORTERS, "dynamo")  # < 1 s per export


def test_default_variant_metadata(exported: TinyExport) -> None:
    meta = json.loads((exported.export_dir / "export_meta.json").read_text())
    assert meta["format_version"] == 2
    assert meta["variant"] == {
        "top_k_in_graph": False,
        "precision": "fp32",
        "graph_optimization_level": "all",
        "min_top_k_overlap": 0.9,
        "incremental": False,
    }
    assert (meta["input_names"], meta["output_names"]) == (["item_ids"], ["scores"])
    assert meta["quality"]["top_k_overlap_mean"] == 1.0
    assert meta["quality"]["source"] == "random sessions"
    assert set(meta["sha256"]) == {"model.onnx", "item_vocab.json"}


@pytest.mark.parametrize(
    "variant",
    [
        ExportVariant(top_k_in_graph=True),
        ExportVariant(precision="fp16"),
        ExportVariant(precision="int8", min_top_k_overlap=0.5),
        ExportVariant(precision="int8", top_k_in_graph=True, min_top_k_overlap=0.5),
    ],
    ids=["fp32-topk", "fp16", "int8", "int8-topk"],
)
def test_variants_report_overlap_and_metric_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: ExportVariant
) -> None:
    _legacy_only(monkeypatch)
    model, vocab = tiny_model(), tiny_vocab()
    out = export_onnx(
        model,
        vocab,
        tmp_path / "export",
        fallback_items=["1001"],
        variant=variant,
        quality_examples=_examples(300),
        quality_k=10,
    )
    meta = json.loads((out / "export_meta.json").read_text())
    quality = meta["quality"]
    assert meta["variant"]["precision"] == variant.precision
    assert quality["source"] == "validation examples" and quality["num_examples"] == 300
    assert quality["k"] == 10
    assert variant.min_top_k_overlap <= quality["top_k_overlap_mean"] <= 1.0
    assert set(quality["metric_change"]) == {"recall@10", "mrr@10", "ndcg@10"}
    for name, change in quality["metric_change"].items():
        want = quality["metrics_onnx"][name] - quality["metrics_pytorch"][name]
        assert change == pytest.approx(want)
    if variant.precision == "fp32":
        assert quality["top_k_overlap_mean"] == 1.0
        assert all(change == 0.0 for change in quality["metric_change"].values())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == meta["input_names"]
    assert [o.name for o in session.get_outputs()] == meta["output_names"]
    # the predictor serves every variant
    recs = SessionRecommender.from_dir(out).recommend(["1001", "1002"], k=5, exclude_seen=True)
    assert len(recs) == 5 and not {"1001", "1002"} & {r.item_id for r in recs}


def test_top_k_graph_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _legacy_only(monkeypatch)
    model = tiny_model()
    out = export_onnx(
        model, tiny_vocab(), tmp_path / "e", variant=ExportVariant(top_k_in_graph=True)
    )
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    item_ids = np.array([[0, 0, 3, 4], [5, 6, 7, 8]], dtype=np.int64)
    mask = np.zeros((2, NUM_ITEMS + 1), dtype=np.float32)
    mask[:, 0] = -np.inf
    mask[1, 8] = -np.inf
    top_scores, top_idx = session.run(
        None, {"item_ids": item_ids, "score_mask": mask, "k": np.array([NUM_ITEMS], dtype=np.int64)}
    )
    assert top_scores.shape == top_idx.shape == (2, NUM_ITEMS)
    with torch.inference_mode():
        want = model.score_last(torch.from_numpy(item_ids)).numpy()
    is_kept = top_scores > -np.inf  # excluded items can only fill the tail of a row
    assert is_kept.sum(axis=1).tolist() == [NUM_ITEMS, NUM_ITEMS - 1]
    assert 0 not in top_idx[is_kept]  # PAD never ranks
    assert 8 not in top_idx[1][is_kept[1]] and 8 in top_idx[0]  # per-row mask
    top_scores, top_idx = top_scores[:, :-1], top_idx[:, :-1]
    np.testing.assert_allclose(top_scores, np.take_along_axis(want, top_idx, 1), atol=1e-5)
    assert (np.diff(top_scores, axis=1) <= 0).all()  # best first


def test_low_overlap_variant_fails_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _legacy_only(monkeypatch)
    monkeypatch.setattr(export_mod, "_convert_precision", _shuffled_copy)
    with pytest.raises(
        ExportValidationError,
        match=r"int8 variant .* mean top-20 overlap with PyTorch 0\.\d+ < 0\.9",
    ):
        export_onnx(
            tiny_model(), tiny_vocab(), tmp_path / "export", variant=ExportVariant(precision="int8")
        )
    assert os.listdir(tmp_path) == []


def _shuffled_copy(src: Path, dst: Path, precision: str) -> None:
    """A 'quantised' graph whose item table rows are permuted: it ranks the wrong items."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == 2 and NUM_ITEMS in array.shape:
            axis = array.shape.index(NUM_ITEMS)
            init.CopyFrom(numpy_helper.from_array(np.flip(array, axis=axis).copy(), init.name))
    onnx.save(proto, str(dst))


def test_bad_variant_names() -> None:
    with pytest.raises(ValueError, match="precision"):
        ExportVariant(precision="int4")
    with pytest.raises(ValueError, match="graph_optimization_level"):
        ExportVariant(graph_optimization_level="max")


def test_last_position_graph_equals_score_last() -> None:
    model = tiny_model()
    rng = np.random.default_rng(0)
    item_ids = rng.integers(1, NUM_ITEMS + 1, size=(64, MAX_LEN))
    item_ids[0] = 0  # all padding
    item_ids[1, :-1] = 0  # one item
    item_ids[2, : MAX_LEN // 2] = 0
    batch = torch.from_numpy(item_ids)
    fast = ScoringModel(model, "last_position")
    assert fast.last_position_only
    with torch.inference_mode():
        want = model.score_last(batch)
        torch.testing.assert_close(fast(batch)[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ScoringModel(model, "dot")(batch)[:, 1:], want[:, 1:])
    assert (fast(batch)[:, 0] == torch.finfo(torch.float32).min).all()


def test_broken_last_position_graph_falls_back_to_full_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _legacy_only(monkeypatch)
    real_last_hidden = ScoringModel._last_hidden

    def off_by_a_bit(self: ScoringModel, item_ids: torch.Tensor) -> torch.Tensor:
        return real_last_hidden(self, item_ids) * 1.01

    monkeypatch.setattr(ScoringModel, "_last_hidden", off_by_a_bit)
    out = export_onnx(tiny_model(), tiny_vocab(), tmp_path / "export")
    meta = json.loads((out / "export_meta.json").read_text())
    assert meta["validation"]["scoring_graph"] == "dot"
    assert meta["exporter"] == "legacy"


def test_default_export_uses_the_last_position_graph(exported: TinyExport) -> None:
    meta = json.loads((exported.export_dir / "export_meta.json").read_text())
    assert meta["validation"]["scoring_graph"] == "last_position"


def test_copy_models_export_the_last_position_pointer_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy model exports the full forward plus the pointer mixture at the last position only
    (mode ``dot``); its scores equal ``SASRec.score_last``'s, PAD column included."""
    from seqrec.models.sasrec import SASRec, SASRecConfig

    _legacy_only(monkeypatch)
    torch.manual_seed(0)
    cfg = SASRecConfig(
        num_items=NUM_ITEMS, max_len=MAX_LEN, d_model=16, n_heads=2, n_layers=1, copy_mechanism=True
    )
    model = SASRec(cfg).eval()
    scoring = ScoringModel(model)
    assert scoring.mode == "dot"
    ids = torch.tensor([[0, 0, 3, 4, 3], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0], [0, 0, 0, 0, 7]])
    with torch.no_grad():
        torch.testing.assert_close(scoring(ids), model.score_last(ids), rtol=1e-5, atol=1e-5)
    out = export_onnx(model, tiny_vocab(), tmp_path / "export")
    meta = json.loads((out / "export_meta.json").read_text())
    assert meta["validation"]["scoring_graph"] == "dot"


def test_export_does_not_print_torchvision_notices(tmp_path: Path) -> None:
    """The dynamo exporter logs "torchvision is not installed. Skipping torchvision::nms" (and
    three more) once per process; seqrec uses no torchvision operator, so the export drops them
    (other exporter warnings still show)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from _export_helpers import tiny_model, tiny_vocab\n"
        "from seqrec.export import ExportVariant, export_onnx\n"
        "export_onnx(tiny_model(), tiny_vocab(), sys.argv[1], fallback_items=['1001'],\n"
        "            variant=ExportVariant(top_k_in_graph=True, incremental=True))\n"
        "import logging\n"
        "logging.getLogger('torch.onnx._internal.exporter._registration').warning('still shown')\n"
    )
    tests_dir = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "export"), tests_dir],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert (tmp_path / "export" / "model_step.onnx").is_file()
    assert "torchvision" not in done.stdout + done.stderr
    assert "still shown" in done.stderr  # the filter drops only those notices
