"""Fault classes 1 (padding and NaN), 2 (context length), 3b (id mapping) and 8 (exported shapes,
the parts test_export.py does not already cover), with the issue's exact examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import seqrec.export as export_mod
from _export_helpers import MAX_LEN, TinyExport, tiny_export, tiny_model
from seqrec.constants import PAD_IDX
from seqrec.data.dataset import NextItemExamples, TrainSessions, training_windows
from seqrec.data.vocab import ItemVocab
from seqrec.export import export_onnx
from seqrec.lit_module import SASRecModule
from seqrec.models.sasrec import SASRec, SASRecConfig
from seqrec.pipeline import model_scorer
from seqrec.predictor import SessionRecommender
from seqrec.sequence import encode_prefix, encode_prefixes

NEG = torch.finfo(torch.float32).min


def small_model(num_items: int = 30, max_len: int = 10, dropout: float = 0.1) -> SASRec:
    torch.manual_seed(0)
    return SASRec(
        SASRecConfig(
            num_items=num_items, max_len=max_len, d_model=16, n_heads=2, n_layers=2, dropout=dropout
        )
    )


# --------------------------------------------------------------------------- 1. padding and NaN


def test_class1a_real_row_and_all_padding_row() -> None:
    model = small_model().eval()
    batch = torch.tensor([[0, 0, 12, 7], [0, 0, 0, 0]])
    hidden = model(batch)
    scores = model.score_last(batch)
    assert not torch.isnan(hidden).any() and not torch.isnan(scores).any()  # no NaN anywhere
    alone = model.score_last(torch.tensor([[12, 7]]))
    torch.testing.assert_close(scores[0, 1:], alone[0, 1:], atol=1e-5, rtol=0)
    # the empty row: zero hidden state, so every real item scores 0 and PAD is never ranked
    assert torch.all(hidden[1] == 0)
    assert torch.all(scores[1, 1:] == 0) and scores[1, PAD_IDX] == NEG


def test_class1a_training_step_with_empty_session_is_finite() -> None:
    torch.manual_seed(0)
    module = SASRecModule(num_items=30, max_len=10, d_model=16, n_heads=2, n_layers=2, dropout=0.2)
    module.train()
    batch = {
        "item_ids": torch.tensor([[0, 0, 12, 7], [0, 0, 0, 0]]),
        "targets": torch.tensor([[0, 0, 7, 3], [0, 0, 0, 0]]),
    }
    loss = module.loss(batch["item_ids"], batch["targets"])
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_class1a_predictor_policy_for_an_all_padding_session(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # An empty session, or one whose items are all unknown, encodes to padding only: the predictor
    # never scores it and answers with the popularity fallback (source="fallback").
    exported: TinyExport = tiny_export(tmp_path_factory)
    rec = SessionRecommender.from_dir(exported.export_dir)
    fallback = rec.meta["fallback_items"]
    batch = rec.recommend_batch([["1012", "1007"], [], ["unknown", "0"]], k=3)
    assert batch[0] == rec.recommend(["1012", "1007"], k=3)
    for recs in batch[1:]:
        assert [r.item_id for r in recs] == fallback[:3]
        assert all(r.source == "fallback" for r in recs)


def test_class1b_left_padding_leaves_last_output_unchanged() -> None:
    model = small_model().eval()
    padded = torch.tensor([[0, 0, 0, 4, 9]])  # [4, 9] left-padded to 5; every mask is on
    unpadded = torch.tensor([[4, 9]])
    torch.testing.assert_close(model(padded)[0, -1], model(unpadded)[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model.score_last(padded)[0, 1:], model.score_last(unpadded)[0, 1:], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class1b_random_mixed_length_batches_no_nan_loss(dtype: torch.dtype) -> None:
    """100 random batches of windows of length 2..max_len+1 (dropout on), including rows that
    are nearly all padding: every loss and gradient is finite, also under bf16 autocast."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    max_len, num_items = 10, 30
    module = SASRecModule(
        num_items=num_items, max_len=max_len, d_model=16, n_heads=2, n_layers=2, dropout=0.3
    ).train()
    for _ in range(100):
        batch_size = int(rng.integers(1, 9))
        windows = [
            rng.integers(1, num_items + 1, size=int(rng.integers(2, max_len + 2)))
            for _ in range(batch_size)
        ]
        batch = TrainSessions.collate(windows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = module.loss(batch["item_ids"], batch["targets"])
        assert torch.isfinite(loss), batch
        module.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------ 2. context length


def test_class2_sixty_items_with_max_len_fifty_scores_like_the_last_fifty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    max_len, num_items = 50, 80
    session = list(range(1, 61))  # 60 distinct items
    last50 = session[-50:]
    assert encode_prefix(session, max_len).tolist() == encode_prefix(last50, max_len).tolist()

    torch.manual_seed(0)
    module = SASRecModule(
        num_items=num_items, max_len=max_len, d_model=16, n_heads=2, n_layers=1
    ).eval()
    score = model_scorer(module, max_len)  # the evaluator's path
    torch.testing.assert_close(
        score([np.array(session)]), score([np.array(last50)]), atol=1e-5, rtol=0
    )

    examples = NextItemExamples([np.array(session)], np.array([61]), max_len)  # the eval batches
    batch = examples.collate([examples[0]])
    assert batch["item_ids"].shape == (1, max_len)
    assert batch["item_ids"][0].tolist() == last50

    windows = training_windows([np.array([*session, 61])], max_len)  # the training batches
    assert all(len(w) <= max_len + 1 for w in windows)
    assert torch.isfinite(module.loss(**TrainSessions.collate(windows)))

    # the predictor: an export with max_len 50, a 60-item session (legacy exporter: < 1 s)
    monkeypatch.delitem(export_mod._EXPORTERS, "dynamo")
    torch.manual_seed(0)
    model = SASRec(
        SASRecConfig(num_items=num_items, max_len=max_len, d_model=16, n_heads=2, n_layers=1)
    )
    vocab = ItemVocab([str(1000 + i) for i in range(1, num_items + 1)])
    rec = SessionRecommender.from_dir(
        export_onnx(model, vocab, tmp_path / "export", fallback_items=["1001"])
    )
    raw = [str(1000 + i) for i in session]
    recs, info = rec.recommend_with_info(raw, k=10)
    assert info.num_known == 60 and not info.used_fallback
    assert recs == rec.recommend(raw[-50:], k=10)


# ---------------------------------------------------------------------------------- 3. id mapping


def test_class3b_catalog_ids_round_trip_and_only_catalog_ids_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = ["1001", "1002", "1003"]
    vocab = ItemVocab.fit(catalog)
    idxs = vocab.encode(catalog)
    assert sorted(idxs.tolist()) == [1, 2, 3] and PAD_IDX not in idxs
    assert vocab.decode(idxs) == catalog  # encode -> decode is the identity
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode([PAD_IDX])  # the reserved index never decodes to an id

    monkeypatch.delitem(export_mod._EXPORTERS, "dynamo")
    model = tiny_model(num_items=3)
    out = export_onnx(model, vocab, tmp_path / "three", fallback_items=["1002"])
    rec = SessionRecommender.from_dir(out)
    sessions = [["1001"], ["1003", "1003"], ["1002", "1001", "1003"], [], ["42"], ["0"]]
    for recs in rec.recommend_batch(sessions, k=10):
        assert {r.item_id for r in recs} <= set(catalog)
    for recs in rec.recommend_batch(sessions, k=10, exclude_seen=True):
        assert {r.item_id for r in recs} <= set(catalog)


def test_class3b_raw_id_zero_is_an_item_not_padding() -> None:
    ids = ["0", "00", "7", "\x00", "7\x00"]  # NUL-terminated ids once lost their last character
    vocab = ItemVocab.fit(ids)
    idxs = vocab.encode(ids)
    assert PAD_IDX not in idxs.tolist() and len(set(idxs.tolist())) == len(ids)
    assert vocab.decode(idxs) == ids


# ------------------------------------------------------------------------- 8. exported model shapes


def test_class8_onnx_all_padding_rows_match_eager(tmp_path_factory: pytest.TempPathFactory) -> None:
    exported: TinyExport = tiny_export(tmp_path_factory)  # dummy input (2, 7), see export_onnx
    session = ort.InferenceSession(
        str(exported.export_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    batches = [
        np.array([[0, 0, 0, 0, 5], [0, 0, 3, 4, 5]], dtype=np.int64),  # the batch
        np.array([[0, 0, 0, 0], [0, 0, 12, 7]], dtype=np.int64),  # an all-padding row
        encode_prefixes([[], [1], list(range(1, MAX_LEN + 3))], MAX_LEN, pad_to_longest=False),
    ]
    for item_ids in batches:
        got = session.run(["scores"], {"item_ids": item_ids})[0]
        with torch.inference_mode():
            want = exported.model.score_last(torch.from_numpy(item_ids)).numpy()
        assert np.isfinite(got).all() and np.isfinite(want).all()
        np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=1e-4)
