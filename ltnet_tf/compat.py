"""Make the TensorFlow VoxelMorph stack importable; imported before anything else in ltnet_tf.

Why this exists, once:
- voxelmorph 0.2 and neurite 0.2 (the last TensorFlow releases) are Keras-2 code. TensorFlow >= 2.16
  ships Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported, in
  which case ``tf.keras`` is ``tf_keras`` (Keras 2).
- neurite 0.2's ``store_config_args`` calls ``inspect.getargspec``, removed in Python 3.11.
- neurite 0.2's callbacks use ``np.Inf``, removed in NumPy 2.
- ``vxm.py.utils.load_volfile`` calls nibabel's removed ``get_data()``; we never call it and read
  NIfTI with nibabel directly (see ``ltnet_tf.data``).
"""
import inspect
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO lines (CUDA stubs, CPU features) drown the training progress; warnings stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
if os.environ["TF_USE_LEGACY_KERAS"] not in ("1", "true", "True"):
    raise ImportError("ltnet_tf needs Keras 2: unset TF_USE_LEGACY_KERAS or set it to 1")

if "tensorflow" in sys.modules and "tf_keras" not in sys.modules:
    _tf = sys.modules["tensorflow"]
    _keras_version = getattr(getattr(_tf, "keras", None), "__version__", "2")
    if str(_keras_version).startswith("3"):
        raise ImportError(
            "TensorFlow was imported with Keras 3 before ltnet_tf; import ltnet_tf first or set "
            "TF_USE_LEGACY_KERAS=1 in the environment")

if not hasattr(inspect, "getargspec"):
    def _getargspec(func):
        spec = inspect.getfullargspec(func)
        return spec.args, spec.varargs, spec.varkw, spec.defaults

    inspect.getargspec = _getargspec

import numpy as np  # noqa: E402

if not hasattr(np, "Inf"):
    np.Inf = np.inf
