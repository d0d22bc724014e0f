"""Training under faults: corrupt checkpoints, signals, two runs on one workdir, a full disk."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mixer_jax import metric_writers, train, train_checkpoint, workdir_lock
from test_train import assert_trees_equal, flat, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def fault_config(data_dir, **changes):
    """30 steps, checkpoints at 10, 20, 30 (all three kept), eval only at the end."""
    return tiny_config(data_dir, keep_checkpoints=3, **changes)


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, data_dir):
    """An uninterrupted run: (workdir, its final parameters)."""
    workdir = tmp_path_factory.mktemp("three")
    train.train_and_evaluate(fault_config(data_dir), str(workdir))
    assert train_checkpoint.TrainCheckpointer(str(workdir)).all_steps() == [10, 20, 30]
    return workdir, flat(train_checkpoint.restore_params(str(workdir)))


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    """Steps 10, 20, 30 of a small state, saved as training does (no training: quick)."""
    workdir = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    with train_checkpoint.TrainCheckpointer(str(workdir)) as ckpt:
        for step in (10, 20, 30):
            params = {"dense": {"kernel": rng.normal(size=(64, 64)).astype(np.float32)}}
            ckpt.save(step, train.steps.TrainState(
                step=np.int32(step), params=params, opt_state={"mu": params},
                rng=np.array([0, step], np.uint32)))
    return workdir


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of the step's parameters."""
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _flip_bit(path: pathlib.Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "deleted manifest": lambda d: (d / "params" / "manifest.ocdbt").unlink(),
    "truncated data file": lambda d: os.truncate(_data_file(d), _data_file(d).stat().st_size // 2),
    "flipped bit": lambda d: _flip_bit(_data_file(d)),
    "deleted train": lambda d: shutil.rmtree(d / "train"),
    "garbage metadata": lambda d: (d / "meta" / "metadata").write_bytes(b"\x00garbage{"),
}
EXPECTED_FILE = {"deleted manifest": "params/manifest.ocdbt", "truncated data file": "params/",
                 "flipped bit": "params/", "deleted train": "train/",
                 "garbage metadata": "meta/metadata"}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
        corruption, three_checkpoints, data_dir, tmp_path, caplog):
    source, reference = three_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    CORRUPTIONS[corruption](workdir / "checkpoints" / "30")

    with caplog.at_level("WARNING"):
        final = train.train_and_evaluate(fault_config(data_dir), str(workdir))

    warning = next(r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage())
    assert "step 30" in warning and EXPECTED_FILE[corruption] in warning
    assert (workdir / "corrupt_checkpoints" / "30").is_dir()  # moved aside, not deleted
    assert final["step"] == 30
    # Retrained from step 20: the same parameters as the uninterrupted run, bit for bit.
    assert_trees_equal(flat(train_checkpoint.restore_params(str(workdir))), reference)
    assert [r["step"] for r in metric_writers.read_metrics(str(workdir)) if "loss" in r] == [
        5, 10, 15, 20, 25, 30]


def test_verify_step_names_the_bad_file_for_every_corruption(small_checkpoints, tmp_path):
    source = small_checkpoints
    assert train_checkpoint.verify_step(source / "checkpoints" / "30") is None
    for corruption, corrupt in CORRUPTIONS.items():
        step_dir = tmp_path / corruption / "30"
        shutil.copytree(source / "checkpoints" / "30", step_dir)
        corrupt(step_dir)
        problem = train_checkpoint.verify_step(step_dir)
        assert problem is not None and EXPECTED_FILE[corruption] in problem, (corruption, problem)


