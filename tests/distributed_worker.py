"""One process of the two-process test: `jax.distributed` on localhost with CPU collectives.

Run by tests/test_loop.py as `python tests/distributed_worker.py PROCESS_ID PORT DATA_DIR WORKDIR OUT STEPS`.
Each process has two CPU devices; together they form one 4-device mesh and train the real segmentor step
on the tiny phantom. Process 0 saves the final parameters to OUT (.npz) for comparison with one process;
each checks `sharding.process_mean` across the two.
Importing this module has no side effects: test_loop.py imports `equivalence_config` from it.
"""

import os
import sys


def equivalence_config(data_dir: str, num_steps: int):
    """The config of every run the equivalence tests compare (one process or two, 1 or 4 devices)."""
    from configs import phantom

    config = phantom.get_config("runlocal")
    config.data.data_dir = data_dir
    config.segmentor.train.num_steps = num_steps
    # Adam turns float round-off in near-zero gradients into ±learning-rate steps (its first update is
    # lr·g/|g|), which would hide real differences; plain SGD keeps the comparison meaningful.
    config.segmentor.optim.name, config.segmentor.optim.learning_rate = "sgd", 0.05
    # The loop is under test, not the networks: one U-Net shared by the modalities, vmapped, compiles in
    # 16 s where the default four unrolled U-Nets take 25 (4 devices, 2 cores; each run here compiles).
    config.segmentor.variant, config.segmentor.stacking = "one_seg", "vmap"
    return config


def main(process_id: int, port: int, data_dir: str, workdir: str, out: str, num_steps: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_disable_most_optimizations", True)
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2

    import numpy as np

    from synth import sharding, train
    from synth.stages import segmentor

    config = equivalence_config(data_dir, num_steps)
    state = train.run_stage(segmentor.build(config), config, workdir)
    leaves = jax.tree.leaves(jax.device_get(state.params))
    # Host-side batch statistics (stage D's source fractions) are averaged over the processes.
    mean = sharding.process_mean({"process": float(process_id), "constant": 1.0})
    assert mean == {"process": 0.5, "constant": 1.0}, mean
    if process_id == 0:
        np.savez(out, *[np.asarray(x) for x in leaves])
    jax.distributed.shutdown()


if __name__ == "__main__":
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pid, port, data_dir, workdir, out, steps = sys.argv[1:7]
    main(int(pid), int(port), data_dir, workdir, out, int(steps))
