"""Helpers shared by the command-line tests (imported by them; fixtures are in conftest.py)."""
import os
import re
import shutil

import nibabel as nib
import numpy as np

import ltnet_tf  # noqa: F401  (selects Keras 2 before TensorFlow is imported)

import tensorflow as tf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 20, 24)  # not cubic, so swapped axes show
STEPS = 2
SLIM = ["--enc_features=8,8", "--dec_features=8,8,8,8", "--disc_features=4,8"]
SUBPROCESS_TIMEOUT = 120


def write_nifti(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def copy_into(folder, *paths):
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        shutil.copy(path, folder)
    return str(folder)


def the_error_line(capsys, *fragments):
    """The command's stderr holds exactly one line starting 'error:', containing ``fragments``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert err.count("error:") == 1, err  # one line: no traceback, no continuation
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def read_checkpoint_iterations(path):
    return int(tf.train.load_checkpoint(path).get_tensor(
        "g_optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def outputs_under(folder):
    """``files_under`` less predict.py's own bookkeeping (its per-scan records that let a run
    continue, its lock files); temporary files left behind still show."""
    return [name for name in files_under(folder)
            if not name.startswith(".predict-journal" + os.sep)
            and not re.match(r"^\.predict.*\.lock$", name)]


def train_argv(dataset, model_dir, *extra):
    return ["train.py", "--atlas", dataset.atlas, "--atlas_labels", dataset.atlas_labels,
            "--unlabeled", dataset.images_dir, "--model_dir", str(model_dir), *SLIM, *extra]
