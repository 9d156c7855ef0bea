"""Lightning data module over a processed data directory (see ``seqrec.pipeline.prepare``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from seqrec.data.dataset import (
    NextItemExamples,
    TrainSessions,
    sessions_to_index_lists,
    training_windows,
)
from seqrec.data.vocab import ItemVocab

log = logging.getLogger(__name__)


class SessionDataModule(pl.LightningDataModule):
    """Loads ``train.parquet``, ``valid_examples.parquet``, ``test_examples.parquet`` and the vocab.

    Args:
        processed_dir: directory written by ``prepare``.
        max_len: model context length L.
        batch_size: training windows per batch.
        eval_batch_size: examples per evaluation batch.
        num_workers: DataLoader worker processes.
        seed: seed of the training shuffle generator.
    """

    def __init__(
        self,
        processed_dir: str,
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        vocab_path = self.processed_dir / "item_vocab.json"
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path} not found: run scripts/prepare_data.py first")
        self.vocab = ItemVocab.load(vocab_path)
        self.train_set: TrainSessions | None = None
        self.valid_set: NextItemExamples | None = None
        self.test_set: NextItemExamples | None = None

    @property
    def num_items(self) -> int:
        """Catalog size (excluding PAD)."""
        return self.vocab.num_items

    def train_sessions(self) -> list[np.ndarray]:
        """Training sessions as item-index arrays."""
        frame = pd.read_parquet(self.processed_dir / "train.parquet")
        return sessions_to_index_lists(frame, self.vocab)

    def item_counts(self) -> np.ndarray:
        """(C,) int64 training-event count per item index (PAD = 0)."""
        sessions = self.train_sessions()
        counts = (
            np.bincount(np.concatenate(sessions), minlength=self.num_items + 1)
            if sessions
            else None
        )
        out = (
            np.zeros(self.num_items + 1, dtype=np.int64)
            if counts is None
            else counts.astype(np.int64)
        )
        out[0] = 0
        return out

    def examples(self, split: str) -> NextItemExamples:
        """Evaluation examples of ``split`` (``valid`` or ``test``)."""
        frame = pd.read_parquet(self.processed_dir / f"{split}_examples.parquet")
        return NextItemExamples.from_frame(frame, self.vocab, self.max_len)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = TrainSessions(training_windows(self.train_sessions(), self.max_len))
            log.info("train windows: %d", len(self.train_set))
        if stage in (None, "fit", "validate") and self.valid_set is None:
            self.valid_set = self.examples("valid")
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.examples("test")

    def train_dataloader(self) -> DataLoader:
        import torch

        assert self.train_set is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=TrainSessions.collate,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def _eval_loader(self, dataset: NextItemExamples | None) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.valid_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
