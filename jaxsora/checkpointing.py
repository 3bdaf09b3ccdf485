"""Orbax checkpoints of a whole run: model, optimizer, EMA, step, RNG, data iterator, config.

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when every
item is on disk), so an interrupted save is never listed and never restored. Every host writes
its own shards of the arrays, its own data iterator state (`data/process_<i>-of-<n>.json`,
Grain's handler) and a crc32 of every array slice it wrote (`checksums/process_<i>-of-<n>.json`).

Restoring checks what a checkpoint holds before trusting it:
  * a damaged step (missing or unreadable files, a slice whose crc32 differs, a missing or
    garbled data-iterator file for this process count) is skipped for the previous committed
    step, with one warning naming it and why, and moved to `checkpoints/corrupt/<step>` for
    inspection (so the run can save that step again). `fall_back=False` (the trainers'
    `stop_on_damaged_checkpoint=True`) stops with an error naming it instead. When checkpoints
    exist and none loads, it is an error, never a fresh start.
  * a config the checkpoint refuses (`jaxsora/resume.py`, CheckpointMismatchError) is a user
    error: it stops the run and never falls back.
  * with several processes, each reads the step and all agree (an all-gather of "did it load")
    before any of them falls back, so every host restores the same step; only process 0 moves
    a damaged step aside, and the others wait for it.

A full disk ends the run with one error naming the directory and "no space left on device",
checked before each save (free space against the bytes the state needs) and when an
asynchronous save fails; the partial save is removed and the last good checkpoint is intact
(Orbax deletes old checkpoints only after the new one is committed).
"""

from __future__ import annotations

import errno
import json
import logging as pylogging
import os
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

from jaxsora.checkpoint_checksums import named_leaves, shard_checksums, verify_checksums
from jaxsora.resume import CheckpointMismatchError, check_resume

__all__ = [
    "CheckpointCorruptError",
    "CheckpointDiskFullError",
    "CheckpointMismatchError",
    "Checkpointer",
    "abstract_like",
    "resume_check",
]

# A checkpoint Orbax committed holds at least these (OCDBT arrays, our three per-process items).
REQUIRED = ("state/", "state/_METADATA", "state/manifest.ocdbt", "data/", "config/metadata")
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
_FIX_STRICT = "--config.stop_on_damaged_checkpoint=False"


class CheckpointCorruptError(RuntimeError):
    """A committed checkpoint cannot be used as written (and no fallback was allowed or left)."""


class CheckpointDiskFullError(OSError):
    pass


class _Damaged(Exception):
    """Why one step cannot be loaded; becomes a fallback or a CheckpointCorruptError."""


class _StateBytes:
    """Grain's checkpoint handler writes `get_state()` bytes to this process's own file."""

    def __init__(self, value: bytes):
        self._value = value

    def get_state(self) -> bytes:
        return self._value


class _IteratorAsBytes:
    """Grain's checkpoint handler takes non-Grain iterators whose state is bytes."""

    def __init__(self, iterator):
        self._iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self._iterator.get_state()).encode()


