"""Training data: the streaming tf.data pipeline of unlabelled scans (working resolution, seeded
order, sharded by DATA across ``tf.distribute`` workers). Scans paired with their label maps by file
name (validation, references) live in ``ltnet_tf.io.pairs``.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import numpy as np
import tensorflow as tf

from ltnet_tf.io.volumes import (DataError, list_images, load_grid, load_scan, normalize_intensity,
                                 to_working_grid)

# Training sets up to this size (float32 at the working resolution) are kept in memory.
CACHE_LIMIT_BYTES = 2 * 1024 ** 3


def dataset_fits_in_memory(n_scans: int, config, full_shape=None) -> bool:
    return n_scans * int(np.prod(config.working_shape(full_shape))) * 4 <= CACHE_LIMIT_BYTES


def make_training_dataset(scan_paths, config, *, shuffle: bool = True, repeat: bool = True,
                          skip_batches: int = 0) -> tf.data.Dataset:
    """Batches [batch_size, *working_shape, 1] of unlabelled scans.

    When the whole set at the working resolution fits in ``CACHE_LIMIT_BYTES`` it is read and
    preprocessed once and kept in memory (reading and downsampling a 160x192x224 NIfTI costs more
    than a quarter-resolution training step). Larger sets are streamed: only the file names are
    shuffled, so memory holds a few scans, never the whole set. Every scan must be on the atlas grid
    (``config.atlas_shape``, else the first scan's shape).
    """
    paths = list_images(scan_paths)
    full_shape = tuple(config.atlas_shape) if config.atlas_shape else load_grid(paths[0])[0]

    def load(path_bytes):
        path = path_bytes.decode() if isinstance(path_bytes, bytes) else str(path_bytes)
        scan = load_scan(path)
        if scan.shape != full_shape:
            raise DataError(f"{path}: shape {scan.shape} differs from the atlas shape {full_shape} "
                            f"(train.py --align auto aligns scans on other grids to the atlas)")
        return scan.data

    def load_and_preprocess(path):
        scan = tf.numpy_function(load, [path], tf.float32, stateful=False)
        scan.set_shape(full_shape)
        # Same ops as preprocess_scan, but in the graph so parallel calls need no Python.
        return to_working_grid(normalize_intensity(scan[None, ..., None]), config)[0]

    dataset = tf.data.Dataset.from_tensor_slices(paths)
    cached = dataset_fits_in_memory(len(paths), config, full_shape)
    if cached:
        dataset = dataset.map(load_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True).cache()
    if shuffle:
        dataset = dataset.shuffle(len(paths), seed=config.seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if skip_batches:
        # A resumed run continues the seeded order where it stopped; when streaming, file names
        # are skipped before loading, so nothing is read twice.
        dataset = dataset.skip(skip_batches * config.batch_size)
    if not cached:
        dataset = dataset.map(load_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(config.batch_size, drop_remainder=True)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
