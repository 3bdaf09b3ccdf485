"""Ctrl-C means "save and stop", like SIGTERM: through the launcher and in a single process.
(The full pod version, with a checkpoint and an exact resume, is in tests/test_multihost.py.)"""

import os
import signal
import subprocess
import sys
import time

import pytest

from jaxsora.distributed import PreemptionWatch
from tests.conftest import REPO

# Stands in for a training process: reports the first stop signal it gets and exits (0 for
# SIGTERM, what the trainers save on; 3 for SIGINT, which would lose the step).
CHILD = """
import signal, sys, time
def stop(signum, frame):
    print("got", signal.Signals(signum).name, flush=True)
    sys.exit(0 if signum == signal.SIGTERM else 3)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(60)
sys.exit(4)
"""


def test_ctrl_c_to_the_launchers_process_group_reaches_each_process_once_as_sigterm():
    command = [sys.executable, "-m", "jaxsora.launch", "--processes", "2", "--"]
    launcher = subprocess.Popen(
        [*command, sys.executable, "-c", CHILD],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a shell job: the group a terminal's Ctrl-C is sent to
    )
    lines = []
    while sum(line.endswith("] ready") for line in lines) < 2:
        line = launcher.stdout.readline()
        assert line, f"the launcher ended early: {lines}"
        lines.append(line.rstrip("\n"))
    os.killpg(launcher.pid, signal.SIGINT)
    out, _ = launcher.communicate(timeout=60)
    got = sorted(line for line in out.splitlines() if "] got " in line)
    assert got == ["[p0] got SIGTERM", "[p1] got SIGTERM"], out
    assert launcher.returncode == 0, out


def test_ctrl_c_asks_a_single_process_to_save_and_a_second_one_aborts():
    before = signal.getsignal(signal.SIGINT)
    watch = PreemptionWatch(distributed=False)
    try:
        assert not watch.reached(1)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes of the main thread
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C aborted instead of asking for a save")
        assert watch.reached(2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is before
