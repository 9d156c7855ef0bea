"""Item vocabulary: raw ``item_id`` strings <-> model indices 1..num_items, PAD = 0."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from seqrec.constants import PAD_IDX
from seqrec.sequence import first_repeat


class ItemVocab:
    """Bidirectional map between raw item ids (str) and item indices.

    Index ``PAD_IDX`` (0) is reserved for padding; real items get 1..num_items in the order given
    to :meth:`fit` (by descending training frequency, ties by id, so index order is stable).
    """

    def __init__(self, item_ids: Sequence[str]) -> None:
        """Args:
            item_ids: raw ids in index order (``item_ids[i]`` gets index ``i + 1``).

        Raises:
            ValueError: an empty id (which an export's ``item_vocab.json`` may not hold, so
                such a vocab could be trained on but never served), naming its position; a
                duplicate id, naming it and its two positions.
        """
        ids = [str(i) for i in item_ids]
        if "" in ids:
            raise ValueError(
                f"ItemVocab: the item id at position {ids.index('')} (0-based) is the empty string"
            )
        repeat = first_repeat(ids)
        if repeat is not None:
            first, second = repeat
            raise ValueError(
                f"ItemVocab: duplicate item id {ids[second]!r:.80} at positions {first} and "
                f"{second} (0-based)"
            )
        self._ids: list[str] = ids
        self._index = pd.Index(ids)

    @classmethod
    def fit(cls, item_ids: Iterable[str]) -> ItemVocab:
        """Build the vocab from every occurrence of raw ids in the training data.

        Args:
            item_ids: raw ids, one per event (repeats define frequency order).
        """
        counts = pd.Series(list(item_ids), dtype=object).astype(str).value_counts()
        frame = counts.rename_axis("item").reset_index(name="count")
        frame = frame.sort_values(["count", "item"], ascending=[False, True], kind="stable")
        return cls(frame["item"].tolist())

    @property
    def num_items(self) -> int:
        """Number of real items (excludes PAD)."""
        return len(self._ids)

    @property
    def item_ids(self) -> list[str]:
        """Raw ids in index order: ``item_ids[i - 1]`` has index i."""
        return list(self._ids)

    def __len__(self) -> int:
        return self.num_items

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._index

    def encode(self, item_ids: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
        """Map raw ids to indices.

        Returns:
            (N,) int64 array; unknown ids map to ``PAD_IDX`` (0) so callers can drop and count them.
        """
        # pandas' astype(str) calls str() per id; numpy's fixed-width str dtype would silently drop
        # trailing NUL characters and map such ids to the wrong entry (or to PAD).
        ids = pd.Index(pd.Series(np.asarray(item_ids, dtype=object), dtype=object).astype(str))
        positions = self._index.get_indexer(ids)
        return np.where(positions >= 0, positions + 1, PAD_IDX).astype(np.int64)

    def decode(self, item_idxs: Sequence[int] | np.ndarray) -> list[str]:
        """Map indices 1..num_items back to raw ids.

        Raises:
            ValueError: for PAD or an index outside 1..num_items.
        """
        idxs = np.asarray(item_idxs, dtype=np.int64)
        if idxs.size and (idxs.min() < 1 or idxs.max() > self.num_items):
            raise ValueError(
                f"item index out of range 1..{self.num_items}: "
                f"{idxs[(idxs < 1) | (idxs > self.num_items)][:5].tolist()}"
            )
        return [self._ids[i - 1] for i in idxs.tolist()]

    def save(self, path: str | Path) -> Path:
        """Write ``{"pad_idx": 0, "item_ids": [...]}`` as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pad_idx": PAD_IDX, "item_ids": self._ids}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ItemVocab:
        """Read a vocab written by :meth:`save`.

        Raises:
            ValueError: if the file is not a vocab of this format.
        """
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "item_ids" not in data or data.get("pad_idx") != PAD_IDX:
            raise ValueError(f"{path}: not an item vocabulary (need pad_idx=0 and item_ids)")
        return cls(data["item_ids"])
