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
import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
from cachetools import LRUCache


class _Room:
    """Writable buffers with room for positions beyond a state's own: each
    :meth:`SessionState.extended` appends in place when its state is the longest written so far
    (the usual next click), instead of copying every earlier position again."""

    __slots__ = ("copy_keys", "end", "kv", "lock", "nbytes", "read_only")

    def __init__(self, kv: np.ndarray, copy_keys: np.ndarray | None, end: int) -> None:
        self.kv = kv  # (2 * n_layers, H, capacity, Dh) float32
        self.copy_keys = copy_keys  # (capacity, D) float32 or None
        self.end = end  # positions written
        self.lock = threading.Lock()
        self.nbytes = int(kv.nbytes + (0 if copy_keys is None else copy_keys.nbytes))
        # read-only views of the whole buffers, made once: a state's arrays are slices of them,
        # read-only without setting a flag per state
        self.read_only = tuple(_read_only(a) for a in (kv, copy_keys))

    def claim(self, length: int) -> bool:
        """Reserve position ``length`` for a state of ``length`` positions: True when nothing
        was written there yet and there is room (then the caller writes it)."""
        with self.lock:
            if self.end != length or length >= self.kv.shape[2]:
                return False
            self.end = length + 1
            return True

    def state(self, length: int) -> SessionState:
        """The read-only state of the first ``length`` positions."""
        kv, copy_keys = self.read_only
        return SessionState(
            kv[:, :, :length], None if copy_keys is None else copy_keys[:length], self
        )