class Checkpointer:
    def __init__(
        self, workdir: str, keep: int = 2, fall_back: bool = True, read_only: bool = False
    ):
        """`fall_back`: a damaged latest step gives way to the previous one (else an error).
        `read_only` (the sampler): never move a damaged step aside, never save."""
        if keep < 1:
            raise ValueError(
                f"keep_checkpoints={keep} must be >= 1: Orbax would delete every checkpoint, "
                "the last good one included"
            )
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._fall_back, self._read_only = fall_back, read_only
        self._saving: int | None = None  # the step whose asynchronous save may still fail
        _quiet_failed_write_echoes()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # Orbax removes the oldest only once a newer step is committed, so the last good
                # checkpoint survives a failed save (checked with keep=1 on a full disk).
                preservation_policy=preservation_policy.LatestN(keep),
                enable_async_checkpointing=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "checksums": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    @classmethod
    def for_run(cls, workdir: str, config) -> Checkpointer:
        """The trainers' checkpointer: keep_checkpoints, and stop_on_damaged_checkpoint."""
        return cls(
            workdir,
            keep=config.keep_checkpoints,
            fall_back=not config.get("stop_on_damaged_checkpoint", False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -------------------------------------------------------------------------------------- save
    def save(self, step: int, state: Any, iterator: Any, config_json: str) -> None:
        """Starts an async save; returns once the arrays are copied off the device.

        `iterator` has get_state()/set_state() with JSON-able dicts (this process's data state).
        A previous save that failed in the background raises here (a full disk as one
        CheckpointDiskFullError), and so does a disk without room for this one.
        """
        if self._read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        self.wait()
        self._check_free_space(step, state)
        checksums = json.dumps({"arrays": shard_checksums(state)}).encode()
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(_IteratorAsBytes(iterator)),
                    checksums=grain.checkpoint.CheckpointSave(_StateBytes(checksums)),
                    config=ocp.args.JsonSave(json.loads(config_json)),
                ),
            )
        except Exception as e:
            self._raise_if_disk_full(e, step)
            raise
        self._saving = step
        if not started:
            logging.warning("checkpoint %d not saved: %s holds it or a later step", step, self)

    def wait(self) -> None:
        """Blocks until the last save is committed; raises if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._raise_if_disk_full(e, self._saving)
            raise
        self._saving = None

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __repr__(self) -> str:
        return self.directory

    def _check_free_space(self, step: int, state: Any) -> None:
        """Refuses a save the disk cannot hold, before Orbax writes a byte of it."""
        need, free = self._bytes_needed(state), shutil.disk_usage(self.directory).free
        if jax.process_count() > 1:  # one shared directory, and every host decides alike
            from jax.experimental import multihost_utils

            mib = multihost_utils.process_allgather(np.array([need, free], np.float32) / 2**20)
            need, free = int(mib[:, 0].max() * 2**20), int(mib[:, 1].min() * 2**20)
        if free < need:
            self._disk_full(step, f"it needs about {_mib(need)}, {_mib(free)} is free", False)

    def _bytes_needed(self, state: Any) -> int:
        """What the next save writes: the last committed step's size on disk (the same arrays,
        compressed alike), else the arrays' bytes on every process plus Orbax's metadata."""
        last = self.latest_step()
        if last is not None:
            return int(_disk_size(self.step_dir(last)) * 1.05)
        arrays = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
        shards = [s for x in arrays for s in x.addressable_shards if s.replica_id == 0]
        local = sum(s.data.nbytes for s in shards)
        return int(local * jax.process_count() * 1.05) + 1024 * len(arrays) + 2**18

    def _raise_if_disk_full(self, error: BaseException, step: int | None) -> None:
        if _is_no_space(error):
            self._disk_full(step, "a write failed", True)

    def _disk_full(self, step: int | None, detail: str, wrote: bool) -> None:
        if wrote and jax.process_index() == 0:
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:  # the partial save, never committed
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._manager.reload()  # Orbax listed the failed step already
        last = self.latest_step()
        kept = (
            f"the last good checkpoint, {self.step_dir(last)}, is intact"
            if last is not None
            else "no checkpoint was committed yet"
        )
        resume = f"it resumes from step {last}" if last is not None else "it starts afresh"
        raise CheckpointDiskFullError(
            errno.ENOSPC,
            f"no space left on device for checkpoint step {step} in {self.directory} ({detail}); "
            f"{'the partial save was removed' if wrote else 'nothing was written'} and {kept}. "
            "Free space on that disk (or move the workdir to a bigger one), then rerun the same "
            f"command: {resume}",
        ) from None

    # ----------------------------------------------------------------------------------- restore
    def saved_config(self, step: int) -> dict:
        """The config the run had when it wrote `step` (JSON, as saved)."""
        try:
            return _read_config(self.step_dir(step))
        except _Damaged as e:
            raise CheckpointCorruptError(
                f"checkpoint {self.step_dir(step)} is damaged ({e})"
            ) from None

    def restore(
        self,
        step: int,
        abstract_state: Any,
        iterator: Any | None = None,
        check: Callable[[dict, str], None] | None = None,
    ) -> Any:
        """That step's state on the shardings of `abstract_state` (any mesh, any device count),
        or a CheckpointCorruptError; `check(saved_config, step_dir)` may refuse the config."""
        why, state = self._attempt(step, abstract_state, iterator, check)
        if why is not None:
            raise CheckpointCorruptError(f"checkpoint {self.step_dir(step)} is damaged ({why})")
        return state

    def restore_latest(
        self,
        target: Any | Callable[[dict], Any],
        iterator: Any | None = None,
        check: Callable[[dict, str], None] | None = None,
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest committed step that loads, None if there is none.

        `target` is the abstract state, or a function of the step's saved config giving it.
        The data iterator is restored when the checkpoint was written by this process count;
        written by another, it starts afresh (logged).
        """
        damaged: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            why, state = self._attempt(step, target, iterator, check)
            if why is None:
                for bad, reason in damaged:
                    self._set_aside(bad, reason, step)
                return step, state
            damaged.append((step, why))
            if not self._fall_back:
                raise CheckpointCorruptError(
                    f"checkpoint {self.step_dir(step)} is damaged ({why}). Move it out of "
                    f"{self.directory} (e.g. to {self.directory}/corrupt/) to resume from the "
                    f"previous checkpoint, or pass {_FIX_STRICT} to do that automatically"
                )
        if damaged:
            listed = "; ".join(f"{self.step_dir(s)}: {why}" for s, why in damaged)
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} can be loaded ({listed}). Nothing was moved "
                "or deleted; restore them from a backup, or move checkpoints/ away (or use a new "
                "--workdir) to start afresh"
            )
        return None

    def _attempt(self, step, target, iterator, check) -> tuple[str | None, Any]:
        """(None, state) when every process loaded `step`, else (why, None) on all of them."""
        why, state = None, None
        try:
            state = self._load(step, target, iterator, check)
        except CheckpointMismatchError:
            raise
        except _Damaged as e:
            why = str(e)
        except Exception as e:  # Orbax/TensorStore on a damaged file: many kinds, none typed
            if _is_out_of_memory(e):
                raise  # the machine's limit, not the checkpoint's fault
            why = f"reading it failed: {_first_line(e)}"
        why = _agree(why)
        return why, (state if why is None else None)

    def _load(self, step, target, iterator, check) -> Any:
        where = self.step_dir(step)
        for name in REQUIRED:
            if not os.path.exists(os.path.join(where, name)):
                raise _Damaged(f"{name} is missing")
        config = _read_config(where)
        if check is not None:
            check(config, where)
        data = _read_iterator_state(where) if iterator is not None else None
        abstract = target(config) if callable(target) else target
        _check_layout(where, abstract)
        handler = ocp.StandardCheckpointHandler()
        try:
            state = handler.restore(
                epath.Path(where) / "state", args=ocp.args.StandardRestore(abstract)
            )
        finally:
            handler.close()
        _verify(where, state)
        if iterator is not None:
            _apply_iterator_state(where, iterator, data)
        return state

    def _set_aside(self, step: int, why: str, restored: int) -> None:
        """One warning; the damaged step moves to corrupt/ (process 0), kept for inspection."""
        where = self.step_dir(step)
        if self._read_only:
            logging.warning(
                "checkpoint %s is damaged (%s); loaded step %d instead", where, why, restored
            )
            return
        dest = os.path.join(self.directory, "corrupt", str(step))
        n = 0
        while os.path.exists(dest):  # a step damaged before keeps its own copy
            n += 1
            dest = os.path.join(self.directory, "corrupt", f"{step}.{n}")
        _sync(f"jaxsora: every host named checkpoint {step}'s place in corrupt/")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(where, dest)
            with open(os.path.join(dest, "DAMAGED.txt"), "w") as f:
                f.write(why + "\n")
        _sync(f"jaxsora: checkpoint {step} moved to corrupt/")
        self._manager.reload()  # forget it, so the run can save that step again
        logging.warning(
            "checkpoint %s is damaged (%s); resumed from step %d instead and moved it to %s",
            where,
            why,
            restored,
            dest,
        )


