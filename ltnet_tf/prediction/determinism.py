"""Same scan, same answer: the thread counts that make a segmentation bit-identical.

Two sources of run-to-run differences were measured (``python -m bench.reliability``):

- ITK's registration metric (Mattes mutual information, ``registration.alignment``) sums its
  per-thread histograms in whatever order the threads finish: two alignments of one scan in one
  process differed by up to 1.6e-5 in the affine, enough to move a few to thousands of boundary
  voxels. The registration method runs on one thread (``AlignmentSettings.registration_threads``);
  ITK's resampling, whose voxels are independent, stays threaded.
- TensorFlow's (and XLA's) CPU kernels split reductions (matrix products of the refinement's local
  NCC, convolutions of G_F) by the size of the intra-op thread pool, which TensorFlow sets from the
  machine's cores (or the CPUs a job may use): the same refinement gave other bits on 1 and on 2
  cores. The pool is fixed here, before TensorFlow starts, to ``COMPUTE_THREADS`` whatever the
  machine; a machine with fewer cores time-slices them and gets the same bits.

With these fixed, every kernel on the CPU is deterministic: no atomics, no autotuning. On a GPU
``tf.config.experimental.enable_op_determinism`` is switched on as well.

``LTNET_TF_THREADS=N`` sets another pool size (results are then identical between runs with the
same N); ``LTNET_TF_THREADS=machine`` gives TensorFlow's and ITK's own defaults (faster on many
cores, not repeatable in the last bits).
"""
from __future__ import annotations

import os
from typing import Optional

from absl import logging

THREADS_VARIABLE = "LTNET_TF_THREADS"
COMPUTE_THREADS = 2  # TensorFlow's intra-op pool, independent of the machine (see above)


def compute_threads() -> Optional[int]:
    """The fixed pool size asked for (``LTNET_TF_THREADS``, default ``COMPUTE_THREADS``), or None
    for the machine's defaults. Raises ValueError for a value that is neither."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return COMPUTE_THREADS
    if value == "machine":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VARIABLE} must be a thread count >= 1 or 'machine', got "
                         f"{value!r}")
    return int(value)


def registration_threads() -> int:
    """ITK threads of the registration metric: 1 (deterministic), 0 (ITK's default) with
    ``LTNET_TF_THREADS=machine``."""
    return 0 if compute_threads() is None else 1


def fix_threads() -> dict:
    """Fix TensorFlow's thread pools (see the module docstring); call before any TensorFlow op
    runs. Returns {'threads': N or 'machine', 'deterministic': bool} for prediction.json.

    When TensorFlow started already with other pools (a library caller that ran TensorFlow
    first), nothing can change them: a warning says that results then match only runs started
    the same way."""
    import tensorflow as tf

    threads = compute_threads()
    if threads is None:
        return {"threads": "machine", "deterministic": False}
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current != threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow's runtime is initialised: its pools are fixed for good
            logging.warning("TensorFlow started before the prediction with %s intra-op threads "
                            "instead of %d: results are repeatable only between runs started the "
                            "same way", current or "the machine's", threads)
            return {"threads": current or "machine", "deterministic": False}
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()
    return {"threads": threads, "deterministic": True}


def follow_threads(compute: dict) -> dict:
    """A job of ``--jobs N`` (a fresh process) computing with job 1's pools: ``compute`` is what
    ``fix_threads`` returned in job 1 ('machine': TensorFlow's defaults, kept). Call before any
    TensorFlow op runs. Returns ``compute``."""
    import tensorflow as tf

    if compute["threads"] != "machine":
        tf.config.threading.set_intra_op_parallelism_threads(int(compute["threads"]))
        tf.config.threading.set_inter_op_parallelism_threads(int(compute["threads"]))
    if compute["deterministic"] and tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()
    return dict(compute)
