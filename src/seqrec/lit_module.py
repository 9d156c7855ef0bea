"""Lightning module: SASRec + full-softmax cross-entropy + full-catalog ranking metrics."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from seqrec import losses
from seqrec.constants import PAD_IDX
from seqrec.metrics import NextItemMetrics
from seqrec.models.sasrec import SASRec, SASRecConfig

log = logging.getLogger(__name__)

METRIC_KS = (10, 20)


class SASRecModule(pl.LightningModule):
    """Trains :class:`SASRec` with cross-entropy over the full catalog at every real position.

    Logits are computed only at positions whose target is a real item (N of them in a batch), so the
    cost is N x C rather than B x L x C.

    Args:
        num_items: catalog size excluding PAD (from the vocabulary, not from YAML).
        max_len: context length L.
        d_model, n_heads, n_layers, dropout, ffn_mult: see :class:`SASRecConfig`.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, LayerNorms and position embeddings).
        warmup_steps: linear learning-rate warm-up steps (from lr / warmup_steps up to lr).
        lr_schedule: after the warm-up, ``constant`` or ``cosine`` (cosine annealing to 0 at the
            run's last step, Loshchilov & Hutter, "SGDR", ICLR 2017; the run length is
            ``trainer.max_epochs``, so a run stopped early never reaches the low rates).
        lr_schedule_epochs: length of the cosine schedule in epochs, when it should differ from
            ``trainer.max_epochs``: a run of fewer epochs then stops part-way down the schedule,
            which is how a final refit reproduces the epoch a longer selection run chose on
            validation. None: the run's length. Needs ``lr_schedule="cosine"``; a schedule
            shorter than the run is refused when training starts (ValueError).
        loss: one of ``ce`` (full softmax), ``sampled_softmax``, ``bce``, ``gbce``
            (see :mod:`seqrec.losses`).
        num_negatives: M negatives per batch for the sampled losses (shared by all positions).
        sampler: ``popularity`` (q proportional to training counts, set from the data module at
            fit start) or ``uniform``; used by the sampled losses.
        gbce_t: gBCE calibration parameter t in [0, 1].
        copy_mechanism: add the pointer (copy) distribution over the session's items (see
            :class:`SASRecConfig`); needs ``loss="ce"``.
        copy_recency: learned pointer-attention bias by distance to the query position (see
            :class:`SASRecConfig`); needs ``copy_mechanism``.
    """

    def __init__(
        self,
        num_items: int,
        max_len: int = 50,
        d_model: int = 64,
        n_heads: int = 2,
        n_layers: int = 2,
        dropout: float = 0.2,
        ffn_mult: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        loss: str = "ce",
        num_negatives: int = 256,
        sampler: str = "popularity",
        gbce_t: float = 0.75,
        copy_mechanism: bool = False,
        lr_schedule: str = "constant",
        copy_recency: bool = False,
        lr_schedule_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if loss not in losses.LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {losses.LOSSES}")
        if sampler not in ("popularity", "uniform"):
            raise ValueError(f"unknown sampler {sampler!r}; expected 'popularity' or 'uniform'")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"unknown lr_schedule {lr_schedule!r}; expected 'constant' or 'cosine'"
            )
        if lr_schedule_epochs is not None and (
            isinstance(lr_schedule_epochs, bool)
            or not isinstance(lr_schedule_epochs, int)
            or lr_schedule_epochs < 1
        ):
            raise ValueError(
                f"lr_schedule_epochs must be an integer >= 1, got {lr_schedule_epochs!r}"
            )
        if lr_schedule_epochs is not None and lr_schedule != "cosine":
            raise ValueError(
                f"lr_schedule_epochs={lr_schedule_epochs} needs lr_schedule='cosine' (got "
                f"{lr_schedule!r}, which has no length)"
            )
        if copy_mechanism and loss != "ce":
            raise ValueError("copy_mechanism needs loss='ce' (the mixture is a full distribution)")
        self.save_hyperparameters()
        self.model = SASRec(
            SASRecConfig(
                num_items=num_items,
                max_len=max_len,
                d_model=d_model,
                n_heads=n_heads,
                n_layers=n_layers,
                dropout=dropout,
                ffn_mult=ffn_mult,
                copy_mechanism=copy_mechanism,
                copy_recency=copy_recency,
            )
        )
        uniform = torch.ones(num_items + 1)
        uniform[PAD_IDX] = 0.0
        # Proposal distribution of the sampled losses; not saved (it is data, refilled at fit start).
        self.register_buffer("sampling_probs", uniform / uniform.sum(), persistent=False)
        self.val_metrics = NextItemMetrics(METRIC_KS)
        self.test_metrics = NextItemMetrics(METRIC_KS)

    def forward(self, item_ids: Tensor) -> Tensor:
        """(B, L) int64 left-padded item indices -> (B, C) float scores for the next item."""
        return self.model.score_last(item_ids)

    def loss(self, item_ids: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over real target positions.

        Args:
            item_ids: (B, L) int64 inputs, left-padded.
            targets: (B, L) int64 next items, PAD (0) where there is no target.

        Returns:
            Scalar float loss; 0 (with a graph) when the batch has no real target.
        """
        hidden = self.model(item_ids)  # (B, L, D)
        is_target = targets != PAD_IDX  # (B, L)
        if not bool(is_target.any()):
            return hidden.sum() * 0.0
        hidden_at, targets_at = hidden[is_target], targets[is_target]  # (N, D), (N,)
        item_emb = self.model.item_emb.weight  # (C, D)
        name = self.hparams.loss
        if self.hparams.copy_mechanism:
            return -self.model.log_prob_of(hidden, item_ids, is_target, targets).mean()
        if name == "ce":
            return losses.full_ce(hidden_at, item_emb, targets_at)
        negatives = losses.sample_negatives(self.hparams.num_negatives, self.sampling_probs)  # (M,)
        if name == "sampled_softmax":
            log_q = torch.log(self.sampling_probs.clamp_min(1e-12))
            return losses.sampled_softmax(hidden_at, item_emb, targets_at, negatives, log_q)
        if name == "bce":
            return losses.bce(hidden_at, item_emb, targets_at, negatives)
        return losses.gbce(
            hidden_at, item_emb, targets_at, negatives, self.hparams.num_items, self.hparams.gbce_t
        )

    def set_item_counts(self, counts: Tensor) -> None:
        """Set the popularity proposal from (C,) training counts (used when sampler=popularity)."""
        if self.hparams.sampler != "popularity":
            return
        probs = counts.to(torch.float32).clamp_min(0.0) + 1e-3  # every real item stays drawable
        probs[PAD_IDX] = 0.0
        self.sampling_probs = (probs / probs.sum()).to(self.sampling_probs.device)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if (
            self.hparams.loss != "ce"
            and datamodule is not None
            and hasattr(datamodule, "item_counts")
        ):
            self.set_item_counts(torch.as_tensor(datamodule.item_counts()))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch["item_ids"], batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["item_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str, metrics: NextItemMetrics) -> None:
        scores = self(batch["item_ids"])  # (B, C)
        loss = F.cross_entropy(scores, batch["next_items"])
        metrics.update(scores, batch["next_items"])
        self.log(f"{stage}/loss", loss, batch_size=scores.shape[0], sync_dist=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        for key, value in values.items():
            self.log(f"val/{key}", value, prog_bar=key == "mrr@20", sync_dist=False)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            # one line per validation, so a run without a terminal (no progress bar) shows progress
            log.info(
                "epoch %d, step %d: validation %s",
                self.current_epoch,
                self.global_step,
                ", ".join(f"{key} {float(value):.4f}" for key, value in values.items()),
            )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        for key, value in self.test_metrics.compute().items():
            self.log(f"test/{key}", value)
        self.test_metrics.reset()

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union return type
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            is_no_decay = param.ndim < 2 or "pos_emb" in name  # biases, LayerNorms, positions
            (no_decay if is_no_decay else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        warmup = max(int(self.hparams.warmup_steps), 0)
        schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        if warmup > 1:
            schedulers.append(
                torch.optim.lr_scheduler.LinearLR(
                    optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1
                )
            )
        if self.hparams.lr_schedule == "cosine":
            # decay to 0 at the last step of the run (max_epochs, limit_train_batches included),
            # or of lr_schedule_epochs epochs of this run's length
            total = int(self.trainer.estimated_stepping_batches)
            if self.hparams.lr_schedule_epochs is not None:
                run_steps = total
                per_epoch = math.ceil(
                    self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
                )  # num_training_batches is set by estimated_stepping_batches
                total = per_epoch * self.hparams.lr_schedule_epochs
                if total < run_steps:  # past its end a cosine would climb back to the full rate
                    raise ValueError(
                        f"lr_schedule_epochs={self.hparams.lr_schedule_epochs} ({total} steps) "
                        f"is shorter than the run ({run_steps} steps, trainer.max_epochs="
                        f"{self.trainer.max_epochs}, max_steps={self.trainer.max_steps}); it must be "
                        "at least the run's length (a longer one stops part-way down)"
                    )
            schedulers.append(
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
            )
        if not schedulers:
            return optimizer
        if len(schedulers) == 1:
            scheduler = schedulers[0]
        else:
            scheduler = torch.optim.lr_scheduler.SequentialLR(
                optimizer, schedulers, milestones=[warmup]
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
