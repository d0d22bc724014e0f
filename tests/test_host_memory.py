"""mixer_jax.host_memory: freed blocks stay in the process instead of being
faulted in again, measured in fresh processes (malloc settings are per process)."""
import os
import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB block (numpy takes it from malloc) six times;
# prints whether the setting applied, the page faults of the last five rounds and
# how much of the block's memory the process still holds after freeing it.
SCRIPT = """
import os, resource, sys
from mixer_jax import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
import numpy as np

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = resident()
np.ones(1 << 24, np.float32)
kept = (resident() - before) / (64 << 20)
start = faults()
for _ in range(5):
    np.ones(1 << 24, np.float32)
print(applied, faults() - start, kept)
"""


def run_script(mode, **env):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, text=True,
                         capture_output=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1]), float(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    _, plain_faults, plain_kept = run_script("plain")
    applied, faults, kept = run_script("retain")
    assert applied == "True"
    assert plain_kept < 0.1 and kept > 0.9  # the freed block went back to the OS, or not
    assert plain_faults > 100 and faults < 0.05 * plain_faults


def test_can_be_turned_off():
    applied, _, kept = run_script("retain", MIXER_JAX_RETAIN_HOST_MEMORY="0")
    assert applied == "False" and kept < 0.1
