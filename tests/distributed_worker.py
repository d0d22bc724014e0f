"""One of several processes training together (launched by test_distributed.py).

Usage: python distributed_worker.py PORT NUM_PROCESSES PROCESS_ID INITIAL.npz OUT.npz
Set XLA_FLAGS (device count) and JAX_PLATFORMS=cpu in the environment.
For each strategy below, starts from the host state in INITIAL.npz (written
by `save_state`), trains a few steps on this process's share of the shared
synthetic batches and writes the final parameters (gathered from all
processes) and the losses to OUT.npz.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STRATEGIES = {  # name -> config overrides
    "pmap": dict(parallelism="pmap"),
    "fsdp_4x2": dict(parallelism="fsdp", mesh_model=2),
}
STEPS = 3


def batch_seeds():
    return [10 + i for i in range(STEPS)]


def save_state(path, state) -> None:
    import jax
    import numpy as np

    np.savez(path, *[np.asarray(x) for x in jax.tree.leaves(state)])


def load_state(path, model, tx):
    """The state `save_state` wrote, structured like `init_state(model, tx, ...)`."""
    import jax
    import numpy as np

    from tiny_training import init_fn

    structure = jax.tree.structure(jax.eval_shape(init_fn(model, tx), jax.random.PRNGKey(0)))
    with np.load(path) as data:
        return jax.tree.unflatten(structure, [data[f"arr_{i}"] for i in range(len(data.files))])


def main(port: str, num_processes: str, process_id: str, initial: str, out: str) -> None:
    from mixer_jax import parallel

    assert parallel.maybe_initialize_distributed(
        f"127.0.0.1:{port}", int(num_processes), int(process_id))

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from tiny_training import BATCH, reference_model_and_tx, synthetic_batch, tiny_config

    model, tx = reference_model_and_tx()
    host = load_state(initial, model, tx)
    share = BATCH // jax.process_count()
    mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    results = {}
    for name, overrides in STRATEGIES.items():
        strategy = parallel.make_strategy(tiny_config(**overrides), model, tx)
        state = strategy.place(host)
        losses = []
        for seed in batch_seeds():
            local = {k: v[mine] for k, v in synthetic_batch(seed).items()}
            state, metrics = strategy.train_step(state, strategy.put_batch(local))
            losses.append(float(jax.device_get(metrics["loss"])))
        params = multihost_utils.process_allgather(strategy.to_saveable(state).params, tiled=True)
        flat = jax.tree_util.tree_leaves_with_path(params)
        results.update({f"{name}{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in flat})
        results[f"{name}/losses"] = np.asarray(losses)
    results["devices"] = np.asarray([jax.device_count(), jax.local_device_count()])
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
