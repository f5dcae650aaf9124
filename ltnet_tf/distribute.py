"""tf.distribute strategies for ``train.py --strategy``."""
from ltnet_tf import compat  # noqa: F401

import tensorflow as tf


def create_strategy(name: str) -> tf.distribute.Strategy:
    """'default' (one device), 'mirrored' (all local GPUs), 'multi_worker' (workers from TF_CONFIG).

    Create it before any other TensorFlow work: multi-worker setup must precede op creation.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}")
