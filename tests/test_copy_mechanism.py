"""The pointer (copy) mixture: a proper distribution, consistent between training and scoring."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from seqrec.data.vocab import ItemVocab
from seqrec.export import export_onnx
from seqrec.lit_module import SASRecModule
from seqrec.models.sasrec import SASRec, SASRecConfig


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    cfg = SASRecConfig(
        num_items=25,
        max_len=10,
        d_model=16,
        n_heads=2,
        n_layers=1,
        dropout=0.0,
        copy_mechanism=True,
    )
    return SASRec(cfg).eval()


def test_scores_are_log_probabilities(model: SASRec) -> None:
    scores = model.score_last(torch.tensor([[0, 0, 3, 4, 3], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]]))
    probs = torch.exp(scores[:, 1:]).sum(1)
    assert torch.allclose(probs[:2], torch.ones(2), atol=1e-5)
    assert not torch.isnan(scores).any()


def test_training_log_prob_matches_score_last(model: SASRec) -> None:
    ids = torch.tensor([[0, 0, 3, 4, 3], [1, 2, 3, 4, 5]])
    targets = torch.tensor([[0, 0, 4, 3, 7], [2, 3, 4, 5, 1]])
    hidden = model(ids)
    is_target = targets != 0
    log_p = model.log_prob_of(hidden, ids, is_target, targets)  # (N,)
    # the last target of each row, scored by score_last on the full prefix
    last = model.score_last(ids)
    assert log_p[2].item() == pytest.approx(last[0, 7].item(), abs=1e-5)
    assert log_p[-1].item() == pytest.approx(last[1, 1].item(), abs=1e-5)
    # an intermediate position equals scoring its prefix alone (causality)
    alone = model.score_last(torch.tensor([[3, 4]]))
    assert log_p[1].item() == pytest.approx(alone[0, 3].item(), abs=1e-5)


def test_copy_raises_probability_of_seen_items_and_is_padding_invariant(model: SASRec) -> None:
    short = model.score_last(torch.tensor([[4, 9]]))
    padded = model.score_last(torch.tensor([[0, 0, 0, 4, 9]]))
    assert torch.allclose(short[:, 1:], padded[:, 1:], atol=1e-5)


def test_copy_model_trains_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SASRecModule(
        num_items=12,
        max_len=10,
        d_model=16,
        n_heads=2,
        n_layers=1,
        dropout=0.0,
        copy_mechanism=True,
    )
    ids = torch.tensor([[0, 1, 2, 1], [3, 4, 5, 3]])
    targets = torch.tensor([[0, 2, 1, 2], [4, 5, 3, 4]])
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = module.loss(ids, targets).item()
    for _ in range(30):
        loss = module.loss(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    vocab = ItemVocab([str(1000 + i) for i in range(1, 13)])
    out = export_onnx(
        module.model, vocab=vocab, out_dir=tmp_path / "export", fallback_items=["1001"]
    )
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.array([[0, 0, 3, 4, 3], [1, 2, 3, 4, 5]], dtype=np.int64)
    onnx_scores = session.run(None, {"item_ids": batch})[0]
    eager = module.model.eval().score_last(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(onnx_scores[:, 1:], eager[:, 1:], atol=1e-4)


def test_copy_needs_full_softmax() -> None:
    with pytest.raises(ValueError, match="copy_mechanism"):
        SASRecModule(num_items=5, loss="bce", copy_mechanism=True)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_copy_model_exports_in_reduced_precision(tmp_path: Path, precision: str) -> None:
    """fp16 keeps the pointer's ScatterElements in float32 (onnxruntime's CPU kernel has no
    float16 add-reduction; this export used to fail at the first run)."""
    from seqrec.export import ExportVariant
    from seqrec.predictor import SessionRecommender

    torch.manual_seed(0)
    cfg = SASRecConfig(
        num_items=12, max_len=10, d_model=16, n_heads=2, n_layers=1, copy_mechanism=True
    )
    model = SASRec(cfg).eval()
    vocab = ItemVocab([str(1000 + i) for i in range(1, 13)])
    out = export_onnx(
        model,
        vocab=vocab,
        out_dir=tmp_path / "export",
        fallback_items=["1001"],
        variant=ExportVariant(precision=precision, top_k_in_graph=True, min_top_k_overlap=0.5),
    )
    recs = SessionRecommender.from_dir(out).recommend(["1003", "1004", "1003"], k=5)
    assert len(recs) == 5 and all(np.isfinite(r.score) for r in recs)


@pytest.mark.parametrize("recency", [False, True])
def test_copy_log_probs_with_the_new_key_apart_equal_the_stacked_keys(recency: bool) -> None:
    """The step graph passes the cached pointer keys and the new position's key separately
    (no concatenation of the cache); the log-probabilities must be those of the stacked keys."""
    model = _recency_model() if recency else SASRec(
        SASRecConfig(num_items=25, max_len=10, d_model=16, n_heads=2, n_layers=1, dropout=0.0,
                     copy_mechanism=True)
    ).eval()  # fmt: skip
    ids = torch.tensor([[0, 0, 3, 4, 7, 4, 9], [5, 1, 2, 1, 8, 8, 3]])
    with torch.no_grad():
        states = model(ids)  # (B, L, D)
        keys, last = model.copy_key(states), states[:, -1]
        logits = last @ model.item_emb.weight[1:].t()
        stacked = model.copy_log_probs_from_keys(logits, last, keys, ids)
        apart = model.copy_log_probs_from_keys(
            logits, last, keys[:, :-1], ids, new_key=keys[:, -1:]
        )
    torch.testing.assert_close(apart, stacked, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(stacked).all()


def _recency_model() -> SASRec:
    torch.manual_seed(1)
    cfg = SASRecConfig(
        num_items=25, max_len=10, d_model=16, n_heads=2, n_layers=1, dropout=0.0,
        copy_mechanism=True, copy_recency=True,
    )  # fmt: skip
    model = SASRec(cfg).eval()
    with torch.no_grad():  # distance 1 strongly favoured, distance 2 strongly avoided
        model.copy_distance_bias.copy_(torch.linspace(0.5, -0.5, 10))
        model.copy_distance_bias[1] = 4.0
        model.copy_distance_bias[2] = -4.0
    return model


def test_copy_recency_adds_the_distance_bias_to_the_pointer_attention() -> None:
    model = _recency_model().requires_grad_(False)
    ids = torch.tensor([[0, 0, 3, 4, 7, 4, 9]])
    hidden = model(ids)
    _, alpha = model.copy_weights(hidden, ids)  # (1, L, L)
    query, key = model.copy_query(hidden)[0], model.copy_key(hidden)[0]  # (L, D)
    bias = model.copy_distance_bias
    for t in range(2, 7):  # real positions 2..6; each attends to real positions 2..t
        logits = torch.stack([query[t] @ key[j] / 4.0 + bias[t - j] for j in range(2, t + 1)])
        want = torch.softmax(logits, dim=0)
        torch.testing.assert_close(alpha[0, t, 2 : t + 1], want, atol=1e-6, rtol=1e-5)
        assert float(alpha[0, t, :2].sum()) < 1e-6  # padding gets no attention
    # the bias moves pointer mass: the item one click back gains, two clicks back loses
    flat = model.score_last(ids)
    model.copy_distance_bias.zero_()
    unbiased = model.score_last(ids)
    assert flat[0, 4] > unbiased[0, 4]  # item 4: distance 1 (and 3)
    assert flat[0, 7] < unbiased[0, 7]  # item 7: distance 2 only


def test_copy_recency_training_and_scoring_agree_at_every_position() -> None:
    model = _recency_model()
    ids = torch.tensor([[0, 0, 3, 5, 3, 7, 9, 5], [1, 2, 1, 2, 4, 4, 6, 2]])
    targets = torch.tensor([[0, 0, 5, 3, 7, 9, 5, 2], [2, 1, 2, 4, 4, 6, 2, 8]])
    is_target = targets != 0
    with torch.no_grad():
        log_p = model.log_prob_of(model(ids), ids, is_target, targets)  # (N,)
        want = [
            model.score_last(ids[b : b + 1, : t + 1])[0, targets[b, t]]
            for b in range(2)
            for t in range(8)
            if is_target[b, t]
        ]  # each prefix alone (no left padding): padding- and causality-invariant
    torch.testing.assert_close(log_p, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_copy_recency_needs_the_copy_mechanism() -> None:
    with pytest.raises(ValueError, match="copy_recency needs copy_mechanism"):
        SASRecConfig(num_items=5, copy_recency=True)
    # a string from a config ("false", "abc") is truthy: refused instead of switching it on
    for name, value in (("copy_recency", "false"), ("copy_mechanism", "abc"), ("copy_recency", 1)):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got {value!r}"):
            SASRecConfig(num_items=5, **{"copy_mechanism": True, name: value})
    with pytest.raises(ValueError, match="copy_recency needs copy_mechanism"):
        SASRecModule(num_items=5, copy_recency=True)


def test_copy_recency_incremental_export_serves_the_model(tmp_path: Path) -> None:
    """The step graph applies the bias to the cached positions' distances: the export's own
    validation (prefill and step against eager) passes, and a growing session served from cached
    states ranks as the whole-session model does."""
    from seqrec.export import ExportVariant
    from seqrec.predictor import SessionRecommender
    from seqrec.sequence import encode_prefixes

    model = _recency_model()
    vocab = ItemVocab([str(1000 + i) for i in range(1, 26)])
    out = export_onnx(
        model, vocab, tmp_path / "export", fallback_items=["1001"],
        variant=ExportVariant(top_k_in_graph=True, incremental=True, precision="fp32"),
    )  # fmt: skip
    rec = SessionRecommender.from_dir(out)
    session = [3, 5, 3, 7, 9, 5, 2, 2, 11, 3, 5, 8]  # longer than max_len: the window slides
    for n in range(1, len(session) + 1):
        got = rec.recommend([str(1000 + i) for i in session[:n]], k=5)
        with torch.no_grad():
            scores = model.score_last(torch.from_numpy(encode_prefixes([session[:n]], 10)))[0]
        want = torch.topk(scores[1:], 5)
        assert [r.item_id for r in got] == [str(1001 + int(i)) for i in want.indices], n
        np.testing.assert_allclose([r.score for r in got], want.values.numpy(), atol=1e-4)
    assert rec.state_cache_info()["hits"] == 9  # n = 2..10 were next clicks
