"""What goes wrong in long runs, injected for real: divergence, damaged checkpoints and SavedModels,
interrupted and resumed runs, reused output folders.

One short run (``run``: 4 steps, a checkpoint every 2, no validation, exported) is trained once;
each test damages or continues its own copy. The data (conftest.py) and helpers (helpers.py) are
shared with the command-line tests.
"""
import gc
import json
import logging as pylogging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from ltnet_tf.commands import cli
from ltnet_tf.serving.modeldir import ModelDir, checkpoint_problem
from helpers import (REPO, SUBPROCESS_TIMEOUT, copy_into, files_under, outputs_under,
                     read_checkpoint_iterations, the_error_line, train_argv)

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

pytestmark = pytest.mark.slow  # trains a run and runs train.py/predict.py in fresh processes (CI runs -m slow too)

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs") / "run"
    assert cli.train_main(train_argv(dataset, model_dir, f"--steps={STEPS}",
                                     f"--checkpoint_every={EVERY}")) == 0
    return ModelDir(str(model_dir))


@pytest.fixture
def run_copy(run, tmp_path):
    copy = ModelDir(str(tmp_path / "run"))
    shutil.copytree(run.path, copy.path)
    return copy


def checkpoint_file(model_dir, step, part):
    """``part``: 'index' or 'data' (the single data shard)."""
    folder = model_dir.checkpoint_dir
    suffix = ".index" if part == "index" else ".data-00000-of-00001"
    return os.path.join(folder, f"ckpt-{step}{suffix}")


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def predict_argv(model_dir, images, output_dir, *extra):
    return ["predict.py", "--model_dir", model_dir.path, "--images", str(images),
            "--output_dir", str(output_dir), *extra]


# ------------------------------------------------------------------------------- divergence
@pytest.mark.parametrize("argv, fragment", [
    (["--g_learning_rate=inf"], "'g_learning_rate' must be a finite number > 0"),
    (["--d_learning_rate=nan"], "'d_learning_rate' must be a finite number > 0"),
    (["--enc_features="], "'enc_features' must list at least one feature count"),
])
def test_unusable_values_are_refused_before_training(dataset, tmp_path, capsys, argv, fragment):
    model_dir = tmp_path / "run"
    assert cli.train_main(train_argv(dataset, model_dir, "--steps=2", *argv)) == 1
    the_error_line(capsys, fragment)
    assert not model_dir.exists()


def test_fault_injection_divergence_keeps_the_last_good_checkpoint(run_copy, dataset, tmp_path,
                                                                   capsys):
    """A resumed run whose learning rate diverges stops with one line; nothing is saved after the
    last good checkpoint, which still predicts; config.json keeps the run's own settings."""
    config_before = read_bytes(run_copy.config_path)
    assert cli.train_main(train_argv(dataset, run_copy.path, "--resume", "--steps=12",
                                     "--g_learning_rate=1e30", "--noexport")) == 1
    the_error_line(capsys, run_copy.path, "training diverged at step", f"ckpt-{STEPS}",
                   "--g_learning_rate", "--resume")
    assert run_copy.checkpoint("last").endswith(f"ckpt-{STEPS}")
    assert [f for f in os.listdir(run_copy.checkpoint_dir) if f.startswith(f"ckpt-{STEPS + 2}")] \
        == []
    assert read_bytes(run_copy.config_path) == config_before

    out = tmp_path / "out"
    assert cli.predict_main(predict_argv(run_copy, dataset.images[0], out, "--source",
                                         "checkpoint", "--checkpoint", "last")) == 0
    segmentation = np.asarray(nib.load(out / "scan_00_seg.nii.gz").dataobj)
    assert len(np.unique(segmentation)) > 1


def test_divergence_before_the_first_checkpoint_saves_nothing(dataset, tmp_path, capsys):
    """lr 1e30: the first step's weights are ~1e30, finite, but overflow in G_F."""
    model_dir = ModelDir(str(tmp_path / "run"))
    assert cli.train_main(train_argv(dataset, model_dir.path, "--steps=3", "--checkpoint_every=1",
                                     "--g_learning_rate=1e30")) == 1
    the_error_line(capsys, "training diverged at step 1", "before the first checkpoint",
                   "--g_learning_rate (now 1e+30)")
    assert tf.train.latest_checkpoint(model_dir.checkpoint_dir) is None
    assert model_dir.saved_model_versions() == []


