"""Keeps freed host memory inside the process, so that XLA:CPU steps do not
fault their buffers in again every time.

XLA:CPU allocates a step's buffers with malloc (GiBs for Mixer-B/16 training)
and frees them when the step ends. glibc hands large blocks back to the OS
(mmap/munmap, heap trimming), so the next step page-faults and zero-fills every
page again: on the 2-core development machine, 790k page faults and 3.6 s of
kernel time per 13 s Mixer-B/16 training step, plus up to a second of unmapping
after the step has returned. With `retain_freed_memory()` the same step takes
11 s with 4k faults. The cost: the process keeps its peak host memory.

The command-line programs call it first thing; notebooks and other programs may
call it before their first jax computation. `MIXER_JAX_RETAIN_HOST_MEMORY=0`
turns it off.
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = (
    (M_TRIM_THRESHOLD, -1),  # never trim the heap top back to the OS
    (M_MMAP_MAX, 0),  # no block gets its own mapping (unmapped on free)
    (M_ARENA_MAX, 1),  # one heap: threads' arenas could not hold GiB blocks
)


def retain_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse; True if it applied.

    Call it before jax starts its threads (before the first computation): a
    thread that already has its own malloc arena keeps it. A no-op (False) off
    Linux/glibc or with MIXER_JAX_RETAIN_HOST_MEMORY=0.
    """
    if os.environ.get("MIXER_JAX_RETAIN_HOST_MEMORY", "1") == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others have no mallopt
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
