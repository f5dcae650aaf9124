"""Fixtures shared by the test modules: a tiny synthetic data set and one short trained run,
made once per test session and shared by the pytest-xdist workers (training and export are the
slow part on CPU: the first worker to need them builds them under a file lock, the others wait
and read the same folder)."""
import contextlib
import fcntl
import json
import os
import shutil
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from helpers import SHAPE, STEPS, train_argv
from ltnet_tf.commands import cli, synthetic
from ltnet_tf.config import LTNetConfig
from ltnet_tf.serving.modeldir import ModelDir


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """Yield (folder, already built) for a session-wide folder ``name`` shared by every xdist
    worker of this session, holding an exclusive lock; the caller builds the folder when it is
    not built yet and calls ``mark_built``. A build that failed is tried again by the next."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder, (folder / ".built").exists()


def mark_built(folder) -> None:
    (folder / ".built").touch()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Atlas, atlas labels, 3 unlabelled scans with their labels (for validation and Dice)."""
    with built_once(tmp_path_factory, "data") as (root, built):
        if not built:
            shutil.rmtree(root, ignore_errors=True)  # what a failed build left
            root.mkdir()
            synthetic.make_demo_dataset(str(root), n_scans=3, shape=SHAPE, seed=0)
            mark_built(root)
    names = [f"scan_{index:02d}.nii.gz" for index in range(3)]  # as make_demo_dataset names them
    paths = {"atlas": str(root / "atlas.nii.gz"), "atlas_labels": str(root / "atlas_labels.nii.gz"),
             "images_dir": str(root / "images"), "labels_dir": str(root / "labels"),
             "images": [str(root / "images" / name) for name in names],
             "labels": [str(root / "labels" / name) for name in names]}
    paths["affine"] = synthetic.demo_affine(SHAPE)
    paths["label_ids"] = sorted(np.unique(nib.load(paths["atlas_labels"]).get_fdata()).astype(int))
    return SimpleNamespace(**paths)


@pytest.fixture(scope="session")
def trained_run(dataset, tmp_path_factory):
    """A run of STEPS steps, started from another run's config.json (atlas_shape/label_ids there
    are of another atlas and must be ignored), with validation, exported."""
    with built_once(tmp_path_factory, "runs") as (root, built):
        model_dir = root / "run"
        if not built:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            other_config = root / "other_run_config.json"
            LTNetConfig().replace(atlas_shape=[9, 9, 9], label_ids=[0, 1, 5], ncc_window=5,
                                  checkpoint_every=7, steps=999).save(str(other_config))
            rc = cli.train_main(train_argv(dataset, model_dir, "--config", str(other_config),
                                           f"--steps={STEPS}", f"--checkpoint_every={STEPS}",
                                           "--val_images", dataset.images_dir,
                                           "--val_labels", dataset.labels_dir))
            assert rc == 0
            mark_built(root)
    return ModelDir(str(model_dir))


@pytest.fixture(scope="session")
def phantom_runs(tmp_path_factory):
    """test_export's two hand-made run folders (downsample 1 and 2: ``make_run``), exported once
    per session for test_export and test_serving_doc: {downsample: (ModelDir, export_all's
    paths)}. Read them; copy one before changing it."""
    from ltnet_tf.serving import export
    from test_export import GRIDS, make_run

    with built_once(tmp_path_factory, "phantom_runs") as (root, built):
        if not built:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            for downsample in GRIDS:
                paths = export.export_all(make_run(root / f"RUN{downsample}", downsample))
                (root / f"RUN{downsample}.json").write_text(json.dumps(paths))
            mark_built(root)
    return {downsample: (ModelDir(str(root / f"RUN{downsample}")),
                         json.loads((root / f"RUN{downsample}.json").read_text()))
            for downsample in GRIDS}