def test_no_good_checkpoint_stops_with_every_step_named(small_checkpoints, data_dir, tmp_path):
    source = small_checkpoints
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    for step in (10, 20, 30):
        _flip_bit(_data_file(tmp_path / "checkpoints" / str(step)))
    with pytest.raises(train_checkpoint.CorruptCheckpointError,
                       match=r"No good checkpoint left .*step 30 .*step 20 .*step 10"):
        train.train_and_evaluate(fault_config(data_dir), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == [
        "10", "20", "30"]


def test_restore_params_refuses_corrupt_and_non_finite_parameters(small_checkpoints, tmp_path):
    shutil.copytree(small_checkpoints / "checkpoints" / "30", tmp_path / "30")
    good = train_checkpoint.restore_params(str(tmp_path / "30"))
    _flip_bit(_data_file(tmp_path / "30"))
    with pytest.raises(train_checkpoint.CorruptCheckpointError,
                       match=r"step 30 .* corrupt: .*params/.* SHA-256"):
        train_checkpoint.restore_params(str(tmp_path / "30"))

    good["dense"]["kernel"][3, 5] = np.inf
    train_checkpoint.save_params(good, str(tmp_path / "inf"))
    with pytest.raises(train_checkpoint.CorruptCheckpointError,
                       match=r"'dense/kernel' holds NaN/Inf"):
        train_checkpoint.restore_params(str(tmp_path / "inf"))


class _SignallingStrategy:
    """Delegates to the real strategy; sends `signum` to this process before step `at` + 1."""

    def __init__(self, strategy, signum, at):
        self._strategy, self._signum, self._at = strategy, signum, at

    def __getattr__(self, name):
        return getattr(self._strategy, name)

    def train_step(self, state, batch):
        if int(self._strategy.to_saveable(state).step) == self._at:
            os.kill(os.getpid(), self._signum)  # handled before the step runs: it still runs
        return self._strategy.train_step(state, batch)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_reached_and_the_resumed_run_ends_bitwise_equal(
        signum, three_checkpoints, data_dir, tmp_path, monkeypatch):
    make_strategy, handler = train.parallel.make_strategy, signal.getsignal(signum)
    monkeypatch.setattr(train.parallel, "make_strategy", lambda *a, **k: _SignallingStrategy(
        make_strategy(*a, **k), signum, at=17))
    with pytest.raises(train.TrainingInterrupted) as stopped:
        train.train_and_evaluate(fault_config(data_dir), str(tmp_path))
    assert stopped.value.code == train.INTERRUPTED_EXIT_STATUS == 75
    assert stopped.value.step == 18 and stopped.value.reason == signum.name
    assert train_checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [10, 18]
    assert train_checkpoint.verify_step(tmp_path / "checkpoints" / "18") is None
    assert max(r["step"] for r in metric_writers.read_metrics(str(tmp_path))) == 18  # flushed
    assert signal.getsignal(signum) is handler  # the caller's handler is back

    monkeypatch.setattr(train.parallel, "make_strategy", make_strategy)
    final = train.train_and_evaluate(fault_config(data_dir), str(tmp_path))
    assert final["step"] == 30
    assert_trees_equal(flat(train_checkpoint.restore_params(str(tmp_path))), three_checkpoints[1])
    # keep_checkpoints=3 holds across the resume.
    assert train_checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [18, 20, 30]


def _start_cli(workdir, data_dir, *overrides):
    args = [sys.executable, "-m", "mixer_jax.main", "--config=configs/default.py",
            f"--workdir={workdir}", f"--config.tfds_data_dir={data_dir}",
            "--config.total_steps=400", "--config.progress_every=1",
            "--config.checkpoint_every=1000", "--config.eval_every=1000", *overrides]
    return subprocess.Popen(args, env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r["step"] >= step for r in metric_writers.read_metrics(str(workdir))):
                return
        except Exception:  # not written yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached: {proc.communicate()[1][-3000:]}")


_TWO_SIGNALS = textwrap.dedent("""
    import os, signal
    from mixer_jax import train
    with train._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        print("first:", stop.received, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still running", flush=True)
""")


@pytest.mark.slow
def test_cli_sigterm_exits_75_with_one_line_and_a_second_signal_exits_at_once(
        tmp_path, data_dir):
    cli = _start_cli(tmp_path, data_dir)
    twice = subprocess.Popen([sys.executable, "-c", _TWO_SIGNALS], env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 3, cli)
    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 75, err[-3000:]
    stopped = [line for line in err.splitlines() if "rerun the same command" in line]
    assert len(stopped) == 1 and "Stopped by SIGTERM after saving step" in stopped[0]
    step = int(stopped[0].split("saving step ")[1].split()[0])
    assert step >= 3 and train_checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [step]
    assert "Traceback" not in err

    out, err = twice.communicate(timeout=120)
    assert out.splitlines() == ["first: SIGTERM"], err[-3000:]
    assert twice.returncode == -signal.SIGTERM  # the second signal killed it at once


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_trains_the_other_stops_at_once(tmp_path, data_dir):
    runs = [_start_cli(tmp_path, data_dir, "--config.total_steps=40") for _ in range(2)]
    started = time.time()
    while all(run.poll() is None for run in runs) and time.time() - started < 120:
        time.sleep(0.1)
    loser = next(run for run in runs if run.poll() is not None)
    winner = next(run for run in runs if run is not loser)
    _, err = loser.communicate()
    assert loser.returncode != 0
    assert f"workdir {tmp_path} is in use by process {winner.pid} on host" in err
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err[-3000:]
    assert train_checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [40]
    steps = [r["step"] for r in metric_writers.read_metrics(str(tmp_path)) if "loss" in r]
    assert steps == list(range(1, 41))  # one history, not two interleaved


_HOLD_LOCK = textwrap.dedent("""
    import os, signal, sys
    from mixer_jax import workdir_lock
    workdir_lock.WorkdirLock(sys.argv[1]).__enter__()
    print("locked", flush=True)
    sys.stdin.readline()
""")


def test_stale_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], env=ENV,
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lock.WorkdirInUseError,
                           match=f"workdir {tmp_path} is in use by process {holder.pid} on host"):
            workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
    finally:
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING"), workdir_lock.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert any(f"left by process {holder.pid}" in r.getMessage() for r in caplog.records)
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: the next run is silent


