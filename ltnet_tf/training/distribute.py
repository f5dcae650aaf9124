"""tf.distribute strategies for ``train.py --strategy`` (see docs/distributed.md), and which worker
writes the run folder.

What makes training correct under a strategy lives where the work is done: the model averages its
per-example losses over the global batch (``tf.nn.compute_average_loss``) and the optimisers sum
the replicas' gradients, for both the generator and the discriminator update (``ltnet_tf.training.model``);
the input pipeline is sharded by DATA, so every worker reads the same seeded file order and keeps
its own slice of each global batch (``ltnet_tf.training.dataset``); only the chief writes the run folder
(``is_chief``, ``writable_dir``).
"""
from ltnet_tf import compat  # noqa: F401

import atexit
import shutil
import tempfile

from absl import logging

STRATEGIES = ("default", "mirrored", "multi_worker")


def create_strategy(name: str):
    """A ``tf.distribute.Strategy``: 'default' (one device), 'mirrored' (every local GPU; without GPUs, every logical CPU device),
    'multi_worker' (the cluster described by the ``TF_CONFIG`` environment variable).

    Create it before any other TensorFlow work: multi-worker set-up must precede op creation.
    (TensorFlow is imported here, not with the module, so that the command lines can list the
    strategies in their help without waiting for it.)
    """
    import tensorflow as tf

    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    logging.info("strategy %s: %d replica(s) in sync", name, strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy) -> bool:
    """The worker that writes the run folder: the 'chief' task, else worker 0, else the only one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def writable_dir(path: str, chief: bool) -> str:
    """Chief writes to ``path``; every other worker saves its (identical) copy into a temp folder
    that is removed when the process exits: all workers save, so a save that needs a collective
    (SyncOnRead state) never hangs, and only the chief's copy is kept."""
    if chief:
        return path
    temp = tempfile.mkdtemp(prefix="ltnet_worker_")
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    return temp
