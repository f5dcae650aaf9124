"""Distributed training: MultiWorkerMirroredStrategy with two real worker processes (TF_CONFIG on
loopback ports, CPU) and MirroredStrategy over two logical CPU devices, each compared with a
single-process run on the same global batch (same seeds, same data order).

Global batch 2 over 2 replicas: the DATA-sharded pipeline gives replica i the i-th scan of each
global batch that the single process sees whole, so with the loss averaged over the global batch
and the gradients summed over replicas, every run takes the same optimisation steps. They differ
only in float32 summation order (per-replica sums added by the all-reduce instead of one batched
reduction). What is compared is the whole checkpoint: G_F, D and both Adam states. The Adam
moments matter: Adam's step is nearly invariant to the scale of the gradient, so a loss averaged
over the wrong batch size would leave the weights almost unchanged but scale the first moments.

Tolerances, from the differences seen (at most 3.2e-8 absolute, 3e-6 of a tensor's largest value)
with a 30x margin: every value within ATOL = 1e-6, and within SCALE_RTOL = 1e-4 of the largest
magnitude in its tensor (so second moments of ~1e-8 are compared at their own scale). A training
step moves a weight by ~1e-4 (Adam, learning rate 1e-4), a hundred times ATOL.

Every TensorFlow run is a child process running this file as a script (``_worker``): multi-worker
collectives and logical CPU devices must be configured before TensorFlow initialises. Children run
in their own session, bounded by a deadline, and their process groups are killed in a ``finally``.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # multi-process tf.distribute training (CI runs -m slow too)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL, SCALE_RTOL = 1e-6, 1e-4
LAUNCH_TIMEOUT_S = 240
# voxelmorph_gan trains G_F and D: both updates of the custom train_step, at half the tracing time
# of the full model (G_B adds variables to the generator update, not a third kind of update).
TRAIN_FLAGS = ["--preset", "voxelmorph_gan", "--enc_features", "8,8", "--dec_features", "8,8,8,8",
               "--disc_features", "4,8", "--ncc_window", "5", "--batch_size", "2",
               "--checkpoint_every", "2", "--seed", "0", "--noexport"]


# ------------------------------------------------------------------------------- child processes
def _worker(weights_path: str, logical_cpus: int, train_argv) -> int:
    """One training process: ``cli.train_main`` (the real train() path), then its final weights."""
    from ltnet_tf.commands import cli
    from ltnet_tf.training import trainer as training
    import tensorflow as tf

    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    fit = training._fit

    def fit_and_record(model, *args):
        fit(model, *args)
        # What Keras logged (progress bar, TensorBoard) for the last epoch (checkpoint_every steps).
        logged = {f"log_{name}": values[-1] for name, values in model.history.history.items()}
        np.savez(weights_path, names=np.array([v.name for v in model.trainable_weights]),
                 replicas=model.distribute_strategy.num_replicas_in_sync,
                 step=int(model.g_optimizer.iterations.numpy()), **logged,
                 **{f"w{i:03d}": v.numpy() for i, v in enumerate(model.trainable_weights)})

    training._fit = fit_and_record
    return cli.train_main(["train", *train_argv])


def _launch(jobs, log_dir):
    """Run ``(weights_path, logical_cpus, train_argv, env)`` jobs side by side; fail with their log
    tails if one fails or the deadline passes. Children are always gone when this returns."""
    processes, logs = [], []
    try:
        for index, (weights_path, logical_cpus, train_argv, env) in enumerate(jobs):
            log_path = os.path.join(log_dir, f"process_{index}.log")
            logs.append(log_path)
            with open(log_path, "w") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), weights_path, str(logical_cpus),
                     *train_argv],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"training processes still running after {LAUNCH_TIMEOUT_S} s\n"
                    + _log_tails(logs))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the group is its own
                process.wait()
    if any(process.returncode != 0 for process in processes):
        pytest.fail(f"exit codes {[p.returncode for p in processes]}\n" + _log_tails(logs))


def _log_tails(logs, lines=25):
    text = []
    for path in logs:
        with open(path) as f:
            text.append(f"--- {path}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(text)


def _env(tmpdir, tf_config=None):
    os.makedirs(tmpdir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])),
               TMPDIR=str(tmpdir), CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _train_argv(data, model_dir, steps, strategy, resume=False):
    return ["--atlas", data["atlas"], "--atlas_labels", data["atlas_labels"],
            "--unlabeled", data["images_dir"], "--model_dir", str(model_dir), "--steps", str(steps),
            "--strategy", strategy, *(["--resume"] if resume else []), *TRAIN_FLAGS]


# ------------------------------------------------------------------------------- comparisons
def _checkpoint(model_dir, step):
    """Every value in RUN/checkpoints/ckpt-<step>: networks and both optimisers' states."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name}


