"""Per-session transformer states for incremental serving (numpy only, no torch).

A causal transformer never changes the states of earlier positions when an item is appended, so a
shopper's next request (the same session plus one click) only needs the new position computed, as
in the key/value cache of autoregressive language-model decoding (e.g. Pope et al., "Efficiently
Scaling Transformer Inference", MLSys 2023). :class:`SessionState` holds what the step graph of an
incremental export (``seqrec.incremental``) needs from the earlier positions of one session: the
attention keys and values of every block and, for copy-mechanism models, the pointer keys.
:class:`StateCache` keeps them in a thread-safe LRU cache bounded in bytes, keyed by the session's
model window (the item indices the model saw), so a cached state is only ever reused for exactly
the positions it was computed for.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache


@dataclass(frozen=True)
class SessionState:
    """Transformer states of one session's n positions (read-only arrays).

    Attributes:
        kv: (2 * n_layers, H, n, Dh) float32 keys (even rows) and values (odd rows) of each block.
        copy_keys: (n, D) float32 pointer keys of the copy mechanism, or None for models without
            it.
    """

    kv: np.ndarray
    copy_keys: np.ndarray | None

    @property
    def length(self) -> int:
        """Number of positions n."""
        return int(self.kv.shape[2])

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays, in bytes."""
        return int(self.kv.nbytes + (0 if self.copy_keys is None else self.copy_keys.nbytes))

    @staticmethod
    def frozen(kv: np.ndarray, copy_keys: np.ndarray | None) -> SessionState:
        """A state owning C-contiguous, write-protected copies-or-views of ``kv`` / ``copy_keys``."""
        kv = np.ascontiguousarray(kv, dtype=np.float32)
        kv.flags.writeable = False
        if copy_keys is not None:
            copy_keys = np.ascontiguousarray(copy_keys, dtype=np.float32)
            copy_keys.flags.writeable = False
        return SessionState(kv, copy_keys)

    def without_last(self) -> SessionState:
        """The state of the first n - 1 positions (views; n >= 2)."""
        copy_keys = None if self.copy_keys is None else self.copy_keys[:-1]
        return SessionState(self.kv[:, :, :-1], copy_keys)

    def extended(self, kv_new: np.ndarray, copy_key_new: np.ndarray | None) -> SessionState:
        """This state plus one position (new arrays; ``self`` is unchanged and may stay cached).

        Args:
            kv_new: (2 * n_layers, H, 1, Dh) float32 keys and values of the new position.
            copy_key_new: (1, D) float32 pointer key of the new position, or None.
        """
        kv = np.concatenate([self.kv, kv_new], axis=2)
        copy_keys = None
        if self.copy_keys is not None and copy_key_new is not None:
            copy_keys = np.concatenate([self.copy_keys, copy_key_new], axis=0)
        return SessionState.frozen(kv, copy_keys)


def state_bytes_per_item(n_layers: int, d_model: int, copy_mechanism: bool) -> int:
    """Bytes one position adds to a :class:`SessionState`: float32 keys and values of every
    block (2 * n_layers * d_model values) plus the pointer key (d_model) for copy models."""
    return 4 * (2 * n_layers * d_model + (d_model if copy_mechanism else 0))


def states_from_prefill(
    kv: np.ndarray, copy_keys: np.ndarray | None, lengths: Sequence[int]
) -> list[SessionState]:
    """Split the prefill graph's outputs into one state per session.

    Args:
        kv: (2 * n_layers, B, H, L, Dh) float32 ``present_kv`` of a left-padded batch.
        copy_keys: (B, L, D) float32 ``present_copy_keys`` or None.
        lengths: B real lengths n_b <= L (row b's real positions are the last n_b).

    Returns:
        B states holding copies of each row's real positions only.
    """
    width = kv.shape[3]
    return [
        SessionState.frozen(
            kv[:, row, :, width - n :, :],
            None if copy_keys is None else copy_keys[row, width - n :],
        )
        for row, n in enumerate(lengths)
    ]


PAST_KV_NAME = "past_kv"
"""Name of the single stacked cached-state input of step graphs exported before the per-block
inputs of :func:`past_kv_names`."""


@functools.cache
def past_kv_names(layers2: int) -> tuple[str, ...]:
    """Step-graph input names of the cached keys and values, one per row of ``present_kv``:
    ``past_kv_0`` (block 0 keys), ``past_kv_1`` (block 0 values), ... (``layers2`` = 2 *
    n_layers). One input per block lets onnxruntime read each block's states where they are
    instead of copying them out of one stacked input. Cached: the predictor asks on every
    step."""
    return tuple(f"{PAST_KV_NAME}_{i}" for i in range(layers2))


