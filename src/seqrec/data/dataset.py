"""Torch datasets: training sequences (inputs -> shifted targets) and next-item examples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from seqrec.constants import ITEM_ID, NEXT_ITEM_ID, PAD_IDX, PREFIX_ITEM_IDS, SESSION_ID
from seqrec.data.vocab import ItemVocab
from seqrec.sequence import encode_prefixes


def sessions_to_index_lists(sessions: pd.DataFrame, vocab: ItemVocab) -> list[np.ndarray]:
    """Group a long session frame into per-session item-index arrays, in first-seen session order.

    Args:
        sessions: long frame with ``session_id, item_id``; rows of a session in click order.
        vocab: item vocabulary.

    Returns:
        One (n_i,) int64 array per session.

    Raises:
        ValueError: if an item is not in the vocabulary (callers drop unknown items first).
    """
    if sessions.empty:
        return []
    idxs = vocab.encode(sessions[ITEM_ID].to_numpy())
    if (idxs == PAD_IDX).any():
        bad = sessions[ITEM_ID].to_numpy()[idxs == PAD_IDX][:5].tolist()
        raise ValueError(f"items not in the vocabulary: {bad} (drop unknown items before encoding)")
    codes, _ = pd.factorize(sessions[SESSION_ID], sort=False)
    order = np.argsort(codes, kind="stable")
    boundaries = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(idxs[order], boundaries)


def training_windows(sessions: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut sessions into training windows of at most ``max_len + 1`` items.

    A session of n items gives n - 1 (input, target) pairs. Sessions longer than ``max_len + 1`` are
    cut from the end into windows that overlap by one item, so every transition is trained on
    exactly once and no window is longer than the model context. Sessions of one item are skipped.

    Returns:
        List of (m,) int64 arrays, 2 <= m <= max_len + 1.
    """
    windows: list[np.ndarray] = []
    for items in sessions:
        end = len(items)
        while end >= 2:
            start = max(0, end - (max_len + 1))
            windows.append(items[start:end])
            end = start + 1
            if start == 0:
                break
    return windows


class TrainSessions(Dataset):
    """Training windows; item ``t`` of a window is the target for inputs ``[..t-1]``."""

    def __init__(self, windows: Sequence[np.ndarray]) -> None:
        self.windows = list(windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.windows[index]

    @staticmethod
    def collate(batch: Sequence[np.ndarray], width: int | None = None) -> dict[str, Tensor]:
        """Left-pad a batch to its longest window (or to a fixed ``width``).

        Args:
            batch: windows of item indices (>= 2 each).
            width: pad to this many input positions instead (>= longest window - 1); used by the
                throughput benchmark's "before" variant.

        Returns:
            ``{"item_ids": (B, L') int64, "targets": (B, L') int64}``, L' = longest window - 1
            (or ``width``); ``targets[b, t]`` is the item after ``item_ids[b, t]``; both are PAD
            (0) on the left.
        """
        longest = max(len(w) for w in batch) - 1
        if width is None:
            width = longest
        elif width < longest:
            raise ValueError(f"width {width} < longest window's {longest} input positions")
        inputs = np.zeros((len(batch), width), dtype=np.int64)
        targets = np.zeros((len(batch), width), dtype=np.int64)
        for row, window in enumerate(batch):
            n = len(window) - 1
            inputs[row, width - n :] = window[:-1]
            targets[row, width - n :] = window[1:]
        return {"item_ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}


class NextItemExamples(Dataset):
    """Evaluation examples: one prefix -> next item per row."""

    def __init__(
        self, prefixes: Sequence[np.ndarray], next_items: np.ndarray, max_len: int
    ) -> None:
        if len(prefixes) != len(next_items):
            raise ValueError("prefixes and next_items differ in length")
        self.prefixes = list(prefixes)
        self.next_items = np.asarray(next_items, dtype=np.int64)
        self.max_len = max_len

    @classmethod
    def from_frame(cls, examples: pd.DataFrame, vocab: ItemVocab, max_len: int) -> NextItemExamples:
        """Encode an example frame (``prefix_item_ids``, ``next_item_id``).

        Raises:
            ValueError: if a next item or prefix item is not in the vocabulary.
        """
        next_items = vocab.encode(examples[NEXT_ITEM_ID].to_numpy())
        if (next_items == PAD_IDX).any():
            raise ValueError(
                "next items not in the vocabulary (drop unknown items before encoding)"
            )
        flat = [i for p in examples[PREFIX_ITEM_IDS] for i in p]
        lengths = np.array([len(p) for p in examples[PREFIX_ITEM_IDS]], dtype=np.int64)
        flat_idx = vocab.encode(np.asarray(flat, dtype=object))
        if (flat_idx == PAD_IDX).any():
            raise ValueError(
                "prefix items not in the vocabulary (drop unknown items before encoding)"
            )
        prefixes = np.split(flat_idx, np.cumsum(lengths)[:-1])
        return cls(prefixes, next_items, max_len)

    def __len__(self) -> int:
        return len(self.prefixes)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.prefixes[index], int(self.next_items[index])

    def collate(self, batch: Sequence[tuple[np.ndarray, int]]) -> dict[str, Tensor]:
        """Returns ``{"item_ids": (B, L') int64 left-padded, "next_items": (B,) int64}``."""
        prefixes = [p for p, _ in batch]
        return {
            "item_ids": torch.from_numpy(encode_prefixes(prefixes, self.max_len)),
            "next_items": torch.tensor([t for _, t in batch], dtype=torch.int64),
        }
