import pytest
import torch

from seqrec import losses
from seqrec.lit_module import SASRecModule


@pytest.mark.parametrize("loss", losses.LOSSES)
def test_each_loss_is_finite_and_decreases_on_an_overfit_batch(loss: str) -> None:
    torch.manual_seed(0)
    module = SASRecModule(
        num_items=40,
        max_len=8,
        d_model=16,
        n_heads=2,
        n_layers=1,
        dropout=0.0,
        loss=loss,
        num_negatives=8,
    )
    module.set_item_counts(torch.arange(41, dtype=torch.float32))
    ids = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 0, 0]])
    targets = torch.tensor([[0, 0, 2, 3, 4], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]])
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    values = []
    for _ in range(40):
        value = module.loss(ids, targets)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert sum(values[-5:]) / 5 < 0.6 * sum(values[:5]) / 5


def test_sampled_softmax_equals_full_softmax_when_negatives_are_the_catalog() -> None:
    torch.manual_seed(0)
    hidden, emb = torch.randn(5, 4), torch.randn(7, 4)
    targets = torch.tensor([1, 2, 3, 4, 6])
    negatives = torch.arange(1, 7)  # every real item once
    log_q = torch.log(torch.full((7,), 1 / 6))  # uniform: correction is a constant shift
    sampled = losses.sampled_softmax(hidden, emb, targets, negatives, log_q)
    full = losses.full_ce(hidden, emb, targets)
    assert sampled.item() == pytest.approx(full.item(), rel=1e-5)


def test_gbce_with_t_zero_is_bce() -> None:
    torch.manual_seed(0)
    hidden, emb = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([1, 2, 3, 4, 5])
    negatives = torch.tensor([6, 7, 8, 1])
    plain = losses.bce(hidden, emb, targets, negatives)
    assert losses.gbce(hidden, emb, targets, negatives, num_items=8, t=0.0).item() == pytest.approx(
        plain.item()
    )
    # t > 0 shrinks the positive term (beta < 1)
    assert losses.gbce(hidden, emb, targets, negatives, num_items=8, t=1.0).item() < plain.item()


def test_unknown_loss_rejected() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        SASRecModule(num_items=5, loss="hinge")