def _weights(path):
    with np.load(path) as recorded:
        return dict(recorded)


def _assert_same_training(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        scale = float(np.max(np.abs(value))) if np.size(value) else 0.0
        tolerance = min(ATOL, SCALE_RTOL * scale) if scale > 0 else ATOL
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=tolerance, err_msg=name)


def _assert_same_logs(actual: dict, expected: dict):
    """The logged losses of the last epoch: the mean over the global batches, not a sum over
    replicas of it (tf-keras's default for fit sums per-replica logs across workers)."""
    names = sorted(k for k in expected if k.startswith("log_"))
    assert names == sorted(k for k in actual if k.startswith("log_")) and "log_d_loss" in names
    for name in names:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, err_msg=name)


def _checkpoint_steps(model_dir):
    folder = os.path.join(model_dir, "checkpoints")
    return sorted(int(f[len("ckpt-"):-len(".index")]) for f in os.listdir(folder)
                  if f.startswith("ckpt-") and f.endswith(".index"))


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ltnet_tf.commands.synthetic import make_demo_dataset

    # Four different scans: a replica fed the wrong scan would train differently.
    return make_demo_dataset(str(tmp_path_factory.mktemp("data")), n_scans=4, shape=(16, 16, 16))


@pytest.fixture(scope="module")
def single_process(data, tmp_path_factory):
    """The reference: one process, default strategy, 4 steps on global batches of 2 scans."""
    folder = tmp_path_factory.mktemp("single")
    run, weights = folder / "run", str(folder / "weights.npz")
    _launch([(weights, 0, _train_argv(data, run, 4, "default"), _env(folder / "tmp"))], str(folder))
    recorded = _weights(weights)
    assert recorded["replicas"] == 1 and recorded["step"] == 4
    assert _checkpoint_steps(run) == [2, 4]
    return run, recorded


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("cluster, task, chief", [
    (None, None, True),                                                 # no cluster: one process
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),                  # worker 0 leads
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True),         # an explicit chief leads
    ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False),
])
def test_is_chief(cluster, task, chief):
    from types import SimpleNamespace
    from ltnet_tf.training import distribute
    import tensorflow as tf

    resolver = None
    if cluster is not None:
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec(cluster), task_type=task[0], task_id=task[1])
    assert distribute.is_chief(SimpleNamespace(cluster_resolver=resolver)) is chief


def test_global_batch_must_split_evenly_over_the_replicas(tmp_path):
    from types import SimpleNamespace
    from ltnet_tf.config import LTNetConfig
    from ltnet_tf.training import trainer as training

    two_replicas = SimpleNamespace(cluster_resolver=None, num_replicas_in_sync=2)
    with pytest.raises(training.TrainingError, match="multiple of the 2 replicas"):
        training.train(LTNetConfig(batch_size=3), "atlas.nii.gz", "labels.nii.gz", "scans",
                       tmp_path / "run", strategy=two_replicas)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was read or written


