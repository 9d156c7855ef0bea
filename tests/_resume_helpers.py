"""Callbacks injected into ``scripts/train.py`` subprocesses by test_resume.py (via Hydra overrides
``+callbacks.<name>._target_=_resume_helpers.<Class>``, with ``tests/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


class StepRecorder(pl.Callback):
    """Appends one JSON line per training batch: global step, epoch, batch index, loss, batch
    checksum (sum of the item ids), so two runs can be compared step by step."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {
            "global_step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batch_idx": int(batch_idx),
            "loss": float(loss),
            "batch_sum": int(batch["item_ids"].sum()) + 7 * int(batch["targets"].sum()),
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


class PauseAtStep(pl.Callback):
    """At the start of the batch after global step ``step`` (so after that step's checkpoints are
    written), write ``marker`` and sleep: the test then SIGKILLs the process from outside."""

    def __init__(self, step: int, marker: str, max_wait_s: float = 120.0) -> None:
        self.step = step
        self.marker = Path(marker)
        self.max_wait_s = max_wait_s

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.max_wait_s
        while time.monotonic() < deadline:  # the test kills us long before this ends
            time.sleep(0.05)
        raise RuntimeError("PauseAtStep: nobody killed this process")
