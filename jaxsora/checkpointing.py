"""Orbax checkpoints of a whole run: model, optimizer, EMA, step, RNG, data iterator, config.

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when every
item is on disk), so an interrupted save is never listed and never restored; the last committed
checkpoint stays usable. Every host writes its own shards of the arrays, and its own data
iterator state (`data/process_<i>-of-<n>.json`, Grain's handler).
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy


class CheckpointMismatchError(ValueError):
    pass


class _IteratorAsBytes:
    """Grain's checkpoint handler takes non-Grain iterators whose state is bytes."""

    def __init__(self, iterator):
        self._iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self._iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preservation_policy.LatestN(keep),
                enable_async_checkpointing=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, iterator: Any, config_json: str) -> None:
        """Starts an async save; returns once the arrays are copied off the device.

        `iterator` has get_state()/set_state() with JSON-able dicts (this process's data state).
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorAsBytes(iterator)),
                config=ocp.args.JsonSave(json.loads(config_json)),
            ),
        )

    def saved_config(self, step: int) -> dict:
        """The config the run had when it wrote `step` (JSON, as saved)."""
        saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return saved["config"]

    def restore(
        self,
        step: int,
        abstract_state: Any,
        model_config: dict,
        iterator: Any | None = None,
        config_key: str = "model",
    ) -> Any:
        """State restored onto the shardings in `abstract_state` (any mesh, any device count).

        Fails with a message naming the field when the checkpoint's model config differs. The
        data iterator is restored too when this process wrote a state for it; with another
        process count there is none to match, and the iterator keeps its fresh state (logged).
        """
        saved_model = self.saved_config(step).get(config_key, {})
        check_model_config(saved_model, model_config, self.directory, step, config_key)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        if iterator is not None:
            try:
                self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        data=grain.checkpoint.CheckpointRestore(_IteratorAsBytes(iterator))
                    ),
                )
            except ValueError as e:
                logging.warning(
                    "data iterator not restored (%s): checkpoint %s/%d was written by "
                    "another number of processes; the data stream starts afresh",
                    e,
                    self.directory,
                    step,
                )
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_model_config(
    saved: dict, current: dict, directory: str, step: int, config_key: str = "model"
) -> None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            raise CheckpointMismatchError(
                f"checkpoint {directory}/{step} was written with {config_key}.{key}={a!r} but the "
                f"config says {config_key}.{key}={b!r}; use the matching config or a new --workdir"
            )


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with each leaf's sharding: the restore target for any mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
