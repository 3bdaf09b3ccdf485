"""The prefetch thread changes when batches are made, never which: same batches, same iterator
state (checkpoints interchangeable with and without it), errors raised where they happened,
counters of the consumed batch, and a thread that always stops."""

import json
import threading
import time
import traceback

import ml_collections
import numpy as np
import pytest

from jaxsora.compression import PixelSpace
from jaxsora.data import pipeline
from jaxsora.data.media import BadMediaError
from jaxsora.data.prefetch import Prefetcher, from_config
from tests.conftest import runlocal_config

TIMEOUT_S = 30  # a hang fails the test instead of the suite


def within_timeout(fn, *args):
    """fn(*args) on a daemon thread; a call still running after TIMEOUT_S fails the test (and
    the stuck thread cannot keep pytest from exiting)."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"no result within {TIMEOUT_S}s: the prefetcher hangs")
    if "error" in box:
        raise box["error"]
    return box["result"]


def take(it, n: int) -> list:
    return within_timeout(lambda: [next(it) for _ in range(n)])


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def prefetch_threads() -> set[threading.Thread]:
    """Running prefetch threads (compare before and after: a failed test may leave one)."""
    return {t for t in threading.enumerate() if t.name == "jaxsora-prefetch"}


class Counting:
    """An endless iterator of numbered batches that skips one 'medium' per batch and can fail
    at a chosen batch; `made` counts how far the producer has run."""

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None):
        self.made = 0
        self.skipped = 0
        self.fail_at, self.error = fail_at, error

    def __next__(self):
        if self.made == self.fail_at:
            raise self.error
        self.made += 1
        self.skipped += 1
        return {"n": np.asarray(self.made)}

    def get_state(self) -> dict:
        return {"made": self.made, "skipped": self.skipped}

    def set_state(self, state: dict) -> None:
        self.made, self.skipped = state["made"], state["skipped"]


def wait_until(predicate) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def config(data_dir):
    return runlocal_config(data_dir)


def real_batches(config, depth: int) -> Prefetcher:
    return Prefetcher(pipeline.make_batches(config, PixelSpace()), depth)


def test_prefetching_yields_the_same_batches_as_the_plain_pipeline(config):
    plain = take(real_batches(config, 0), 6)
    it = real_batches(config, 2)
    assert_same_batches(take(it, 6), plain)
    it.close()


def test_state_is_the_consumers_and_restores_exactly_either_way(config):
    k, more = 3, 3
    plain, ahead = real_batches(config, 0), real_batches(config, 2)
    take(plain, k)
    take(ahead, k)
    wait_until(lambda: ahead.inner.get_state() != plain.get_state())  # the thread ran ahead
    saved = (ahead.get_state(), plain.get_state())
    assert saved[0] == saved[1]  # the checkpoint does not depend on the depth
    expected = take(plain, more)
    assert_same_batches(take(ahead, more), expected)

    # A prefetched state into a plain iterator and into a prefetcher, a plain one into both.
    for state in saved:
        for depth in (0, 2):
            restored = real_batches(config, depth)
            restored.set_state(json.loads(json.dumps(state)))  # as the checkpointer stores it
            assert_same_batches(take(restored, more), expected)
            restored.close()

    ahead.set_state(saved[0])  # restoring a running prefetcher drops what it made ahead
    assert_same_batches(take(ahead, more), expected)
    ahead.close()


@pytest.mark.parametrize(
    "error", [RuntimeError("over the error budget"), BadMediaError("clip.mp4", "no frames")]
)
def test_inner_error_is_raised_at_its_batch_with_its_traceback(error):
    fail_at, before = 4, prefetch_threads()
    it = Prefetcher(Counting(fail_at, error), depth=2)
    assert [int(b["n"]) for b in take(it, fail_at)] == [1, 2, 3, 4]
    with pytest.raises(type(error)) as raised:
        take(it, 1)
    assert raised.value is error
    frames = [f.name for f in traceback.extract_tb(raised.value.__traceback__)]
    assert "__next__" in frames and "_produce" in frames  # raised in the inner iterator
    assert it.get_state() == {"made": fail_at, "skipped": fail_at}
    assert prefetch_threads() == before  # the thread stopped
    with pytest.raises(type(error)):  # and stays failed, without hanging
        take(it, 1)


def test_end_of_a_finite_iterator_ends_the_prefetcher():
    it = Prefetcher(Counting(fail_at=2, error=StopIteration()), depth=3)
    assert within_timeout(lambda: [int(b["n"]) for b in it]) == [1, 2]


def test_skipped_counts_the_consumed_batch_not_the_producers():
    inner = Counting()
    it = Prefetcher(inner, depth=3)
    take(it, 2)
    wait_until(lambda: inner.made >= 2 + 3)  # the queue is full: the thread is ahead
    assert it.skipped == 2
    assert it.get_state() == {"made": 2, "skipped": 2}
    it.close()


def test_close_stops_the_thread_and_rewinds_to_the_consumed_batch():
    inner, before = Counting(), prefetch_threads()
    it = Prefetcher(inner, depth=2)
    take(it, 3)
    (thread,) = prefetch_threads() - before
    assert thread.daemon  # never keeps the process alive
    within_timeout(it.close)
    assert not thread.is_alive()
    assert inner.get_state() == {"made": 3, "skipped": 3}
    assert int(take(it, 1)[0]["n"]) == 4  # usable again, nothing lost
    it.close()


def test_pipeline_skipped_property_reads_the_packer(config):
    batches = pipeline.make_batches(config, PixelSpace())
    batches.packer.skipped = 5
    assert batches.skipped == 5


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_bad_prefetch_config_is_one_clear_error(value):
    config = ml_collections.ConfigDict({"data": {"prefetch": value}})
    with pytest.raises(ValueError, match=r"data\.prefetch=.* must be an integer >= 0"):
        from_config(Counting(), config)