_FULL_DISK_RUN = textwrap.dedent("""
    import resource, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_train_faults import fault_config
    from mixer_jax import errors, parallel, train, train_checkpoint

    workdir, limit = sys.argv[1], int(sys.argv[2])
    make_strategy = parallel.make_strategy

    class FillingStrategy:
        # Once the checkpoint of step 10 is on disk, no file may grow past `limit` bytes.
        def __init__(self, strategy):
            self._strategy = strategy
        def __getattr__(self, name):
            return getattr(self._strategy, name)
        def train_step(self, state, batch):
            if int(self._strategy.to_saveable(state).step) == 12:
                while train_checkpoint.TrainCheckpointer(workdir).latest_step() != 10:
                    time.sleep(0.05)
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            return self._strategy.train_step(state, batch)

    parallel.make_strategy = lambda *a, **k: FillingStrategy(make_strategy(*a, **k))
    try:
        train.train_and_evaluate(fault_config({data_dir!r}), workdir)
    except errors.UserError as error:  # what the command line does with it
        print(error, file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.slow
def test_full_disk_names_the_path_and_size_and_the_previous_checkpoint_restores(
        tmp_path, data_dir, three_checkpoints):
    code = _FULL_DISK_RUN.format(tests=str(REPO / "tests"), data_dir=data_dir)
    limit = 16 * 1024  # metrics and events stay below it; the parameters' data file does not
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(limit)], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # One line (orbax's own threads still log their errors before it).
    # (orbax's threads may write into the same line of stderr: find the message in it)
    lines = [line[line.index("Cannot write"):] for line in proc.stderr.splitlines()
             if "Cannot write" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"Cannot write the checkpoint of step 20 to {tmp_path}/checkpoints "
                               "(File too large): it needs about ")
    assert "MiB. The earlier checkpoints (10) are intact" in lines[0]
    # The checkpoint of step 10 restores and equals the uninterrupted run's.
    assert train_checkpoint.verify_step(tmp_path / "checkpoints" / "10") is None
    reference = flat(train_checkpoint.restore_params(str(three_checkpoints[0]), step=10))
    assert_trees_equal(flat(train_checkpoint.restore_params(str(tmp_path), step=10)), reference)


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    state = train.steps.TrainState(step=np.int32(3), params={"w": np.ones((256, 256), np.float32)},
                                   opt_state={}, rng=np.zeros(2, np.uint32))
    with train_checkpoint.TrainCheckpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(3, state)
        free = shutil.disk_usage(tmp_path)._replace(free=100_000)
        monkeypatch.setattr(train_checkpoint.shutil, "disk_usage", lambda path: free)
        with pytest.raises(train_checkpoint.DiskFullError) as error:
            ckpt.save(4, state)
    assert str(error.value) == (
        f"Cannot write the checkpoint of step 4 to {tmp_path}/checkpoints (No space left on "
        "device: 0.1 MiB free): it needs about 0.3 MiB. The earlier checkpoints (3) are intact; "
        "free some space (or move the workdir) and rerun to resume.")
    assert isinstance(error.value, train.checkpoint.UserError)
    assert train_checkpoint.TrainCheckpointer(str(tmp_path)).all_steps() == [3]
    np.testing.assert_array_equal(train_checkpoint.restore_params(str(tmp_path))["w"], 1.0)


@pytest.mark.slow
def test_a_finished_run_killed_before_its_final_eval_logs_it_when_rerun(
        three_checkpoints, data_dir, tmp_path):
    shutil.copytree(three_checkpoints[0], tmp_path, dirs_exist_ok=True)
    metrics = tmp_path / metric_writers.METRICS_FILE
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert "eval_top1" in records[-1] and records[-1]["step"] == 30
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))  # killed before it

    final = train.train_and_evaluate(fault_config(data_dir), str(tmp_path))
    evals = [r for r in metric_writers.read_metrics(str(tmp_path)) if "eval_top1" in r]
    assert evals == [records[-1]] and final["eval_top1"] == records[-1]["eval_top1"]
    train.train_and_evaluate(fault_config(data_dir), str(tmp_path))  # once more: not twice
    assert [r for r in metric_writers.read_metrics(str(tmp_path)) if "eval_top1" in r] == evals


_HOSTS = textwrap.dedent("""
    import os, signal, sys
    from mixer_jax import parallel
    port, index, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    parallel.maybe_initialize_distributed(f"127.0.0.1:{{port}}", 2, index)
    from mixer_jax import train, workdir_lock

    class NoPreemption:
        def reached_preemption(self, step):
            return False

    with workdir_lock.WorkdirLock(workdir), train._StopSignals() as stop:  # one shared workdir
        for step in range(1, 10):
            if index == 1 and step == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # only this host gets the signal
            reason = stop.requested(step, NoPreemption())
            if reason:
                print("stop", step, reason, flush=True)
                break
""")


@pytest.mark.slow
def test_hosts_agree_on_the_stopping_step_and_only_process_0_locks(tmp_path):
    from test_distributed import free_port
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _HOSTS.format(), str(port), str(i),
                               str(tmp_path)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    stops = [[line for line in out.splitlines() if line.startswith("stop")] for out, _ in outs]
    assert stops == [["stop 4 a signal on another host"], ["stop 4 SIGTERM"]]