# ------------------------------------------------------------------------------- damaged checkpoints
def test_fault_injection_resume_skips_a_damaged_newest_checkpoint(run_copy, dataset, caplog):
    """The newest checkpoint is truncated (a crash while it was written): --resume says so,
    continues from the one before, and writes the damaged step again."""
    damaged = checkpoint_file(run_copy, STEPS, "data")
    truncate(damaged)
    with caplog.at_level(pylogging.INFO):
        assert cli.train_main(train_argv(dataset, run_copy.path, "--resume", f"--steps={STEPS + 2}",
                                         "--noexport")) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"ckpt-{STEPS}: damaged checkpoint, skipped" in m for m in messages), messages
    assert any(f"at step {STEPS - EVERY} from" in m and f"ckpt-{STEPS - EVERY}" in m
               for m in messages), messages
    last = run_copy.checkpoint("last")
    assert last.endswith(f"ckpt-{STEPS + 2}") and read_checkpoint_iterations(last) == STEPS + 2
    assert checkpoint_problem(os.path.join(run_copy.checkpoint_dir, f"ckpt-{STEPS}")) is None


@pytest.mark.parametrize("part", ["data", "index"])
def test_damaged_checkpoint_is_named_by_predict_and_export(run_copy, dataset, tmp_path, capsys,
                                                           part):
    truncate(checkpoint_file(run_copy, STEPS, part))
    damaged = os.path.join(run_copy.checkpoint_dir, f"ckpt-{STEPS}")
    out = tmp_path / "out"
    assert cli.predict_main(predict_argv(run_copy, dataset.images[0], out, "--source",
                                         "checkpoint")) == 1
    the_error_line(capsys, damaged, "damaged checkpoint")
    assert not out.exists() or files_under(out) == []
    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{damaged}: damaged checkpoint" in err, err
    assert run_copy.saved_model_versions() == [1]


def test_resume_with_every_checkpoint_damaged_leaves_config_alone(run_copy, dataset, capsys):
    for step in (STEPS - EVERY, STEPS):
        truncate(checkpoint_file(run_copy, step, "index"))
    config_before = read_bytes(run_copy.config_path)
    assert cli.train_main(train_argv(dataset, run_copy.path, "--resume",
                                     f"--steps={STEPS + 2}")) == 1
    the_error_line(capsys, run_copy.checkpoint_dir, "every checkpoint is damaged")
    assert read_bytes(run_copy.config_path) == config_before


def test_checkpoint_that_cannot_be_written_is_one_line(run_copy, dataset, capsys):
    """An I/O error while saving mid-training (here: a folder where ckpt-6.index must go)."""
    os.makedirs(checkpoint_file(run_copy, STEPS + 2, "index"))
    assert cli.train_main(train_argv(dataset, run_copy.path, "--resume", f"--steps={STEPS + 2}",
                                     "--noexport")) == 1
    the_error_line(capsys, run_copy.checkpoint_dir, f"cannot save checkpoint ckpt-{STEPS + 2}")
    assert run_copy.checkpoint("last").endswith(f"ckpt-{STEPS}")


def test_no_best_checkpoint_says_why(run_copy, dataset, tmp_path, capsys):
    assert cli.predict_main(predict_argv(run_copy, dataset.images[0], tmp_path / "out", "--source",
                                         "checkpoint", "--checkpoint", "best")) == 1
    the_error_line(capsys, run_copy.path, "without --val_images", "--checkpoint last")


# ------------------------------------------------------------------------------- SavedModels
def _damage_saved_model(model_dir, how):
    version = os.path.join(model_dir.saved_model_base, "1")
    if how == "variables_deleted":
        shutil.rmtree(os.path.join(version, "variables"))
    elif how == "pb_truncated":
        truncate(os.path.join(version, "saved_model.pb"))
    elif how == "empty_version":
        version = os.path.join(model_dir.saved_model_base, "2")
        os.makedirs(version)
    return version