def _read_only(array: np.ndarray | None) -> np.ndarray | None:
    """A read-only view of ``array`` (None stays None)."""
    if array is None:
        return None
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class SessionState:
    """Transformer states of one session's n positions (read-only arrays).

    Attributes:
        kv: (2 * n_layers, H, n, Dh) float32 keys (even rows) and values (odd rows) of each block.
        copy_keys: (n, D) float32 pointer keys of the copy mechanism, or None for models without
            it.
        room: the buffers ``kv`` and ``copy_keys`` are views of when they have room for more
            positions (states built by :meth:`extended`), else None.
    """

    kv: np.ndarray
    copy_keys: np.ndarray | None
    room: _Room | None = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        """Number of positions n."""
        return int(self.kv.shape[2])

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes: the whole buffers, room included, when the state has room."""
        if self.room is not None:
            return self.room.nbytes
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
        return SessionState(self.kv[:, :, :-1], copy_keys, self.room)

    def extended(
        self, kv_new: np.ndarray, copy_key_new: np.ndarray | None, max_length: int | None = None
    ) -> SessionState:
        """This state plus one position; ``self`` is unchanged and may stay cached.

        The new position is written in place after this state's positions when its buffer has
        room and no other state was extended from it yet (one session clicking on: no copy);
        otherwise every position is copied into a new buffer with room to grow (twice the new
        length, at most ``max_length``), as a Python list grows (amortised constant cost per
        click instead of one copy of the whole state per click).

        Args:
            kv_new: (2 * n_layers, H, 1, Dh) float32 keys and values of the new position.
            copy_key_new: (1, D) float32 pointer key of the new position, or None.
            max_length: the most positions a state of this session can have (the model's
                context, ``max_len``); None: no bound on the room.
        """
        n = self.length
        has_keys = self.copy_keys is not None and copy_key_new is not None
        room = self.room
        if room is not None and (room.copy_keys is not None) == has_keys and room.claim(n):
            room.kv[:, :, n] = kv_new[:, :, 0]
            if has_keys:
                room.copy_keys[n] = copy_key_new[0]  # type: ignore[index]
            return room.state(n + 1)
        capacity = 2 * (n + 1) if max_length is None else max(n + 1, min(2 * (n + 1), max_length))
        layers2, heads, _, head_dim = self.kv.shape
        kv = np.empty((layers2, heads, capacity, head_dim), dtype=np.float32)
        kv[:, :, :n] = self.kv
        kv[:, :, n] = kv_new[:, :, 0]
        copy_keys = None
        if has_keys:
            copy_keys = np.empty((capacity, self.copy_keys.shape[1]), dtype=np.float32)  # type: ignore[union-attr]
            copy_keys[:n] = self.copy_keys
            copy_keys[n] = copy_key_new[0]  # type: ignore[index]
        return _Room(kv, copy_keys, n + 1).state(n + 1)


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


class StackScratch:
    """Reusable memory for :func:`stack_past` (and the predictor's score mask, see
    :meth:`zeros`), one buffer per thread and input.

    A batch of 64 sessions of 50 items stacks 6.5 MB of states per step; a fresh ``np.zeros``
    of that size costs page faults on every call (about 1 ms on the benchmark machine), a buffer
    kept from the previous call does not. Each thread gets its own buffers
    (``threading.local``), so concurrent calls never share one; a caller must not keep the
    stacked arrays past its next :func:`stack_past` call in the same thread (the predictor only
    feeds them to one onnxruntime call).
    """

    def __init__(self, max_bytes: int = 32 * 2**20) -> None:
        """Args:
        max_bytes: largest array served from a kept buffer, in bytes; larger ones are
            allocated for the call only (so one huge batch does not pin its memory).
        """
        self.max_bytes = max_bytes
        self._local = threading.local()

    def zeros(self, shape: tuple[int, ...], slot: int) -> np.ndarray:
        """A C-contiguous float32 array of ``shape`` filled with zeros for input number ``slot``.

        The buffer is kept for the thread's next call, so the caller must leave it all zeros
        again when done (the predictor's score mask: ``filters.set_excluded`` writes the
        exclusions, then the same call with ``value=0.0`` takes them back out).
        """
        return self._kept(shape, slot, np.zeros)

    def empty(self, shape: tuple[int, ...], slot: int) -> np.ndarray:
        """An uninitialised C-contiguous float32 array of ``shape`` for input number ``slot``
        (the stacked keys and values are slot 0, the pointer keys slot 1)."""
        return self._kept(shape, slot, np.empty)

    def _kept(
        self, shape: tuple[int, ...], slot: int, new: Callable[..., np.ndarray]
    ) -> np.ndarray:
        """This thread's kept buffer of ``slot`` as ``shape`` (made by ``new`` when missing or
        too small; arrays over ``max_bytes`` are made by ``new`` for the call only)."""
        size = math.prod(shape)
        if 4 * size > self.max_bytes:
            return new(shape, dtype=np.float32)
        buffers: dict[int, np.ndarray] = self._local.__dict__.setdefault("buffers", {})
        flat = buffers.get(slot)
        if flat is None or flat.size < size:
            flat = buffers[slot] = new(size, dtype=np.float32)
        return flat[:size].reshape(shape)


def stack_past(
    states: Sequence[SessionState], scratch: StackScratch | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Left-pad and stack session states into the step graph's past inputs.

    Args:
        states: B states of lengths n_b >= 0 (0: a first click, no past).
        scratch: where the stacked arrays live (reused from call to call in one thread); None
            allocates new arrays.

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
    kv_shape = (layers2, len(states), heads, width, head_dim)
    past_kv = np.empty(kv_shape, np.float32) if scratch is None else scratch.empty(kv_shape, 0)
    past_copy = None
    if first.copy_keys is not None:
        copy_shape = (len(states), width, first.copy_keys.shape[1])
        past_copy = (
            np.empty(copy_shape, np.float32) if scratch is None else scratch.empty(copy_shape, 1)
        )
    for row, state in enumerate(states):
        pad = width - state.length
        if pad:
            past_kv[:, row, :, :pad, :] = 0.0
        past_kv[:, row, :, pad:, :] = state.kv
        if past_copy is not None:
            if state.copy_keys is None:  # a state without pointer keys: zeros, as padding
                past_copy[row] = 0.0
                continue
            if pad:
                past_copy[row, :pad] = 0.0
            past_copy[row, pad:] = state.copy_keys
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
        return self.lookup_many([window])[0]

    def lookup_many(self, windows: Sequence[tuple[int, ...]]) -> list[SessionState | None]:
        """:meth:`lookup` of each window, under one acquisition of the lock."""
        cache = self._cache
        states: list[SessionState | None] = []
        with self._lock:
            for window in windows:
                if len(window) < 2:
                    states.append(None)
                    continue
                try:  # one dict lookup (``LRUCache.get`` makes two: ``in``, then the item)
                    state = cache[window[:-1]]
                except KeyError:
                    whole = cache.get(window)
                    state = None if whole is None else whole.without_last()
                if state is None:
                    self.misses += 1
                else:
                    self.hits += 1
                states.append(state)
        return states

    def store(self, window: tuple[int, ...], state: SessionState | None) -> None:
        """Keep ``state`` for ``window`` and drop the state of ``window[:-1]`` (its parent, now
        contained in it). ``None`` only drops the parent (a window no later request can use);
        states larger than the whole cache are skipped."""
        self.store_many([window], [state])

    def store_many(
        self, windows: Sequence[tuple[int, ...]], states: Sequence[SessionState | None]
    ) -> None:
        """:meth:`store` of each window and its state, in order, under one acquisition of the
        lock."""
        cache = self._cache
        most = cache.maxsize
        with self._lock:
            for window, state in zip(windows, states, strict=True):
                # ``del``, not ``pop``: ``LRUCache.pop`` checks, reads (moving it) and deletes;
                # and try/except, not contextlib.suppress (a context manager per state)
                try:  # noqa: SIM105
                    del cache[window[:-1]]
                except KeyError:
                    pass
                if state is not None and state.nbytes <= most:
                    cache[window] = state

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
