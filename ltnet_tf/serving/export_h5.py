"""G_F for VoxelMorph scripts: ``RUN/generator.h5``, which ``vxm.networks.VxmDense.load(path)``
rebuilds (G_F is a ``VxmDense`` subclass without constructor arguments of its own).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import contextlib
import logging as pylogging
import os
import warnings

import tensorflow as tf
from absl import logging

from ltnet_tf.files import atomic_path
from ltnet_tf.serving.modeldir import ModelDir, ModelDirError, checked_model_dir, restore_for_export


@contextlib.contextmanager
def _without_tf_log(prefix: str):
    """Drop TensorFlow log records that start with ``prefix`` (noise that would alarm a user)."""
    class Drop(pylogging.Filter):
        def filter(self, record):
            return not str(record.getMessage()).startswith(prefix)

    drop = Drop()
    tf.get_logger().addFilter(drop)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(drop)


def write_generator_h5(model_dir: ModelDir, generator) -> str:
    """``RUN/generator.h5`` (G_F, uncompiled, for ``vxm.networks.VxmDense.load``), atomically."""
    path = model_dir.generator_h5_path
    if not os.access(model_dir.path, os.W_OK):
        raise ModelDirError(f"{model_dir.path}: cannot write {os.path.basename(path)} (folder is "
                            f"not writable)")
    # HDF5 is "legacy" to Keras but it is VoxelMorph's format; and G_F is saved uncompiled.
    with atomic_path(path) as staging, warnings.catch_warnings(), \
            _without_tf_log("Compiled the loaded model"):
        warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`")
        generator.save(staging, save_format="h5", include_optimizer=False)
    logging.info("wrote %s", path)
    return path


def export_generator_h5(model_dir, *, which: str = "auto") -> str:
    """Write G_F as ``RUN/generator.h5`` for ``vxm.networks.VxmDense.load``; returns its path."""
    model_dir = checked_model_dir(model_dir)
    _, generator, _ = restore_for_export(model_dir, which)
    return write_generator_h5(model_dir, generator)