@pytest.mark.parametrize("how", ["variables_deleted", "pb_truncated", "empty_version"])
def test_damaged_saved_model_falls_back_to_the_checkpoint(run_copy, dataset, tmp_path, capsys,
                                                          caplog, how):
    version = _damage_saved_model(run_copy, how)
    out = tmp_path / "out"
    with caplog.at_level(pylogging.WARNING):
        assert cli.predict_main(predict_argv(run_copy, dataset.images[0], out)) == 0
    assert any(f"{version}: damaged SavedModel, using the checkpoint" in r.getMessage()
               for r in caplog.records)
    with open(out / "prediction.json") as f:
        assert json.load(f)["source"] == run_copy.checkpoint("auto")
    capsys.readouterr()
    asked = tmp_path / "asked"
    assert cli.predict_main(predict_argv(run_copy, dataset.images[0], asked, "--source",
                                         "saved_model")) == 1
    the_error_line(capsys, version, "damaged SavedModel")
    assert not asked.exists()


def test_export_removes_what_a_killed_export_left(run_copy, capsys):
    """A SIGKILL during export leaves saved_model/.export-<pid>-*; the next export removes it,
    but not the folder of an export that is still running."""
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    abandoned = os.path.join(run_copy.saved_model_base, f".export-{killed.pid}-x1y2")
    running = os.path.join(run_copy.saved_model_base, f".export-{os.getpid()}-a3b4")
    for folder in (abandoned, running):
        os.makedirs(os.path.join(folder, "variables"))
    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path]) == 0
    assert not os.path.exists(abandoned) and os.path.isdir(running)
    assert run_copy.saved_model_versions() == [1, 2]


def test_export_accepts_helpfull(capsys):
    assert cli.export_main(["ltnet-export", "--helpfull"]) == 0
    assert "--model_dir" in capsys.readouterr().out


# ------------------------------------------------------------------------------- resume and flags
@pytest.mark.parametrize("argv, field", [
    (["--enc_features=4,4"], "enc_features [8, 8] -> [4, 4]"),
    (["--ncc_window=5"], "ncc_window 9 -> 5"),
    (["--weight_adv=0"], "weight_adv 0.05 -> 0.0"),
    (["--preset=voxelmorph"], "weight_cyc_img 0.1 -> 0.0"),
])
def test_resume_refuses_what_cannot_change_in_a_run(run_copy, dataset, capsys, argv, field):
    config_before = read_bytes(run_copy.config_path)
    assert cli.train_main(train_argv(dataset, run_copy.path, "--resume", f"--steps={STEPS + 2}",
                                     *argv)) == 1
    the_error_line(capsys, run_copy.config_path, "--resume cannot change", field,
                   "start a new --model_dir")
    assert read_bytes(run_copy.config_path) == config_before
    assert run_copy.checkpoint("last").endswith(f"ckpt-{STEPS}")


def test_resume_of_a_finished_run_applies_the_learning_rate_quietly(run_copy, dataset, capsys):
    """Nothing to train: no new SavedModel version, no TensorFlow warning per optimiser slot; the
    learning rate that may change is applied and said."""
    dropped = []

    class Collect(pylogging.Handler):
        def emit(self, record):
            dropped.append(record.getMessage())

    handler = Collect(level=pylogging.WARNING)
    tf.get_logger().addHandler(handler)
    try:
        assert cli.train_main(train_argv(dataset, run_copy.path, "--resume",
                                         "--g_learning_rate=5e-5")) == 0
        gc.collect()  # the warnings come when the unfinished restore is collected
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [m for m in dropped if "could not be found" in m], dropped[:3]
    assert "g_learning_rate=0.0001 -> 5e-05" in capsys.readouterr().out
    assert run_copy.saved_model_versions() == [1]
    assert run_copy.load_config().g_learning_rate == 5e-5


def test_ctrl_c_saves_the_step_reached_and_says_where_to_resume_from(run_copy, dataset, capsys):
    """A real SIGINT once a checkpoint of the resumed run is on disk: the step under way is
    finished and saved, one line names it, exit 130."""

    def resumed_run_saved():
        # Any checkpoint past the resumed step: on a fast machine a given one (ckpt-6) can be
        # written and rotated out (max_to_keep) between two looks.
        steps = [int(name[len("ckpt-"):-len(".index")])
                 for name in os.listdir(run_copy.checkpoint_dir)
                 if name.startswith("ckpt-") and name.endswith(".index")]
        return any(step > STEPS for step in steps)

    def interrupt_when_saved():
        deadline = time.time() + SUBPROCESS_TIMEOUT
        while not resumed_run_saved() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as a terminal delivers it: a runner started in the background by a shell without job
    # control inherits SIGINT ignored, and Python then installs no handler of its own.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt_when_saved, daemon=True)
    interrupter.start()
    try:
        rc = cli.train_main(train_argv(dataset, run_copy.path, "--resume", "--steps=1000",
                                       "--noexport"))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train_main")
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous_handler)
    assert rc == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    found = re.fullmatch(r"interrupted \(SIGINT\) at step (\d+): saved ckpt-\1; continue from it "
                         r"with python train\.py --resume --model_dir (\S+) \(and the same data "
                         r"flags\)", lines[0])
    assert found and found.group(2) == run_copy.path, lines[0]
    step = int(found.group(1))
    assert step > STEPS + EVERY  # acted on after the batch end of the checkpoint waited for
    assert run_copy.checkpoint("last").endswith(f"ckpt-{step}")
    assert read_checkpoint_iterations(run_copy.checkpoint("last")) == step


