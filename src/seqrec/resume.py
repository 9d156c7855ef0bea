"""Exact resumption of a killed training run, and the guard that keeps runs from overwriting each other.

A run killed at any step and restarted with ``ckpt_path=<run>/checkpoints/last.ckpt`` continues
with the same batches, in the same order, with the same random numbers as a run that was never
interrupted, so its final weights and metrics are the same. Lightning (2.x) restores the weights,
optimizer, schedulers, loop counters and callback states on its own; three pieces here supply the
rest:

* :class:`EpochShuffleSampler`: the training order of epoch ``e`` is a pure function of
  ``(seed, e)`` (Lightning calls ``set_epoch`` at every epoch start), not of how many permutations
  a generator drew before, so epoch 3 of a resumed run is epoch 3 of the original run;
* :class:`ResumableDataLoader`: counts the batches of the current epoch it has handed out. Lightning
  saves that count in every checkpoint (a loader with ``state_dict`` / ``load_state_dict`` is
  "resumable" to it) and gives it back on resume; the loader then skips exactly those batches
  instead of restarting the epoch (without it Lightning 2.x restarts the epoch's iterator from the
  beginning while its counters say the epoch is partly done, and warns that the loader is not
  resumable);
* :class:`RNGStateCallback`: stores the torch / numpy / Python random states in the checkpoint
  and restores them just before the first training batch after a resume, so dropout masks and
  sampled negatives continue the same stream.

:func:`check_output_dir` refuses to train into a directory that already holds checkpoints unless
the run resumes (``ckpt_path`` set).

Exact means bit for bit on one device. Under DDP the batch order and position are restored too,
but the random states in the checkpoint are rank 0's, so other ranks' dropout streams differ.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)


class EpochShuffleSampler(Sampler[int]):
    """A fresh random order of ``range(num_samples)`` per epoch, determined by ``(seed, epoch)``.

    With ``lengths`` the order is *length-bucketed*: the random permutation is cut into chunks of
    ``bucket_batches * batch_size`` samples, each chunk is sorted by length and cut into batches, and
    the full batches are shuffled (the short last batch, if any, stays last so that consecutive
    ``batch_size`` runs of the order are exactly these batches). Every sample still appears once per
    epoch, batches are still random across the epoch, but a batch holds windows of similar length,
    so padding to the batch's longest window wastes little. This is the usual bucketing trick of
    sequence-model trainers (e.g. fairseq's and torchtext's bucket iterators).

    Args:
        num_samples: dataset size.
        seed: base seed (any int; reduced modulo 2**32).
        lengths: optional (num_samples,) sample lengths; enables bucketing.
        batch_size: batch size of the loader (needed with ``lengths``).
        bucket_batches: batches per sorted chunk (larger = less padding, less randomness).

    Raises:
        ValueError: ``lengths`` of the wrong size, or ``batch_size`` / ``bucket_batches`` < 1.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        lengths: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 1,
        bucket_batches: int = 50,
    ) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed) % 2**32
        self.epoch = 0
        self._start = 0
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        if self.lengths is not None and self.lengths.shape != (self.num_samples,):
            raise ValueError(
                f"lengths has shape {self.lengths.shape}, expected ({self.num_samples},)"
            )
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError(
                f"batch_size and bucket_batches must be >= 1, got {batch_size}, {bucket_batches}"
            )
        self.batch_size = int(batch_size)
        self.bucket_batches = int(bucket_batches)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (called by Lightning)."""
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """(num_samples,) int64 permutation of this epoch (length-bucketed when ``lengths``)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples)
        if self.lengths is None:
            return order
        chunk = self.batch_size * self.bucket_batches
        for start in range(0, self.num_samples, chunk):
            part = order[start : start + chunk]
            order[start : start + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
        num_full = self.num_samples // self.batch_size
        full = order[: num_full * self.batch_size].reshape(num_full, self.batch_size)
        rest = order[num_full * self.batch_size :]
        return np.concatenate([full[rng.permutation(num_full)].reshape(-1), rest])

    def skip_next(self, num_samples: int) -> None:
        """Make the next iteration start ``num_samples`` into this epoch's order (one time)."""
        self._start = int(num_samples)

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is drawn at the first next(), after Lightning's set_epoch().
        start, self._start = self._start, 0
        yield from self.order()[start:].tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """Training loader over an :class:`EpochShuffleSampler` that Lightning can checkpoint mid-epoch.

    ``state_dict()`` is ``{"epoch", "num_batches"}``: the batches of ``epoch`` handed out so far.
    After ``load_state_dict``, the next iteration of that same epoch skips those batches (at the
    sampler, so nothing is loaded twice); any other epoch starts from its first batch. ``len()``
    stays the full epoch, which is what Lightning's counters expect.

    Under DDP Lightning rebuilds the loader with its distributed sampler (passed as ``sampler``),
    which wraps the :class:`EpochShuffleSampler` and shuffles by epoch itself; the position is then
    restored by drawing and discarding the batches already trained on.

    Args:
        dataset: map-style dataset.
        batch_size: samples per batch (all batches but the last are full, so skipping ``n``
            batches skips ``n * batch_size`` samples).
        seed: seed of the per-epoch order.
        lengths: optional (len(dataset),) sample lengths: batches are length-bucketed (see
            :class:`EpochShuffleSampler`). Under DDP Lightning's distributed sampler re-deals the
            order across ranks, so bucketing is then only approximate.
        sampler: ``None`` (an :class:`EpochShuffleSampler` is made); set by Lightning only.
        **kwargs: other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        sampler: Sampler | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
        **kwargs: Any,
    ) -> None:
        # A generator of our own keeps DataLoader from drawing its worker base seed from the global
        # torch RNG, so creating an iterator never shifts the random stream of training.
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed) % 2**63))
        kwargs.pop("shuffle", None)  # the sampler decides the order
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler
            if sampler is not None
            else EpochShuffleSampler(len(dataset), seed, lengths, batch_size),  # type: ignore[arg-type]
            **kwargs,
        )
        self.seed = seed
        self._epoch = 0
        self._num_batches = 0
        self._resume: dict[str, int] | None = None

    def _current_epoch(self) -> int:
        epoch = getattr(self.sampler, "epoch", 0)  # EpochShuffleSampler or DistributedSampler
        return int(epoch)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: runs at the first next(), after Lightning has called set_epoch().
        epoch = self._current_epoch()
        skip = 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch:
                skip = self._resume["num_batches"]
                log.info("resuming epoch %d after batch %d", epoch, skip)
            self._resume = None
        fast_skip = isinstance(self.sampler, EpochShuffleSampler)
        if fast_skip:
            self.sampler.skip_next(skip * int(self.batch_size or 1))
        self._epoch, self._num_batches = epoch, skip
        batches = super().__iter__()
        if not fast_skip:
            for _ in range(skip):
                next(batches, None)
        for batch in batches:
            self._num_batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position in the epoch, saved by Lightning in every checkpoint."""
        return {"epoch": self._epoch, "num_batches": self._num_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip the batches already trained on when this epoch is iterated next."""
        self._resume = {
            "epoch": int(state_dict["epoch"]),
            "num_batches": int(state_dict["num_batches"]),
        }


class RNGStateCallback(pl.Callback):
    """Saves the global random states in checkpoints; restores them when training resumes.

    The states are captured when a checkpoint is written and put back at the first
    ``on_train_batch_start`` after loading, i.e. at the same point of the random stream as in the
    run that wrote the checkpoint (nothing between a save and the next batch draws random numbers:
    the training loader has its own generator).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()  # noqa: NPY002 - the global state seed_everything sets
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                "pos": int(np_state[2]),
                "has_gauss": int(np_state[3]),
                "cached_gaussian": float(np_state[4]),
            },
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np_state = state["numpy"]
        np.random.set_state(  # noqa: NPY002
            (
                "MT19937",
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        log.info("restored random states at global step %d", trainer.global_step)


class RunDirectoryError(FileExistsError):
    """A run would write checkpoints into a directory that already holds some."""


def check_output_dir(checkpoint_dirs: Sequence[str | Path], ckpt_path: str | Path | None) -> None:
    """Refuse to start a fresh run where checkpoints already exist; resuming is allowed.

    Args:
        checkpoint_dirs: directories the run's checkpoint callbacks write to.
        ckpt_path: checkpoint the run resumes from (``None`` = fresh run).

    Raises:
        FileNotFoundError: ``ckpt_path`` is given but does not exist.
        RunDirectoryError: a fresh run and a directory already holds ``*.ckpt`` files.
    """
    if ckpt_path is not None:
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: checkpoint not found")
        return
    for directory in dict.fromkeys(Path(d) for d in checkpoint_dirs):
        existing = sorted(p.name for p in directory.glob("*.ckpt")) if directory.is_dir() else []
        if existing:
            raise RunDirectoryError(
                f"{directory} already holds checkpoint(s) {existing[:5]}: refusing to overwrite "
                f"them. To continue that run pass ckpt_path={directory / 'last.ckpt'}; to start "
                "a new one use a new output directory (the default run directory is unique per "
                "start time and process id)."
            )
