"""Runs a batch iterator ahead of the training step, in a background thread (`data.prefetch`).

The train loop dispatches the compiled step asynchronously, so while the device (or XLA's CPU
threads) works on step n the host is idle; without prefetching, decoding, resizing, patchifying
and packing batch n+1 only start once step n is dispatched, and the step waits for them. Here a
thread keeps up to `depth` batches ready (decoding in PyAV and most NumPy work release the GIL).

Two promises hold whatever the depth:
  * Determinism: the thread is the inner iterator's only caller, in order, so the batches are
    exactly the inner iterator's.
  * Exact restore: each batch travels with the inner state recorded right after producing it,
    and `get_state()` is the state after the last batch the *consumer* took, not how far the
    thread has run ahead. It is the inner iterator's own state, so a checkpoint written with
    prefetching restores without it and the other way round.

An error raised by the inner iterator (a BadMediaError, the error budget's RuntimeError) is
raised in the consumer at the batch where it happened, with its type and traceback; the thread
stops there.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import threading
from collections.abc import Iterator
from typing import Any

from jaxsora import config_checks

_POLL_S = 0.1  # how often a blocked thread looks up to see whether it was told to stop


def from_config(inner, config) -> Prefetcher:
    """`inner` run `config.data.prefetch` batches ahead (configs without the field: 0, off)."""
    config_checks.check_fields(config, (config_checks.PREFETCH_CHECK,))
    return Prefetcher(inner, config.data.get("prefetch", 0))


@dataclasses.dataclass(frozen=True)
class _Batch:
    batch: Any
    state: Any  # the inner iterator's state right after producing `batch`
    skipped: int  # its count of skipped media at that moment


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException  # StopIteration included: the end of a finite iterator


def _after_batch(inner, batch) -> _Batch:
    # A deep copy: the producer goes on mutating the inner iterator's state.
    return _Batch(batch, copy.deepcopy(inner.get_state()), int(getattr(inner, "skipped", 0)))


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Waits for room in the queue, waking up to notice a stop; False if stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False


def _produce(inner, out: queue.Queue, stop: threading.Event) -> None:
    """The thread's body. It holds no reference to the Prefetcher, so a dropped prefetcher can
    be collected (its __del__ stops the thread)."""
    try:
        while not stop.is_set():
            if not _put(out, _after_batch(inner, next(inner)), stop):
                return
    except BaseException as e:  # every error ends the thread and is raised in the consumer
        _put(out, _Failure(e), stop)


class Prefetcher(Iterator):
    """Wraps an iterator with get_state()/set_state() (and optionally `skipped`); depth 0 calls
    it on the caller's thread, exactly as without the wrapper."""

    def __init__(self, inner, depth: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.inner, self.depth = inner, depth
        self._lock = threading.Lock()  # get_state() may come from another thread
        self._consumed = _after_batch(inner, None)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._failure: BaseException | None = None

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self.depth == 0:
            item = _after_batch(self.inner, next(self.inner))
        else:
            item = self._next_from_thread()
        with self._lock:  # kept without the batch, which belongs to the caller now
            self._consumed = dataclasses.replace(item, batch=None)
        return item.batch

    def _next_from_thread(self) -> _Batch:
        if self._failure is not None:  # the thread stopped at an error: it stays raised
            raise self._failure
        if self._thread is None:
            self._start()
        item = self._take()
        if isinstance(item, _Failure):
            self._failure = item.error
            self._thread.join()  # it has posted its last item and is returning
            raise item.error
        return item

    def _take(self):
        """The next item, or an error if the thread died without posting one (never a hang)."""
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(
                        "the input pipeline thread ended without a batch or an error"
                    ) from None

    def _start(self) -> None:
        # Started on the first batch, not in __init__: a restore that follows construction then
        # never throws away batches made from the fresh state.
        self._queue, self._stop = queue.Queue(maxsize=self.depth), threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(self.inner, self._queue, self._stop),
            name="jaxsora-prefetch",
            daemon=True,  # the process always exits, even if close() is never called
        )
        self._thread.start()

    def _stop_thread(self) -> bool:
        """Stops and joins the thread, dropping what it made ahead; True if one was running."""
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()  # waits at most for the batch it is making and one poll
        self._thread = self._queue = self._stop = None
        return True

    @property
    def skipped(self) -> int:
        """Skipped media as of the last batch taken (what the training log reports)."""
        with self._lock:
            return self._consumed.skipped

    def get_state(self):
        with self._lock:
            return copy.deepcopy(self._consumed.state)

    def set_state(self, state) -> None:
        """Stops the thread, drops its batches and restores the inner iterator; the thread
        starts again on the next batch."""
        self._stop_thread()
        self.inner.set_state(state)
        self._failure = None
        with self._lock:
            self._consumed = _after_batch(self.inner, None)

    def close(self) -> None:
        """Stops the thread and rewinds the inner iterator to the last batch taken, so it can
        be used again (directly, or through this prefetcher) without losing a batch."""
        if self._stop_thread():
            self.inner.set_state(self.get_state())
        self._failure = None

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
