import pytest
import torch

from seqrec.constants import PAD_IDX
from seqrec.lit_module import SASRecModule
from seqrec.models.sasrec import SASRec, SASRecConfig


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(
        SASRecConfig(num_items=30, max_len=10, d_model=16, n_heads=2, n_layers=2, dropout=0.1)
    ).eval()


def test_shapes_and_pad_column(model: SASRec) -> None:
    ids = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    hidden = model(ids)
    assert hidden.shape == (2, 4, 16)
    scores = model.score_last(ids)
    assert scores.shape == (2, 31) and scores.dtype == torch.float32
    assert torch.all(scores[:, PAD_IDX] == torch.finfo(torch.float32).min)
    assert torch.all(hidden[0, :2] == 0)  # padded positions are zeroed


def test_causality(model: SASRec) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, 3] = 20
    out, out_changed = model(ids), model(changed)
    assert torch.allclose(out[0, :3], out_changed[0, :3], atol=1e-6)
    assert not torch.allclose(out[0, 3], out_changed[0, 3])


def test_extra_left_padding_leaves_last_output_unchanged(model: SASRec) -> None:
    short = model.score_last(torch.tensor([[4, 9]]))
    padded = model.score_last(torch.tensor([[0, 0, 0, 4, 9]]))
    assert torch.allclose(short[:, 1:], padded[:, 1:], atol=1e-5)


def test_batch_with_empty_row_has_no_nan(model: SASRec) -> None:
    ids = torch.tensor([[0, 0, 12, 7], [0, 0, 0, 0]])
    scores = model.score_last(ids)
    assert not torch.isnan(scores).any()
    alone = model.score_last(torch.tensor([[12, 7]]))
    assert torch.allclose(scores[0, 1:], alone[0, 1:], atol=1e-5)


def test_length_one_session(model: SASRec) -> None:
    scores = model.score_last(torch.tensor([[7]]))
    assert torch.isfinite(scores[:, 1:]).all()


def test_training_loss_finite_with_empty_row_and_decreases() -> None:
    torch.manual_seed(0)
    module = SASRecModule(
        num_items=20, max_len=8, d_model=16, n_heads=2, n_layers=1, dropout=0.0, lr=1e-2
    )
    ids = torch.tensor([[0, 0, 1, 2, 3], [0, 0, 0, 0, 0], [4, 5, 6, 7, 8]])
    targets = torch.tensor([[0, 0, 2, 3, 4], [0, 0, 0, 0, 0], [5, 6, 7, 8, 9]])
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = module.loss(ids, targets)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first * 0.5


def test_all_padding_batch_gives_zero_loss_with_graph() -> None:
    module = SASRecModule(num_items=5, max_len=4, d_model=8, n_heads=2, n_layers=1)
    loss = module.loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(num_items=5, d_model=10, n_heads=3)
