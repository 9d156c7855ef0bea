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
from seqrec.export import ExportValidationError, ScoringModel, export_onnx, validate_onnx
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
