"""Make a multiprocessing worker end when the process that started it dies, even by `kill -9`.

Call `die_with_parent()` first thing in a worker (a pool initializer). A daemon thread waits on the
worker's parent sentinel (`multiprocessing.parent_process().sentinel`, a pipe end that reaches EOF
when the starting process dies, for any start method) and exits the worker at once. On Linux the
worker also asks the kernel for SIGKILL when its direct parent exits (prctl PR_SET_PDEATHSIG, see
prctl(2)): with the fork and spawn methods that parent is the starting process itself.

Why it is needed: pool workers block on a queue whose write end they hold themselves, so the
parent's death never reaches them as EOF. With the forkserver method it is worse: the workers are
children of the forkserver and hold the write end of its "alive" pipe, so the forkserver does not
exit either, and both would run on as orphans (seen: decode workers left by a killed `score`).
Once the workers exit, the forkserver sees EOF on that pipe and exits by itself.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait


PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_S = 1.0          # parent-pid check interval when there is no parent sentinel


def die_with_parent(poll_s: float = POLL_S) -> None:
    parent = multiprocessing.parent_process()
    direct_parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (an unusual libc): the watchdog still runs
            pass
    if os.getppid() != direct_parent:  # the parent died before prctl took effect
        os._exit(1)
    sentinel = getattr(parent, "sentinel", None)

    def watch() -> None:
        if sentinel is not None:
            wait([sentinel])  # returns when the starting process has exited
            os._exit(1)
        while os.getppid() == direct_parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
