"""tf.distribute strategies for ``train.py --strategy`` (see docs/distributed.md).

What makes training correct under a strategy lives where the work is done: the model averages its
per-example losses over the global batch (``tf.nn.compute_average_loss``) and the optimisers sum
the replicas' gradients, for both the generator and the discriminator update (``ltnet_tf.model``);
the input pipeline is sharded by DATA, so every worker reads the same seeded file order and keeps
its own slice of each global batch (``ltnet_tf.data``); only the chief writes the run folder
(``ltnet_tf.training``).
"""
from ltnet_tf import compat  # noqa: F401

import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "mirrored", "multi_worker")


def create_strategy(name: str) -> tf.distribute.Strategy:
    """'default' (one device), 'mirrored' (every local GPU; without GPUs, every logical CPU device),
    'multi_worker' (the cluster described by the ``TF_CONFIG`` environment variable).

    Create it before any other TensorFlow work: multi-worker set-up must precede op creation.
    """
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
