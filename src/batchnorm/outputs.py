"""A cache of large output buffers, so that a training loop stops paying for fresh pages.

A memory-bound op that writes a new 49 MiB output spends as long mapping and zeroing the
output's pages as computing it. glibc serves allocations above its mmap threshold (at most
32 MiB) with fresh pages every time, and neither NumPy nor torch's CPU allocator keeps them.
Measured on this project's machine, (64, 64, 56, 56) float32, module level, one process:
training forward 16.0 -> 9.2 ms, forward + backward 36.4 -> 26.4 ms with the cache (torch.nn:
30.7 and 62.0 ms). Below ~25 MiB malloc already reuses its heap and the cache changes nothing
measurable, so only buffers of at least :data:`MIN_BYTES` are cached.

How a buffer is known to be free: :func:`empty` returns a NumPy array that the caller hands to
``torch.from_numpy`` and does not keep. torch holds a reference to exactly that array object for
as long as the tensor's storage lives (every view, ``.grad``, ``tensor.numpy()`` and saved
tensor included), and the cache holds a weak reference to it. A dead weak reference means no
tensor uses the memory any more, and the buffer is handed out again. No reference counts are
read, so this holds on every CPython version.

The cache holds at most :func:`set_output_cache_limit` bytes (1 GiB by default) in buffers,
whether in use or idle; allocations beyond that are ordinary, uncached ones, and idle buffers
are released least recently used first to make room. :func:`clear_output_cache` releases what
the cache holds (buffers still in use stay alive with their tensors) and
``set_output_cache_limit(0)`` turns caching off. This module imports NumPy only.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_LIMIT",
    "MIN_BYTES",
    "OutputCacheInfo",
    "bypassed",
    "clear_output_cache",
    "empty",
    "output_cache_info",
    "set_output_cache_limit",
]

# Smallest buffer worth caching. Fresh-versus-reused allocate-and-fill on this machine was
# 1.00-1.04x for 0.5-25 MiB (malloc reuses its own heap below its mmap threshold) and 1.38x at
# 51 MiB; 4 MiB keeps the bookkeeping (~1 us) far below the cost of filling the buffer.
MIN_BYTES = 4 << 20
DEFAULT_LIMIT = 1 << 30


class OutputCacheInfo(NamedTuple):
    """What the output cache holds, from :func:`output_cache_info`.

    Attributes:
        limit: Most bytes the cache may hold (0: caching is off).
        held: Bytes in cached buffers, in use or idle.
        idle: Bytes in cached buffers no tensor uses (released by :func:`clear_output_cache`).
        buffers: Number of cached buffers.
        hits: Allocations served by an idle cached buffer since the process started.
        misses: Cacheable allocations that needed a new buffer.
    """

    limit: int
    held: int
    idle: int
    buffers: int
    hits: int
    misses: int


class _Entry:
    """One cached buffer: raw bytes, a weak reference to the array now using it, last use."""

    __slots__ = ("buffer", "user", "tick")

    def __init__(self, buffer: np.ndarray, user: np.ndarray, tick: int) -> None:
        self.buffer = buffer
        self.user = weakref.ref(user)
        self.tick = tick

    def idle(self) -> bool:
        return self.user() is None


class _Cache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.entries: dict[int, list[_Entry]] = {}
        self.held = 0
        self.hits = 0
        self.misses = 0
        self.tick = 0

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES or self.limit == 0:
            return np.empty(shape, dtype)
        with self.lock:
            self.tick += 1
            # Buffers are raw bytes, so float32 and float64 outputs of one size share them.
            for entry in self.entries.get(nbytes, ()):
                if entry.idle():
                    array = entry.buffer.view(dtype).reshape(shape)
                    entry.user = weakref.ref(array)
                    entry.tick = self.tick
                    self.hits += 1
                    return array
            self.misses += 1
            if not self._make_room(nbytes):
                return np.empty(shape, dtype)
            buffer = np.empty(nbytes, np.uint8)
            array = buffer.view(dtype).reshape(shape)
            self.entries.setdefault(nbytes, []).append(_Entry(buffer, array, self.tick))
            self.held += nbytes
            return array

    def _make_room(self, nbytes: int) -> bool:
        """Release idle buffers, least recently used first, until ``nbytes`` more fit."""
        if self.held + nbytes <= self.limit:
            return True
        idle = sorted(
            (e for entries in self.entries.values() for e in entries if e.idle()),
            key=operator.attrgetter("tick"),
        )
        for entry in idle:
            self._drop(entry)
            if self.held + nbytes <= self.limit:
                return True
        return False

    def _drop(self, entry: _Entry) -> None:
        size = entry.buffer.nbytes
        self.entries[size].remove(entry)
        if not self.entries[size]:
            del self.entries[size]
        self.held -= size

    def clear(self) -> None:
        # Forgetting a buffer in use is safe: its array (held by the tensor) keeps it alive, and
        # it is simply no longer reused once that tensor dies.
        with self.lock:
            self.entries.clear()
            self.held = 0

    def info(self) -> OutputCacheInfo:
        with self.lock:
            entries = [e for group in self.entries.values() for e in group]
            idle = sum(e.buffer.nbytes for e in entries if e.idle())
            return OutputCacheInfo(
                self.limit, self.held, idle, len(entries), self.hits, self.misses
            )

    def after_fork(self) -> None:
        # A fork while another thread held the lock would leave it locked forever in the child.
        self.lock = threading.Lock()


_CACHE = _Cache(DEFAULT_LIMIT)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CACHE.after_fork)


def empty(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """An uninitialised array of ``shape`` and ``dtype``, from the cache when it is large.

    Contract: pass the returned array itself to ``torch.from_numpy`` and keep no other lasting
    reference to it; its buffer is reused as soon as that tensor's storage is gone.

    Args:
        shape: The array's shape.
        dtype: Anything :class:`numpy.dtype` accepts.

    Returns:
        A C-contiguous array.
    """
    return _CACHE.empty(tuple(shape), np.dtype(dtype))


def set_output_cache_limit(nbytes: int) -> int:
    """Let the cache of large outputs hold at most ``nbytes`` bytes; ``0`` turns it off.

    Idle buffers beyond the new limit are released at once; buffers in use are released when
    their tensors are gone (or forgotten by the cache, if the limit is 0).

    Args:
        nbytes: Non-negative integer number of bytes (default limit: 1 GiB).

    Returns:
        The previous limit.

    Raises:
        TypeError: ``nbytes`` is not an integer.
        ValueError: ``nbytes`` is negative.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"set_output_cache_limit(): expected nbytes to be an int, got {nbytes!r}.")
    if nbytes < 0:
        raise ValueError(f"set_output_cache_limit(): expected nbytes >= 0, got {nbytes}.")
    previous = _CACHE.limit
    _CACHE.limit = int(nbytes)
    if nbytes == 0:
        _CACHE.clear()
    else:
        with _CACHE.lock:
            _CACHE._make_room(0)
    return previous


def clear_output_cache() -> None:
    """Release the cache's buffers: idle memory goes back to the system now, buffers in use
    when their tensors are gone."""
    _CACHE.clear()


def output_cache_info() -> OutputCacheInfo:
    """How much the cache of large outputs holds, and how often it was used."""
    return _CACHE.info()


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Allocate every output afresh inside the block, leaving the cache's buffers as they are.

    For measuring what the cache saves (``benchmarks.bench_modules --uncached``): unlike
    ``set_output_cache_limit(0)`` it forgets nothing, so the cached path does not pay for
    refilling the cache afterwards. Not thread-safe against concurrent limit changes.
    """
    limit = _CACHE.limit
    _CACHE.limit = 0
    try:
        yield
    finally:
        _CACHE.limit = limit
