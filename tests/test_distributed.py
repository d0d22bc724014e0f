"""Two processes on 127.0.0.1 train together (jax.distributed) and agree with one."""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import distributed_worker
from tiny_training import reference_run, reference_setup, synthetic_batch

WORKER = os.path.abspath(distributed_worker.__file__)
ROOT = os.path.dirname(os.path.dirname(WORKER))
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, num_processes=2, devices_per_process=4):
    """Runs the workers from the reference's initial state; their results."""
    env = {
        **os.environ,
        # Less backend optimisation: compiles 2-3x faster, same float semantics.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"
                     " --xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    initial = tmp_path / "initial.npz"
    distributed_worker.save_state(initial, reference_setup()[2])
    port = free_port()
    outs = [tmp_path / f"worker{i}.npz" for i in range(num_processes)]
    logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(num_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(port), str(num_processes), str(i), str(initial),
             str(outs[i])],
            env=env, stdout=logs[i], stderr=subprocess.STDOUT,
        )
        for i in range(num_processes)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # Stop at the first failure: the others would wait for their peer until timeout.
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # on timeout or failure, leave nothing running
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    output = []
    for i, log in enumerate(logs):
        log.seek(0)
        output.append(f"--- worker {i} ---\n{log.read()[-3000:]}")
        log.close()
    assert codes == [0] * num_processes, f"exit codes {codes}\n" + "\n".join(output)
    return [dict(np.load(out)) for out in outs]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    results = run_workers(tmp_path)
    expected, expected_losses = reference_run(
        [synthetic_batch(seed) for seed in distributed_worker.batch_seeds()])
    expected_params = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected.params)
    }
    for result in results:
        np.testing.assert_array_equal(result["devices"], [8, 4])
        for name in distributed_worker.STRATEGIES:
            np.testing.assert_allclose(result[f"{name}/losses"], expected_losses, rtol=1e-5)
            for key, value in expected_params.items():
                np.testing.assert_allclose(result[name + key], value, rtol=1e-5, atol=1e-6,
                                           err_msg=name + key)
    # both processes hold the same model
    for key, value in results[0].items():
        np.testing.assert_array_equal(results[1][key], value, err_msg=key)
