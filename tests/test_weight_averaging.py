"""Weight averaging (``callbacks.ema``): the Lightning EMA callback wired through the configs, and
the checkpoint the pipeline exports holding the averaged weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from seqrec.data.dataset import TrainSessions
from seqrec.lit_module import SASRecModule


def test_ema_is_off_by_default_and_on_in_the_yoochoose_experiment(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    assert compose_cfg("train").callbacks.ema is None
    cfg = compose_cfg("train", ["experiment=yoochoose_sasrec"])
    ema = instantiate(cfg.callbacks.ema)
    assert isinstance(ema, pl.callbacks.EMAWeightAveraging)
    assert cfg.callbacks.ema.decay == 0.995
    refit = compose_cfg("train", ["experiment=yoochoose_sasrec_refit"])
    assert refit.callbacks.ema.decay == 0.995  # the final model is averaged the same way


class _RecordWeights(pl.Callback):
    """The model's parameters after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_checkpoint_holds_the_exponential_moving_average(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    windows = [rng.integers(1, 21, size=int(rng.integers(2, 6))) for _ in range(48)]
    loader = DataLoader(TrainSessions(windows), batch_size=8, collate_fn=TrainSessions.collate)
    module = SASRecModule(num_items=20, max_len=8, d_model=8, n_heads=1, n_layers=1, lr=0.05)
    record, decay = _RecordWeights(), 0.6
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", limit_val_batches=0,
        callbacks=[record, pl.callbacks.EMAWeightAveraging(decay=decay), checkpoint],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    assert len(record.steps) == 6

    # EMA of the weights after each step: the first step's weights, then avg = d avg + (1 - d) w
    expected = dict(record.steps[0])
    for weights in record.steps[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * w for n, w in weights.items()}
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for name, value in expected.items():
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    # the raw weights are kept for resuming, and they are not the average
    last = record.steps[-1]["model.item_emb.weight"]
    torch.testing.assert_close(saved["current_model_state"]["model.item_emb.weight"], last)
    assert not torch.allclose(saved["state_dict"]["model.item_emb.weight"], last)
    # what evaluation and export load is the average
    loaded = SASRecModule.load_from_checkpoint(tmp_path / "last.ckpt", map_location="cpu")
    torch.testing.assert_close(
        loaded.model.item_emb.weight.detach(), expected["model.item_emb.weight"], rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
