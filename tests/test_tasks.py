"""The training task mix: each segment draws its own task, which gives whole frames clean; the
mix follows its weights; the rest of an example does not depend on the mix; bad weights fail
early, naming the field."""

import collections

import numpy as np
import pytest

from jaxsora.compression import PixelSpace
from jaxsora.data import pipeline, tasks
from tests.conftest import runlocal_config


def test_every_task_gives_whole_frames_and_leaves_one_to_generate():
    rng = np.random.default_rng(0)
    for task in tasks.TASKS:
        for frames in range(1, 9):
            for _ in range(20):
                given = tasks.conditioning_frames(task, frames, rng)
                assert given.shape == (frames,)
                if task == "t2v" or frames < tasks.MIN_FRAMES[task]:
                    assert not given.any(), (task, frames)
                    continue
                assert given.any() and not given.all(), (task, frames, given)
                first, last = given[0], given[-1]
                expected = {
                    "i2v_head": (True, False),
                    "i2v_tail": (False, True),
                    "extend_forward": (True, False),
                    "extend_backward": (False, True),
                    "connect": (True, True),
                    "loop": (True, True),
                }[task]
                assert (first, last) == expected, (task, given)
                if task in ("i2v_head", "i2v_tail"):
                    assert given.sum() == 1
                if task == "loop":
                    assert given.sum() == 2
                if task in ("extend_forward", "extend_backward"):  # one contiguous run
                    assert np.count_nonzero(np.diff(given.astype(int))) == 1


def test_each_segment_draws_its_own_task_with_the_configured_weights(data_dir):
    config = runlocal_config(data_dir)
    config.data.tasks = dict(t2v=0.5, i2v_head=0.25, extend_forward=0.25)
    it = pipeline.make_batches(config, PixelSpace())
    seen = collections.Counter()
    mixed_packs = 0
    for _ in range(30):
        batch = next(it)
        for b in range(batch["segment_ids"].shape[0]):
            seg, cond, frame = batch["segment_ids"][b], batch["cond_mask"][b], batch["positions"][b]
            assert not cond[seg == 0].any(), "padding is never conditioning"
            kinds = set()
            for k in np.unique(seg[seg > 0]):
                rows = seg == k
                t = frame[rows, 0]
                given = np.unique(t[cond[rows]])
                # Whole frames: every token of a given frame is conditioning, none of the others.
                assert (cond[rows] == np.isin(t, given)).all()
                if t.max() == 0:  # an image: nothing to generate around
                    assert not given.size
                    continue
                kind = (
                    "t2v"
                    if not given.size
                    else "i2v_head"
                    if given.tolist() == [0]
                    else "extend_forward"
                )
                if kind == "extend_forward":
                    assert given.tolist() == list(range(len(given))), given
                    assert given.max() < t.max(), "a frame is always left to generate"
                seen[kind] += 1
                kinds.add(kind)
            mixed_packs += len(kinds) > 1
    total = sum(seen.values())
    # extend_forward with k = 1 looks like i2v_head: compare t2v against the conditioned rest.
    assert abs(seen["t2v"] / total - 0.5) < 0.1, seen
    assert seen["extend_forward"] > 0.1 * total, seen
    assert mixed_packs > 10, "segments of one pack draw their tasks independently"


def test_the_mix_changes_only_the_conditioning_mask(data_dir):
    config = runlocal_config(data_dir, "runlocal,t2v")
    plain = next(pipeline.make_batches(config, PixelSpace()))
    assert not plain["cond_mask"].any()
    config.data.tasks = dict(t2v=0.2, connect=0.8)
    mixed = next(pipeline.make_batches(config, PixelSpace()))
    assert mixed["cond_mask"].any()
    for k in plain:
        if k != "cond_mask":
            np.testing.assert_array_equal(plain[k], mixed[k], err_msg=k)


@pytest.mark.parametrize(
    "weights,needle",
    [
        (dict(t2v=1, i2v=1), "unknown task 'i2v'"),
        (dict(t2v=-1.0), r"data.tasks.t2v=-1.0 must be a number >= 0"),
        (dict(t2v=0), "sum to 0"),
        ("t2v", "must be a dict"),
    ],
)
def test_bad_task_weights_are_an_error_naming_the_field(weights, needle):
    with pytest.raises(ValueError, match=needle):
        tasks.check_weights(weights)
