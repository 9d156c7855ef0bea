"""Learning-rate schedules of SASRecModule, seen through a real Lightning fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from seqrec.data.dataset import TrainSessions
from seqrec.lit_module import SASRecModule


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(
    schedule: str,
    warmup: int,
    epochs: int = 2,
    batches: int = 5,
    schedule_epochs: int | None = None,
    max_steps: int = -1,
) -> list[float]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    windows = [rng.integers(1, 21, size=int(rng.integers(2, 6))) for _ in range(40)]
    loader = DataLoader(TrainSessions(windows), batch_size=8, collate_fn=TrainSessions.collate)
    module = SASRecModule(
        num_items=20, max_len=8, d_model=8, n_heads=1, n_layers=1, lr=0.01,
        warmup_steps=warmup, lr_schedule=schedule, lr_schedule_epochs=schedule_epochs,
    )  # fmt: skip
    record = _RecordLR()
    trainer = pl.Trainer(
        max_epochs=epochs, limit_train_batches=batches, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
        accelerator="cpu", limit_val_batches=0, max_steps=max_steps,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return record.lrs


def test_warmup_then_constant() -> None:
    lrs = _fit("constant", warmup=4)
    assert lrs[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert lrs[4:] == pytest.approx([0.01] * 6)


def test_warmup_then_cosine_to_zero_at_the_last_step() -> None:
    lrs = _fit("cosine", warmup=2)  # 10 steps: 2 warm-up, 8 cosine
    assert lrs[:2] == pytest.approx([0.005, 0.01])
    expected = [0.005 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert lrs[2:] == pytest.approx(expected, abs=1e-9)


def test_cosine_without_warmup() -> None:
    lrs = _fit("cosine", warmup=0, epochs=1, batches=4)
    assert lrs == pytest.approx([0.005 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        SASRecModule(num_items=5, lr_schedule="linear")


def test_cosine_schedule_longer_than_the_run_stops_part_way() -> None:
    """lr_schedule_epochs=4 on a 2-epoch run: the first half of a 4-epoch cosine, as the refit
    of a selection run stopped at its best epoch needs."""
    lrs = _fit("cosine", warmup=0, epochs=2, batches=4, schedule_epochs=4)  # 8 of 16 steps
    assert lrs == pytest.approx([0.005 * (1 + math.cos(math.pi * t / 16)) for t in range(8)])


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "8"])
def test_bad_schedule_length_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="lr_schedule_epochs must be an integer >= 1"):
        SASRecModule(num_items=5, lr_schedule="cosine", lr_schedule_epochs=value)  # type: ignore[arg-type]


def test_schedule_length_counts_epochs_of_the_run_even_with_max_steps() -> None:
    """With max_steps the schedule is still lr_schedule_epochs epochs of this run's batches
    (3 x 4 = 12 steps), not a fraction of max_steps."""
    lrs = _fit("cosine", warmup=0, epochs=20, batches=4, schedule_epochs=3, max_steps=6)
    assert lrs == pytest.approx([0.005 * (1 + math.cos(math.pi * t / 12)) for t in range(6)])


def test_schedule_shorter_than_the_run_is_refused() -> None:
    """A cosine past its length climbs back to the full rate; refused when training starts."""
    with pytest.raises(
        ValueError, match=r"lr_schedule_epochs=1 \(4 steps\) is shorter than the run \(8"
    ):
        _fit("cosine", warmup=0, epochs=2, batches=4, schedule_epochs=1)


def test_schedule_length_needs_the_cosine_schedule() -> None:
    with pytest.raises(ValueError, match="lr_schedule_epochs=3 needs lr_schedule='cosine'"):
        SASRecModule(num_items=5, lr_schedule="constant", lr_schedule_epochs=3)
