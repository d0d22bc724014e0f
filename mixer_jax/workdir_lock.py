"""One training run per workdir: an advisory lock on `<workdir>/.lock`.

Two runs writing one workdir would replace each other's checkpoints and interleave
`metrics.jsonl`, so the second one stops at once with `WorkdirInUseError`. The lock
is a `flock` on the file, which the kernel releases when its holder dies: a run that
was SIGKILLed leaves the file (naming its dead process) but never a stuck lock; the
next run takes it over with a warning. Multi-host runs share their workdir by
design: only process 0 locks. Object stores (gs://) have no locks: runs there are
not guarded (a warning says so).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket

import jax
from absl import logging

from mixer_jax.errors import UserError

LOCK_FILE = ".lock"


class WorkdirInUseError(UserError, RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """Context manager holding the workdir's lock (on process 0 only)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        if "://" in self.workdir:
            logging.warning("%s is not a local file system: it cannot be locked, so make sure "
                            "no other run uses it.", self.workdir)
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirInUseError(
                f"workdir {self.workdir} is in use by process {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}; wait for that run to end, stop it, or use another "
                "--workdir.") from None
        previous = _holder(fd)
        if previous:  # its holder died without releasing it (a clean exit empties the file)
            logging.warning("Took over the lock of %s left by process %s on host %s, which is "
                            "no longer running.", self.workdir, previous.get("pid", "?"),
                            previous.get("host", "?"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None


def _holder(fd: int) -> dict:
    """The {'pid', 'host'} written by the lock's holder ({} if none or unreadable)."""
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
