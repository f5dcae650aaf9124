"""Fixtures shared by the test modules: a tiny synthetic data set and one short trained run
(trained once per test session: training is the slow part on CPU)."""
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from helpers import SHAPE, STEPS, train_argv
from ltnet_tf.commands import cli, synthetic
from ltnet_tf.config import LTNetConfig
from ltnet_tf.serving.modeldir import ModelDir


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Atlas, atlas labels, 3 unlabelled scans with their labels (for validation and Dice)."""
    root = tmp_path_factory.mktemp("data")
    paths = synthetic.make_demo_dataset(str(root), n_scans=3, shape=SHAPE, seed=0)
    paths["affine"] = synthetic.demo_affine(SHAPE)
    paths["label_ids"] = sorted(np.unique(nib.load(paths["atlas_labels"]).get_fdata()).astype(int))
    return SimpleNamespace(**paths)


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory):
    """A run of STEPS steps, started from another run's config.json (atlas_shape/label_ids there
    are of another atlas and must be ignored), with validation, exported."""
    root = tmp_path_factory.mktemp("runs")
    other_config = root / "other_run_config.json"
    LTNetConfig().replace(atlas_shape=[9, 9, 9], label_ids=[0, 1, 5], ncc_window=5,
                          checkpoint_every=7, steps=999).save(str(other_config))
    model_dir = root / "run"
    rc = cli.train_main(train_argv(dataset, model_dir, "--config", str(other_config),
                                   f"--steps={STEPS}", f"--checkpoint_every={STEPS}",
                                   "--val_images", dataset.images_dir,
                                   "--val_labels", dataset.labels_dir))
    assert rc == 0
    return ModelDir(str(model_dir))
