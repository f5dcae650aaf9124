"""Make the TensorFlow VoxelMorph stack importable; imported before anything else in ltnet_tf.

Why this exists, once:
- voxelmorph 0.2 and neurite 0.2 (the last TensorFlow releases) are Keras-2 code. TensorFlow >= 2.16
  ships Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is first imported, in
  which case ``tf.keras`` is ``tf_keras`` (Keras 2).
- neurite 0.2's ``store_config_args`` calls ``inspect.getargspec``, removed in Python 3.11.
- neurite 0.2's callbacks use ``np.Inf``, removed in NumPy 2.
- ``vxm.py.utils.load_volfile`` (how VoxelMorph's own scripts, e.g. ``scripts/tf/register.py``,
  read volumes) calls nibabel's ``get_data()``, which nibabel 5 turned into an error. It is
  restored as nibabel's own deprecation message says to replace it: ``np.asanyarray(img.dataobj)``.
  ltnet_tf itself never calls it (``ltnet_tf.io.volumes`` reads with ``get_fdata``/``dataobj``).
- TensorFlow's start-up lines ("failed call to cuInit: ... CUDA error" on every CPU machine, the
  cudart and oneDNN notices) read as errors to a user. They are kept out unless asked for with
  ``--verbose`` or the user's own ``TF_CPP_MIN_LOG_LEVEL``: the level is set before TensorFlow is
  imported, and the lines TensorFlow writes before its logging starts (which ignore the level) are
  filtered out of stderr while ``tensorflow`` is first imported.
"""
import contextlib
import importlib.abc
import importlib.util
import inspect
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Set here, the level is also marked as ours, so that a subprocess (inheriting it) stays quiet too.
_USER_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL") not in (None,
                                                              os.environ.get("LTNET_TF_LOG_LEVEL"))
VERBOSE = "--verbose" in sys.argv[1:] or _USER_LEVEL
if not _USER_LEVEL:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ["LTNET_TF_LOG_LEVEL"] = "0" if VERBOSE else "3"
# What TensorFlow writes to stderr at import, before its logging honours TF_CPP_MIN_LOG_LEVEL.
_STARTUP_NOISE = re.compile(r"All log messages before absl::InitializeLog|oneDNN custom operations"
                            r"|cudart_stub\.cc|Could not find cuda drivers|cuInit|Unable to register "
                            r"cu(DNN|FFT|BLAS) factory|computation placer already registered"
                            r"|TF-TRT Warning")


@contextlib.contextmanager
def _startup_noise_filtered():
    """Collect what is written to file descriptor 2 meanwhile; give back all but the noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            kept = [line for line in collected.read().decode(errors="replace").splitlines(True)
                    if not _STARTUP_NOISE.search(line)]
            if kept:
                os.write(2, "".join(kept).encode())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` inside ``_startup_noise_filtered``."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def quiet_exec_module(module):
                with _startup_noise_filtered():
                    exec_module(module)

            spec.loader.exec_module = quiet_exec_module
        return spec


if not VERBOSE and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlowImport())
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


def _restore_nibabel_get_data():
    try:
        import nibabel
        from nibabel.dataobj_images import DataobjImage
    except ImportError:  # nibabel is a dependency; without it there is nothing to restore
        return
    if int(nibabel.__version__.split(".")[0]) < 5 or getattr(DataobjImage.get_data, "restored",
                                                             False):
        return

    def get_data(self, caching="fill"):  # noqa: ARG001  (nibabel's signature)
        """The image's data as stored (scaled when the header says so): nibabel's removed
        ``get_data()``, as its deprecation message says to replace it."""
        return np.asanyarray(self.dataobj)

    get_data.restored = True
    DataobjImage.get_data = get_data


_restore_nibabel_get_data()