def test_reference_training_moves_weights_far_beyond_the_tolerance(single_process):
    run, _ = single_process
    start, end = _checkpoint(run, 2), _checkpoint(run, 4)
    for network in ("forward_generator", "discriminator"):
        moved = np.concatenate([np.abs(end[n] - start[n]).ravel() for n in end
                                if n.startswith(network)])
        # Steps 3-4 moved the typical weight 50 x ATOL or more (Adam: ~1e-4 a step): equal within
        # tolerance below means the same training, not merely "barely trained".
        assert np.median(moved) > 50 * ATOL, network


def test_multi_worker_matches_single_process_writes_on_chief_and_resumes(data, single_process,
                                                                         tmp_path):
    reference_run, reference_weights = single_process
    run = tmp_path / "run"
    worker_tmp = [tmp_path / f"worker{i}_tmp" for i in range(2)]

    def cluster(model_dirs, steps, resume, log_dir):
        ports = _free_ports(2)
        workers = [f"localhost:{port}" for port in ports]
        os.makedirs(log_dir)
        _launch([(str(tmp_path / f"{log_dir.name}_worker{i}.npz"), 0,
                  _train_argv(data, model_dirs[i], steps, "multi_worker", resume),
                  _env(worker_tmp[i], {"cluster": {"worker": workers},
                                       "task": {"type": "worker", "index": i}}))
                 for i in range(2)], str(log_dir))
        return [_weights(tmp_path / f"{log_dir.name}_worker{i}.npz") for i in range(2)]

    # Steps 1-2. Worker 1 is given a folder of its own, as on a machine without a shared file
    # system: being no chief, it must write nothing there.
    chief, other = cluster([run, tmp_path / "worker1_run"], 2, False, tmp_path / "first")
    assert chief["replicas"] == other["replicas"] == 2 and chief["step"] == other["step"] == 2
    for name in chief:
        np.testing.assert_array_equal(other[name], chief[name], err_msg=name)
    assert _checkpoint_steps(run) == [2]
    assert os.path.isfile(run / "config.json") and os.listdir(run / "logs")
    assert not os.path.exists(tmp_path / "worker1_run")
    assert os.listdir(worker_tmp[1]) == []  # its checkpoint copies were removed at exit
    _assert_same_training(_checkpoint(run, 2), _checkpoint(reference_run, 2))

    # Steps 3-4, resumed by both workers from the chief's folder (shared), data order included.
    chief, other = cluster([run, run], 4, True, tmp_path / "resumed")
    assert chief["step"] == other["step"] == 4
    for name in chief:
        np.testing.assert_array_equal(other[name], chief[name], err_msg=name)
    assert _checkpoint_steps(run) == [2, 4]
    assert os.listdir(worker_tmp[1]) == []
    _assert_same_training(_checkpoint(run, 4), _checkpoint(reference_run, 4))
    _assert_same_training({k: v for k, v in chief.items() if k.startswith("w")},
                          {k: v for k, v in reference_weights.items() if k.startswith("w")})
    assert list(chief["names"]) == list(reference_weights["names"])
    _assert_same_logs(chief, reference_weights)


def test_mirrored_over_two_logical_cpus_matches_single_process(data, single_process, tmp_path):
    reference_run, reference_weights = single_process
    run, weights = tmp_path / "run", str(tmp_path / "weights.npz")
    _launch([(weights, 2, _train_argv(data, run, 4, "mirrored"), _env(tmp_path / "tmp"))],
            str(tmp_path))
    recorded = _weights(weights)
    assert recorded["replicas"] == 2 and recorded["step"] == 4
    assert _checkpoint_steps(run) == [2, 4]
    _assert_same_training(_checkpoint(run, 4), _checkpoint(reference_run, 4))
    _assert_same_logs(recorded, reference_weights)


if __name__ == "__main__":  # a child process of the tests above
    sys.path.insert(0, REPO)
    import ltnet_tf  # noqa: F401  (before TensorFlow: Keras 2)

    sys.exit(_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
