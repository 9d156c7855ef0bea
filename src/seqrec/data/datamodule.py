"""Lightning data module over a processed data directory (see ``seqrec.pipeline.prepare``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from seqrec.constants import SESSION_ID, TS_MS
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
        include_valid_in_train: also train on the validation sessions (a final refit with settings
            chosen earlier on the held-out validation split; validation metrics are then not
            held-out and must not be used for selection).
        length_bucketing: batch training windows of similar length together (less padding; see
            :class:`seqrec.resume.EpochShuffleSampler`). Measured by ``scripts/bench_train.py``.
    """

    def __init__(
        self,
        processed_dir: str,
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        include_valid_in_train: bool = False,
        length_bucketing: bool = True,
    ) -> None:
        super().__init__()
        self.processed_dir = Path(processed_dir)
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.include_valid_in_train = include_valid_in_train
        self.length_bucketing = length_bucketing
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

    def _train_frame(self) -> pd.DataFrame:
        frames = [pd.read_parquet(self.processed_dir / "train.parquet")]
        if self.include_valid_in_train:
            frames.append(pd.read_parquet(self.processed_dir / "valid.parquet"))
        frame = pd.concat(frames, ignore_index=True)
        if len(frame) and not frame[TS_MS].isna().any():
            # chronological session order (by first event; stable), so index order = recency
            start = (
                frame.groupby(SESSION_ID, sort=False)[TS_MS]
                .transform("min")
                .to_numpy(dtype=np.int64)
            )
            frame = frame.iloc[np.lexsort((frame[TS_MS].to_numpy(dtype=np.int64), start))]
        return frame

    def train_sessions(self) -> list[np.ndarray]:
        """Training sessions as item-index arrays, oldest session first.

        Sessions are ordered by their first event time when the data has timestamps, else by file
        order (the pre-split benchmark files are in time order).
        """
        return sessions_to_index_lists(self._train_frame(), self.vocab)

    def train_session_start_s(self) -> np.ndarray | None:
        """(S,) float64 start time in seconds of each training session (same order as
        :meth:`train_sessions`), or None when the data has no timestamps."""
        frame = self._train_frame()
        if not len(frame) or frame[TS_MS].isna().any():
            return None
        starts = frame.groupby(SESSION_ID, sort=False)[TS_MS].min()
        return starts.to_numpy(dtype=np.float64) / 1000.0

    def item_counts(self) -> np.ndarray:
        """(C,) int64 training-event count per item index (PAD = 0)."""
        from seqrec.baselines import item_counts

        return item_counts(self.train_sessions(), self.num_items)

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
        """Shuffled training windows; the order of epoch e depends only on ``(seed, e)`` and the
        loader's position is saved in checkpoints, so a resumed run sees exactly the remaining
        batches (see :mod:`seqrec.resume`)."""
        from seqrec.resume import ResumableDataLoader

        assert self.train_set is not None
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            lengths=[len(w) for w in self.train_set.windows] if self.length_bucketing else None,
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