def past_kv_feed(past_kv: np.ndarray, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Step-graph inputs for the stacked states of :func:`stack_past`.

    Args:
        past_kv: (2 * n_layers, B, H, P, Dh) float32, C-contiguous.
        input_names: the step graph's input names: either the per-block names of
            :func:`past_kv_names` (each gets a (B, H, P, Dh) view of one row, no copy) or the
            single ``past_kv`` input of exports written before the per-block inputs.

    Returns:
        ``{name: array}`` for the cached-state inputs only.
    """
    if PAST_KV_NAME in input_names:
        return {PAST_KV_NAME: past_kv}
    return dict(zip(past_kv_names(len(past_kv)), past_kv, strict=True))


def stack_past(states: Sequence[SessionState]) -> tuple[np.ndarray, np.ndarray | None]:
    """Left-pad and stack session states into the step graph's past inputs.

    Args:
        states: B states of lengths n_b >= 1.

    Returns:
        ``(past_kv, past_copy_keys)``: (2 * n_layers, B, H, P, Dh) float32 with P = max n_b and
        row b's positions in the last n_b slots (zeros before them; the step graph masks them
        through the PAD items of its ``item_ids``), and (B, P, D) float32 or None.
    """
    if len(states) == 1:  # a batch axis of 1 (no copy unless the state is a view)
        state = states[0]
        copy_keys = None if state.copy_keys is None else np.ascontiguousarray(state.copy_keys[None])
        return np.ascontiguousarray(state.kv[:, None]), copy_keys
    first = states[0]
    width = max(s.length for s in states)
    layers2, heads, _, head_dim = first.kv.shape
    past_kv = np.zeros((layers2, len(states), heads, width, head_dim), dtype=np.float32)
    past_copy = None
    if first.copy_keys is not None:
        past_copy = np.zeros((len(states), width, first.copy_keys.shape[1]), dtype=np.float32)
    for row, state in enumerate(states):
        past_kv[:, row, :, width - state.length :, :] = state.kv
        if past_copy is not None and state.copy_keys is not None:
            past_copy[row, width - state.length :] = state.copy_keys
    return past_kv, past_copy


class StateCache:
    """Thread-safe LRU cache of :class:`SessionState` by model window, bounded in bytes.

    Built on ``cachetools.LRUCache`` (sizes from ``SessionState.nbytes``) behind a lock; states are
    immutable, so a state handed out stays valid after eviction. A window is the tuple of item
    indices the model read. :meth:`lookup` finds the state of a window minus its newest item;
    :meth:`store` keeps a window's state and drops its parent's, so a visit holds one state (n
    positions) rather than one per click.
    """

    def __init__(self, max_bytes: int) -> None:
        """Args:
            max_bytes: memory bound in bytes (> 0); the least recently used states are evicted
                first. A single state larger than the bound is not stored.

        Raises:
            ValueError: max_bytes < 1.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._cache: LRUCache[Hashable, SessionState] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda state: state.nbytes
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def lookup(self, window: tuple[int, ...]) -> SessionState | None:
        """The state of ``window[:-1]`` (counted as a hit), or None (a miss; windows of one item
        are not counted: they have no earlier positions).

        Found as stored for ``window[:-1]`` (the previous click), or as the first n - 1
        positions of a state stored for ``window`` itself (the same request again, e.g. a page
        reload, after :meth:`store` dropped the parent).
        """
        if len(window) < 2:
            return None
        with self._lock:
            state = self._cache.get(window[:-1])
            if state is None:
                whole = self._cache.get(window)
                state = None if whole is None else whole.without_last()
            if state is None:
                self.misses += 1
            else:
                self.hits += 1
            return state

    def store(self, window: tuple[int, ...], state: SessionState | None) -> None:
        """Keep ``state`` for ``window`` and drop the state of ``window[:-1]`` (its parent, now
        contained in it). ``None`` only drops the parent (a window no later request can use);
        states larger than the whole cache are skipped."""
        with self._lock:
            self._cache.pop(window[:-1], None)
            if state is not None and state.nbytes <= self._cache.maxsize:
                self._cache[window] = state

    def info(self) -> dict[str, int]:
        """``{"hits", "misses", "entries", "bytes", "max_bytes"}``."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._cache),
                "bytes": int(self._cache.currsize),
                "max_bytes": int(self._cache.maxsize),
            }

    def clear(self) -> None:
        """Drop every state and reset the counters."""
        with self._lock:
            self._cache.clear()
            self.hits = 0
            self.misses = 0
