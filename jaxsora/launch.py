"""A simulated pod on one machine: N processes on localhost, K CPU devices each.

    python -m jaxsora.launch --processes 2 --devices-per-process 2 -- \
        python -m jaxsora.train --config experiments/tiny.py --workdir runs/pod

Each process gets the environment that `jaxsora.distributed.initialize` reads, so the command is
exactly the one a real pod runs on every host. Output lines are prefixed with the process index.
SIGTERM, SIGHUP or Ctrl-C (SIGINT) to the launcher reaches every process as SIGTERM, a pod-wide
preemption: all save the same step and exit 0. The processes run in their own session, so a
terminal's Ctrl-C reaches the launcher alone, not each process besides; a second Ctrl-C kills
them at once (the steps since the last checkpoint are lost). When a process fails, the others get
the heartbeat timeout to notice and stop by themselves, then are killed; the launcher exits with
the first failure's code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(
    port: int, processes: int, index: int, devices_per_process: int, heartbeat_timeout: int
) -> dict[str, str]:
    """The environment `jaxsora.distributed.initialize` reads, for process `index` of a pod."""
    return dict(
        os.environ,
        JAXSORA_COORDINATOR=f"localhost:{port}",
        JAXSORA_NUM_PROCESSES=str(processes),
        JAXSORA_PROCESS_ID=str(index),
        JAXSORA_LOCAL_DEVICES=str(devices_per_process),
        JAXSORA_HEARTBEAT_TIMEOUT=str(heartbeat_timeout),
    )


def _relay(prefix: str, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.flush()


def _forward_signals(children: list[subprocess.Popen]) -> None:
    """Every stop request becomes SIGTERM to every process: JAX's preemption service listens for
    SIGTERM and has all of them save the same step. A second Ctrl-C kills them."""
    interrupts = 0

    def send(signum: int) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    def on_stop(signum, frame):
        del frame
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
        if interrupts > 1:
            print("launch: second Ctrl-C: killing every process", file=sys.stderr, flush=True)
            send(signal.SIGKILL)
            return
        print(
            f"launch: {signal.Signals(signum).name}: every process saves a checkpoint and stops "
            "(Ctrl-C again kills them at once)",
            file=sys.stderr,
            flush=True,
        )
        send(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_stop)


def launch(
    command: list[str],
    processes: int,
    devices_per_process: int,
    heartbeat_timeout: int = 100,
    port: int | None = None,
) -> int:
    port = port or free_port()
    children: list[subprocess.Popen] = []
    _forward_signals(children)  # before any start: no moment where Ctrl-C would orphan them
    for i in range(processes):
        env = process_env(port, processes, i, devices_per_process, heartbeat_timeout)
        # A session of its own: the terminal's Ctrl-C (sent to the whole foreground process
        # group) must not reach the processes besides the SIGTERM forwarded below.
        child = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=_relay, args=(f"[p{i}] ", child.stdout), daemon=True).start()
        children.append(child)

    first_failure, deadline = 0, None
    while any(c.poll() is None for c in children):
        for c in children:
            if c.returncode not in (None, 0) and first_failure == 0:
                first_failure = c.returncode
                deadline = time.monotonic() + heartbeat_timeout + 30
        if deadline is not None and time.monotonic() > deadline:
            for c in children:
                if c.poll() is None:
                    c.kill()
        time.sleep(0.2)
    codes = [c.returncode for c in children]
    return first_failure or next((c for c in codes if c != 0), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        help="seconds before survivors give up on a dead process",
    )
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- then the command every process runs"
    )
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    sys.exit(
        launch(command, args.processes, args.devices_per_process, args.heartbeat_timeout, args.port)
    )


if __name__ == "__main__":
    main()
