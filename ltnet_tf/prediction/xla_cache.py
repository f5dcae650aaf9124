"""XLA's compiled refinement kept on disk, so that only a machine's first prediction compiles it.

The refinement's steps are XLA-compiled (``registration.refinement``, ``jit_compile``): on the
first scan of every process that is ~2.5 CPU s of a native scan's start-up, paid again by every
``predict.py`` run (and every job of ``--jobs N``). TensorFlow can keep what XLA compiled in a
folder (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory``) and load it in later processes
instead of compiling again; the loaded code is the compiled code, so results are the same bits
(checked: ``tests/test_prediction_jobs.py``, ``bench/results/cohort.md``).

The folder is ``$LTNET_CACHE_DIR/xla/<machine>`` (``files.cache_dir``), one per TensorFlow version
and CPU model and instruction set: a home folder shared by the nodes of a cluster never hands
code compiled for one CPU to another. A ``--tf_xla_persistent_cache_directory`` the user set in
``TF_XLA_FLAGS`` is left as it is. TensorFlow reads the variable once, when its runtime starts
(its devices are listed), so this runs before that: a library caller whose TensorFlow started
before keeps no cache, and compiles as before.
"""
from __future__ import annotations

import hashlib
import os
import platform

from absl import logging

from ltnet_tf.files import cache_dir

CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def machine_key() -> str:
    """16 hex digits naming this TensorFlow version and this CPU (model and instruction set)."""
    import tensorflow as tf

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:  # Linux: the model and the flags of the first CPU
            lines = [line for line in f.read().split("\n\n")[0].splitlines()
                     if line.startswith(("model name", "flags", "Features"))]
        cpu = "\n".join(lines) or cpu
    except OSError:
        pass
    text = f"{tf.__version__}|{platform.machine()}|{cpu}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def keep_compiled_code():
    """Point XLA's persistent cache at this machine's folder (created); -> the folder, or None
    when the user chose one already or it cannot be created (then XLA compiles as usual)."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if CACHE_FLAG in flags:
        return None
    folder = os.path.join(cache_dir(), "xla", machine_key())
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        logging.info("%s: no XLA cache (%s): the refinement is compiled in every process", folder,
                     e.strerror)
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} {CACHE_FLAG}={folder}".strip()
    return folder