def resume_check(config) -> Callable[[dict, str], None]:
    """The trainers' check of a checkpoint's saved config (the table in jaxsora/resume.py)."""
    current = json.loads(config.to_json())
    allow = bool(config.get("allow_schedule_change", False))
    return lambda saved, where: check_resume(saved, current, where, allow)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with each leaf's sharding: the restore target for any mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ----------------------------------------------------------------------------- the step's items
def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise _Damaged(f"{path} cannot be read ({e.strerror})") from None
    if not text.strip():
        raise _Damaged(f"{path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _Damaged(f"{path} is not valid JSON ({e})") from None


def _read_config(where: str) -> dict:
    config = _read_json(os.path.join(where, "config", "metadata"))
    if not isinstance(config, dict):
        raise _Damaged(f"{where}/config/metadata is not a config (a JSON object)")
    return config


def _process_files(directory: str) -> dict[tuple[int, int], str]:
    """(process index, process count) -> path, for the per-process files of one item."""
    out = {}
    for name in os.listdir(directory):
        m = _PROCESS_FILE.fullmatch(name)
        if m:
            out[int(m.group(1)), int(m.group(2))] = os.path.join(directory, name)
    return out


def _read_iterator_state(where: str) -> Any:
    """This process's data state; None when the step was written by another process count (the
    only case where the stream may start afresh). Missing, empty or garbled: damaged."""
    files = _process_files(os.path.join(where, "data"))
    i, n = jax.process_index(), jax.process_count()
    counts = {count for _, count in files}
    if counts and n not in counts:
        return None
    if (i, n) not in files:
        raise _Damaged(
            f"{where}/data/process_{i}-of-{n}.json is missing (the data iterator's position)"
        )
    return _read_json(files[i, n])


def _apply_iterator_state(where: str, iterator, state) -> None:
    if state is None:
        counts = sorted({c for _, c in _process_files(os.path.join(where, "data"))})
        logging.warning(
            "data iterator starts afresh: checkpoint %s was written by %s processes, this run "
            "has %d (an iterator position is per process)",
            where,
            "/".join(map(str, counts)),
            jax.process_count(),
        )
        return
    path = f"{where}/data/process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
        iterator.set_state(state)
    except (KeyError, TypeError, ValueError) as e:
        raise _Damaged(f"{path} is not a state of this data pipeline ({e!r})") from None


def _check_layout(where: str, abstract: Any) -> None:
    """The saved tree against the one the config builds: a difference is the config's doing
    (CheckpointMismatchError), not damage."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(where) / "state")
        meta = getattr(meta, "tree", meta)
        saved = {n: tuple(x.shape) for n, x in named_leaves(meta, lambda x: hasattr(x, "shape"))}
    except Exception as e:
        raise _Damaged(f"state/_METADATA cannot be read ({_first_line(e)})") from None
    wanted = {n: tuple(x.shape) for n, x in named_leaves(abstract)}
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) != wanted.get(name):
            raise CheckpointMismatchError(
                f"checkpoint {where} holds another state: {name} is "
                f"{_shape_or_absent(saved.get(name))} there and "
                f"{_shape_or_absent(wanted.get(name))} in this config's state (a field that "
                "shapes the saved state differs; see jaxsora/resume.py); use the matching config "
                "or a new --workdir"
            )


def _shape_or_absent(shape) -> str:
    return "absent" if shape is None else f"shape {shape}"


def _verify(where: str, state: Any) -> None:
    """Every saved slice this process holds whole in its restored shards matches its crc32."""
    directory = os.path.join(where, "checksums")
    if not os.path.isdir(directory):
        logging.warning("checkpoint %s has no checksums (saved before they existed)", where)
        return
    saved: dict = {}
    for path in _process_files(directory).values():
        arrays = _read_json(path)
        if not isinstance(arrays, dict) or not isinstance(arrays.get("arrays"), dict):
            raise _Damaged(f"{path} is not a checksum file")
        saved.update(arrays["arrays"])
    checked, bad = verify_checksums(state, saved)
    if bad:
        raise _Damaged(
            f"{len(bad)} array slice(s) differ from their saved crc32, first {bad[0]} (a flipped "
            "or rewritten weight file)"
        )
    logging.info("checkpoint %s: %d array slices match their checksums", where, checked)


# ------------------------------------------------------------------------------------- helpers
def _agree(why: str | None) -> str | None:
    """Every process's verdict on one step: the step is good only if it loaded everywhere."""
    if jax.process_count() == 1:
        return why
    from jax.experimental import multihost_utils

    bad = multihost_utils.process_allgather(np.array([why is not None], np.int32)).reshape(-1)
    if not bad.any():
        return None
    return why or f"it failed to load on process(es) {np.flatnonzero(bad).tolist()}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line: TensorStore's own error names the array and the file
    ("OUT_OF_RANGE: Error reading "model.blocks.1.q.kernel/0.0" ..."); the outer ones wrap it."""
    inner = list(_causes(e))[-1]
    text = str(inner).strip().splitlines()
    return (text[0] if text else repr(inner))[:300]


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


def _causes(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_no_space(e: BaseException | None) -> bool:
    for c in _causes(e):
        if isinstance(c, OSError) and c.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(c) or "os_error_code='28'" in str(c):
            return True
    return False


def _is_echo(e: BaseException | None) -> bool:
    """Noise a failed Orbax write leaves: the error once per abandoned task, tasks scheduled on
    a closed event loop, and coroutines collected while Python shuts down."""
    text = str(e)
    return _is_no_space(e) or (
        isinstance(e, RuntimeError | ImportError)
        and ("Event loop is closed" in text or "Python is likely shutting down" in text)
    )


class _DropEchoes(pylogging.Filter):
    """Keeps every record but Orbax's and asyncio's reports of a failed checkpoint write."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.name != "asyncio" and "orbax" not in record.pathname:
            return True
        if record.name == "asyncio" and "exception was never retrieved" in record.getMessage():
            # Only Orbax runs asyncio here: when one read or write of a save or restore fails,
            # the error is raised once by save(), wait() or the restore (which names the step),
            # and its sibling tasks' copies of it are echoes, logged late, whenever collected.
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not _is_echo(exc)
        return "No space left on device" not in record.getMessage()


_quieted = False


def _quiet_failed_write_echoes() -> None:
    """A full disk made Orbax print 1,500+ lines ("Event loop is closed", "Task exception was
    never retrieved", each with a traceback) that buried the cause; the error itself is raised
    once, by save() or wait(). Drops only those echoes; idempotent."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    for name in ("absl", "asyncio"):
        pylogging.getLogger(name).addFilter(_DropEchoes())
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_echo(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook


def _disk_size(directory: str) -> int:
    walk = os.walk(directory)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in walk for f in files)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