# ------------------------------------------------------------------------------- output folders
def test_predicting_twice_into_the_scans_folder(run, dataset, tmp_path, caplog):
    folder = tmp_path / "scans"
    copy_into(folder, *dataset.images[:2])
    for _ in range(2):
        assert cli.predict_main(predict_argv(run, folder, folder)) == 0
    assert outputs_under(folder) == ["prediction.json", "report.html", "scan_00.nii.gz",
                                     "scan_00_qc.png", "scan_00_seg.nii.gz", "scan_01.nii.gz",
                                     "scan_01_qc.png", "scan_01_seg.nii.gz", "volumes.csv"]
    assert any("skipping 2 earlier outputs" in r.getMessage() for r in caplog.records)
    with open(folder / "prediction.json") as f:
        record = json.load(f)
    assert record["outputs"] == {name: str(folder / f"{name}_seg.nii.gz")
                                 for name in ("scan_00", "scan_01")}  # absolute, as images


def test_prediction_without_labels_removes_earlier_dice(run, dataset, tmp_path):
    out = tmp_path / "out"
    assert cli.predict_main(predict_argv(run, dataset.images[0], out, "--labels",
                                         dataset.labels[0])) == 0
    assert os.path.isfile(out / "dice.csv") and os.path.isfile(out / "dice.json")
    assert cli.predict_main(predict_argv(run, dataset.images[0], out)) == 0
    assert outputs_under(out) == ["prediction.json", "report.html", "scan_00_qc.png",
                                  "scan_00_seg.nii.gz", "volumes.csv"]
    with open(out / "prediction.json") as f:
        assert json.load(f)["mean_dice"] is None


def test_reference_labels_of_another_protocol_are_warned_about(run, dataset, tmp_path, caplog):
    reference = nib.load(dataset.labels[0])
    labels = np.asarray(reference.dataobj).astype(np.int32)
    labels[labels > 0] += 1000
    path = tmp_path / "labels" / "scan_00.nii.gz"
    os.makedirs(path.parent)
    nib.save(nib.Nifti1Image(labels, reference.affine), str(path))
    assert cli.predict_main(predict_argv(run, dataset.images[0], tmp_path / "out", "--labels",
                                         str(path))) == 0
    assert any(str(path) in r.getMessage() and "not among the atlas's" in r.getMessage()
               for r in caplog.records if r.levelno == pylogging.WARNING)


# ------------------------------------------------------------------------------- start-up noise
def test_tensorflow_start_up_lines_only_when_asked(tmp_path):
    """A CPU user sees the one error line, not TensorFlow's CUDA and oneDNN notices; they come
    back with the user's own TF_CPP_MIN_LOG_LEVEL."""
    command = [sys.executable, "-m", "ltnet_tf.commands.export_command",
               "--model_dir", str(tmp_path / "none")]
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environ["PYTHONPATH"] = REPO
    quiet = subprocess.Popen(command, env=environ, stderr=subprocess.PIPE, text=True)
    loud = subprocess.Popen(command, env={**environ, "TF_CPP_MIN_LOG_LEVEL": "0"},
                            stderr=subprocess.PIPE, text=True)
    quiet_err = quiet.communicate(timeout=SUBPROCESS_TIMEOUT)[1]
    loud_err = loud.communicate(timeout=SUBPROCESS_TIMEOUT)[1]
    assert quiet.returncode == loud.returncode == 1
    assert quiet_err.splitlines() == [f"ltnet-export: error: {tmp_path / 'none'}: model folder "
                                      f"not found"], quiet_err
    assert "oneDNN" in loud_err or "InitializeLog" in loud_err, loud_err
