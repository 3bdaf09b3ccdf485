"""Joining a multi-host job, and noticing preemption.

Three ways a process runs:
  - alone: nothing to initialise; SIGTERM (and Ctrl-C) is caught by our own handler.
  - a simulated pod on one machine (`python -m jaxsora.launch ...`): the launcher sets
    JAXSORA_COORDINATOR, JAXSORA_NUM_PROCESSES, JAXSORA_PROCESS_ID (and JAXSORA_LOCAL_DEVICES for
    simulated CPU devices); processes talk over localhost with gloo collectives.
  - a TPU pod: the same command on every host; `jax.distributed.initialize()` finds the others.
    Set JAXSORA_DISTRIBUTED=1 (or rely on the TPU environment being detected).

Once jax.distributed is up, SIGTERM no longer kills the process: JAX's preemption service catches
it, and every host learns, at the same step, that it must save and stop. Ctrl-C on a host is
turned into that SIGTERM.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize() -> bool:
    """Joins the job described by the environment; True when several processes take part.

    Must run before anything touches a JAX backend.
    """
    local_devices = os.environ.get("JAXSORA_LOCAL_DEVICES")
    if local_devices:
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    coordinator = os.environ.get("JAXSORA_COORDINATOR")
    heartbeat = int(os.environ.get("JAXSORA_HEARTBEAT_TIMEOUT", "100"))
    if coordinator:
        jax.distributed.initialize(
            coordinator,
            int(os.environ["JAXSORA_NUM_PROCESSES"]),
            int(os.environ["JAXSORA_PROCESS_ID"]),
            heartbeat_timeout_seconds=heartbeat,
        )
    elif os.environ.get("JAXSORA_DISTRIBUTED") == "1" or _on_tpu_pod():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    else:
        return False
    logging.info(
        "process %d of %d, %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


class PreemptionWatch:
    """Polled once per step; says when every process should save and stop at this step.

    Ctrl-C (SIGINT) means the same as SIGTERM: save, then exit 0. A second Ctrl-C aborts at once
    (Python's KeyboardInterrupt), losing the steps since the last checkpoint.
    """

    def __init__(self, distributed: bool):
        self._distributed = distributed
        self._requested = False
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)}
        if not distributed:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self._requested = True

    def _on_sigint(self, signum, frame) -> None:
        del signum, frame
        logging.warning(
            "Ctrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again aborts at "
            "once, losing the steps since the last checkpoint)"
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._distributed:
            # JAX's preemption service listens for SIGTERM and tells every host the same step.
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self._requested = True

    def reached(self, step: int) -> bool:
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def close(self) -> None:
        """Gives the signals back (the training loop is over; e.g. a test process goes on)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
