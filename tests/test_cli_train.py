"""Tests of the training command line (ltnet_tf.commands.cli.train_main, train.py) on tiny NIfTI files.

Training is slow on CPU: the end-to-end tests share one short run (``trained_run``, conftest.py);
its resumption trains a few steps more. Everything else fails before any network is built.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import (REPO, SHAPE, STEPS, SUBPROCESS_TIMEOUT, copy_into,
                     read_checkpoint_iterations, the_error_line, train_argv, write_nifti)
from ltnet_tf.commands import cli
from ltnet_tf.config import LTNetConfig
from ltnet_tf.registration import atlases
from ltnet_tf.serving.modeldir import ModelDir
from ltnet_tf.training import dataset as datasets, trainer as training

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

pytestmark = pytest.mark.slow  # uses the session's trained run (training and export) (CI runs -m slow too)


# ------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script, expected", [
    ("train.py", ["weight_cyc_label", "downsample", "atlas", "atlas_labels", "unlabeled",
                  "model_dir", "steps", "val_images", "val_labels", "config", "resume",
                  "enc_features"]),
    ("predict.py", ["model_dir", "images", "output_dir", "labels", "save_warped_atlas",
                    "save_flow"]),
])
def test_script_helpfull(script, expected):
    result = subprocess.run([sys.executable, script, "--helpfull"], cwd=REPO, capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "usage: python " + script in result.stdout
    for name in expected:  # boolean flags are listed as --[no]name
        assert re.search(rf"^  --(\[no\])?{name}: \S", result.stdout, re.MULTILINE), name


@pytest.mark.parametrize("argv, fragment", [
    (["--enc_features=8,x"], "--enc_features must be comma-separated integers"),
    (["--steps=0"], "'steps' must be a positive integer"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--downsample=two"], "downsample"),
])
def test_train_bad_flag_is_one_line_error(dataset, tmp_path, capsys, argv, fragment):
    model_dir = tmp_path / "run"
    assert cli.train_main(train_argv(dataset, model_dir, *argv)) == 1
    the_error_line(capsys, fragment)
    assert not model_dir.exists()


def test_flags_parse_to_config_types(dataset, tmp_path):
    """List flags become ints; --config values apply; explicit flags beat them."""
    config_path = tmp_path / "config.json"
    LTNetConfig().replace(ncc_window=5, steps=77, atlas_shape=[1, 2, 3]).save(str(config_path))
    flag_values = cli._train_flags()
    flag_values(train_argv(dataset, tmp_path / "run", "--config", str(config_path), "--steps=3",
                           "--weight_adv=0", "--jit_compile"))
    config = cli._config_from_flags(flag_values)
    assert config.enc_features == [8, 8] and all(type(v) is int for v in config.dec_features)
    assert config.disc_features == [4, 8]
    assert (config.ncc_window, config.steps, config.weight_adv, config.jit_compile) == (5, 3, 0.0,
                                                                                       True)
    assert config.atlas_shape is None and config.label_ids is None  # from the data, not a file


def test_cpu_profile_sets_the_cpu_recipe_and_flags_still_win(dataset, tmp_path):
    flag_values = cli._train_flags()
    flag_values(["train.py", "--atlas", dataset.atlas, "--unlabeled", dataset.images_dir,
                 "--model_dir", str(tmp_path / "run"), "--profile", "cpu", "--steps=40",
                 "--preset", "voxelmorph"])
    config = cli._config_from_flags(flag_values)
    assert (config.downsample, config.enc_features, config.g_learning_rate) == (4, [16, 32, 32],
                                                                                1e-3)
    assert config.steps == 40 and config.weight_adv == 0.0  # explicit flag, preset: both kept


# ------------------------------------------------------------------------------- end to end
def test_train_writes_a_complete_run_folder(trained_run, dataset):
    config = trained_run.load_config()
    assert config.atlas_shape == list(SHAPE)  # from the atlas, not the --config file's [9, 9, 9]
    assert config.label_ids == dataset.label_ids
    assert config.ncc_window == 5  # from the --config file
    assert (config.steps, config.checkpoint_every) == (STEPS, STEPS)  # flags beat the file
    assert config.enc_features == [8, 8] and config.disc_features == [4, 8]
    for path in (trained_run.atlas_path, trained_run.atlas_labels_path,
                 trained_run.generator_h5_path, trained_run.qc_path):
        assert os.path.isfile(path), path
    assert trained_run.saved_model_versions() == [1]
    assert read_checkpoint_iterations(trained_run.checkpoint("last")) == STEPS
    with open(os.path.join(trained_run.best_checkpoint_dir, "best.json")) as f:
        assert 0.0 <= json.load(f)["val_dice"] <= 1.0
    atlas_copy = nib.load(trained_run.atlas_path)
    np.testing.assert_allclose(atlas_copy.affine, dataset.affine)


# ------------------------------------------------------------------------------- resume
def test_resume_continues_from_the_last_step(trained_run, dataset, tmp_path, capsys):
    """Copy of a STEPS-step run, resumed to 2 * STEPS: training goes on from step STEPS."""
    model_dir = ModelDir(str(tmp_path / "run"))
    shutil.copytree(trained_run.path, model_dir.path)
    first = os.path.join(model_dir.checkpoint_dir, f"ckpt-{STEPS}.index")
    with open(first, "rb") as f:
        first_bytes = f.read()
    first_mtime = os.stat(first).st_mtime_ns
    capsys.readouterr()
    rc = cli.train_main(train_argv(dataset, model_dir.path, "--resume", f"--steps={2 * STEPS}",
                                   "--noexport"))
    assert rc == 0
    out = capsys.readouterr().out
    # One more checkpoint interval (Keras epoch 2 of 2), not a restart at epoch 1.
    assert "Epoch 2/2" in out and "Epoch 1/2" not in out
    manager_state = tf.train.get_checkpoint_state(model_dir.checkpoint_dir)
    numbers = sorted(int(p.rsplit("-", 1)[1]) for p in manager_state.all_model_checkpoint_paths)
    assert numbers == [STEPS, 2 * STEPS]
    last = model_dir.checkpoint("last")
    assert last.endswith(f"ckpt-{2 * STEPS}")
    assert read_checkpoint_iterations(last) == 2 * STEPS
    with open(first, "rb") as f:  # the checkpoint of step STEPS was not written again
        assert f.read() == first_bytes
    assert os.stat(first).st_mtime_ns == first_mtime
    config = model_dir.load_config()
    assert config.steps == 2 * STEPS and config.checkpoint_every == STEPS  # the run's own config


def test_plain_resume_keeps_the_runs_planned_steps(dataset, tmp_path, monkeypatch):
    """--resume without --steps finishes the run as planned (not at the default 1500 steps)."""
    model_dir = ModelDir(str(tmp_path / "run"))
    os.makedirs(model_dir.path)
    LTNetConfig().replace(steps=12, enc_features=[8, 8], dec_features=[8, 8, 8, 8],
                          disc_features=[4, 8]).save(model_dir.config_path)  # as SLIM
    asked = {}

    def fake_train(config, *args, **kwargs):
        asked.update(steps=config.steps, resume=kwargs["resume"])
        return model_dir

    monkeypatch.setattr(training, "train", fake_train)
    assert cli.train_main(train_argv(dataset, model_dir.path, "--resume")) == 0
    assert asked == {"steps": 12, "resume": True}
    assert cli.train_main(train_argv(dataset, model_dir.path, "--resume", "--steps=20")) == 0
    assert asked == {"steps": 20, "resume": True}


def test_resume_without_run_folder(dataset, tmp_path, capsys):
    model_dir = tmp_path / "never_trained"
    assert cli.train_main(train_argv(dataset, model_dir, "--resume", "--steps=4")) == 1
    the_error_line(capsys, str(model_dir), "model folder not found")
    assert not model_dir.exists()


def test_resume_of_a_folder_that_is_not_a_run(dataset, tmp_path, capsys):
    model_dir = tmp_path / "some_folder"
    model_dir.mkdir()
    assert cli.train_main(train_argv(dataset, model_dir, "--resume")) == 1
    the_error_line(capsys, str(model_dir), "not an LT-Net model folder")
    assert os.listdir(model_dir) == []


def test_train_refuses_to_overwrite_a_run(dataset, tmp_path, capsys):
    model_dir = ModelDir(str(tmp_path / "run"))
    os.makedirs(os.path.join(model_dir.saved_model_base, "1"))
    with open(model_dir.config_path, "w") as f:
        f.write("{}")
    assert cli.train_main(train_argv(dataset, model_dir.path)) == 1
    the_error_line(capsys, model_dir.path, "already holds a run", "--resume")
    with open(model_dir.config_path) as f:
        assert f.read() == "{}"


def test_a_start_that_failed_can_be_started_again(dataset, tmp_path):
    """config.json without any checkpoint (e.g. a scan that went bad in tf.data) is no run yet."""
    atlas, atlas_labels, _ = training.check_inputs(dataset.atlas, dataset.atlas_labels,
                                                   dataset.images_dir)
    config = training.resolve_config(LTNetConfig().replace(steps=5), atlas, atlas_labels)
    model_dir = ModelDir(str(tmp_path / "run"))
    model_dir.create(config.replace(steps=3), atlas, atlas_labels)
    model_dir.create(config, atlas, atlas_labels)
    assert model_dir.load_config().steps == 5


def test_data_error_raised_inside_tf_data_is_reported_as_one_line(dataset, tmp_path):
    """A scan gone bad after the up-front checks: tf.data wraps our DataError; the CLI shows it."""
    bad = write_nifti(tmp_path / "bad.nii.gz", np.full(SHAPE, np.nan, np.float32), dataset.affine)
    config = LTNetConfig().replace(enc_features=[8, 8], dec_features=[8, 8, 8, 8],
                                   atlas_shape=list(SHAPE))
    with pytest.raises(tf.errors.OpError) as raised:
        next(iter(datasets.make_training_dataset([bad], config)))
    assert cli._user_error(raised.value) == f"{bad}: contains {int(np.prod(SHAPE))} NaN/Inf voxels"
    assert cli._user_error(RuntimeError("a bug")) is None


# ------------------------------------------------------------------------------- bad input: train
def _bad_train_input(case, dataset, tmp_path):
    """argv changes for one bad-input case, and the file the error must name."""
    affine = dataset.affine
    scan = nib.load(dataset.images[0]).get_fdata(dtype=np.float32)
    folder = tmp_path / "scans"
    copy_into(folder, *dataset.images)  # good scans beside the bad one: all are checked up front

    def bad_scan(name, array, file_affine=affine):
        return {"--unlabeled": str(folder)}, write_nifti(folder / name, array, file_affine)

    if case == "missing_atlas":
        path = str(tmp_path / "no_atlas.nii.gz")
        return {"--atlas": path}, path
    if case == "missing_atlas_labels":
        path = str(tmp_path / "no_labels.nii.gz")
        return {"--atlas_labels": path}, path
    if case == "missing_folder":
        path = str(tmp_path / "no_such_folder")
        return {"--unlabeled": path}, path
    if case == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
        return {"--unlabeled": str(path)}, str(path)
    if case == "folder_without_images":
        path = tmp_path / "documents"
        path.mkdir()
        (path / "readme.txt").write_text("not a scan")
        return {"--unlabeled": str(path)}, str(path)
    if case == "not_nifti":
        path = tmp_path / "scan.txt"
        path.write_text("not a scan")
        return {"--unlabeled": str(path)}, str(path)
    if case == "corrupt_nifti":
        path = folder / "corrupt.nii.gz"
        path.write_bytes(b"not gzip data")
        return {"--unlabeled": str(folder)}, str(path)
    if case == "2d_scan":
        return bad_scan("flat.nii.gz", scan[:, :, 0])
    if case == "4d_scan":
        return bad_scan("frames.nii.gz", np.stack([scan, scan], -1))
    if case == "nan_scan":
        holed = scan.astype(np.float32).copy()  # NaN inside the tissue (outside: background),
        centre = tuple(slice(s // 2 - 2, s // 2 + 2) for s in holed.shape)  # over 0.5 % of it
        holed[centre] = np.nan
        return bad_scan("nan.nii.gz", holed)
    if case == "inf_atlas":
        infinite = np.where(scan > 0.5, np.inf, scan)
        path = write_nifti(tmp_path / "inf_atlas.nii.gz", infinite, affine)
        return {"--atlas": path}, path
    if case == "labels_not_integer":
        labels = np.asarray(nib.load(dataset.atlas_labels).dataobj).astype(np.float32) + 0.25
        path = write_nifti(tmp_path / "float_labels.nii.gz", labels, affine)
        return {"--atlas_labels": path}, path
    if case == "labels_other_shape":
        labels = np.asarray(nib.load(dataset.atlas_labels).dataobj)[:, :, :-2]
        path = write_nifti(tmp_path / "cropped_labels.nii.gz", labels, affine)
        return {"--atlas_labels": path}, path
    if case == "labels_other_affine":
        moved = affine.copy()
        moved[0, 3] += 2.0
        labels = np.asarray(nib.load(dataset.atlas_labels).dataobj)
        path = write_nifti(tmp_path / "moved_labels.nii.gz", labels, moved)
        return {"--atlas_labels": path}, path
    if case == "scan_other_grid":
        changes, path = bad_scan("small.nii.gz", scan[:12])
        return {**changes, "--align": "never"}, path
    if case == "scan_not_a_brain":  # another grid, so it would be aligned: far too small a brain
        return bad_scan("small.nii.gz", scan[:12])
    if case == "val_scan_nan":
        images = copy_into(tmp_path / "val_images", dataset.images[0])
        labels = copy_into(tmp_path / "val_labels", dataset.labels[0])
        path = write_nifti(tmp_path / "val_images" / "scan_00.nii.gz",
                           np.full(SHAPE, np.nan, np.float32), affine)
        return {"--val_images": images, "--val_labels": labels}, path
    if case == "val_label_missing":
        images = copy_into(tmp_path / "val_images", *dataset.images[:2])
        labels = copy_into(tmp_path / "val_labels", dataset.labels[0])
        return {"--val_images": images, "--val_labels": labels}, os.path.join(
            images, "scan_01.nii.gz")
    if case == "model_dir_unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        path = str(blocker / "run")
        return {"--model_dir": path}, path
    raise AssertionError(case)


TRAIN_CASES = {
    "missing_atlas": "file not found",
    "missing_atlas_labels": "file not found",
    "missing_folder": "not found",
    "empty_folder": "no NIfTI/MGZ images in folder",
    "folder_without_images": "no NIfTI/MGZ images in folder",
    "not_nifti": "not a NIfTI/MGZ image",
    "corrupt_nifti": "not a NIfTI/MGZ image",
    "2d_scan": "expected a 3D volume",
    "4d_scan": "is 4D with 2 frames",
    "nan_scan": "NaN/Inf voxels",
    "inf_atlas": "NaN/Inf voxels",
    "labels_not_integer": "label values are not integers",
    "labels_other_shape": "differs from the shape",
    "labels_other_affine": "header affine differs",
    "scan_other_grid": "differs from the shape",
    "scan_not_a_brain": "does not look like a brain scan",
    "val_scan_nan": "NaN/Inf voxels",
    "val_label_missing": "no label map named 'scan_01'",
    "model_dir_unwritable": "cannot create model folder",
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(case, dataset, tmp_path, capsys):
    changes, bad_path = _bad_train_input(case, dataset, tmp_path)
    model_dir = changes.pop("--model_dir", str(tmp_path / "run"))
    argv = train_argv(dataset, model_dir, "--steps=2")
    for flag, value in changes.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert cli.train_main(argv) == 1
    the_error_line(capsys, bad_path, TRAIN_CASES[case])
    assert not os.path.exists(model_dir)  # no half-written run folder (no config.json)


def test_train_atlas_labels_default_beside_the_atlas(dataset, tmp_path, capsys):
    folder = copy_into(tmp_path / "atlas_only", dataset.atlas)
    argv = train_argv(dataset, tmp_path / "run")
    del argv[argv.index("--atlas_labels"):argv.index("--atlas_labels") + 2]
    argv[argv.index("--atlas") + 1] = os.path.join(folder, "atlas.nii.gz")
    assert cli.train_main(argv) == 1
    the_error_line(capsys, "atlas.nii.gz", "--atlas_labels not given")
    assert atlases.default_atlas_labels(dataset.atlas) == dataset.atlas_labels
