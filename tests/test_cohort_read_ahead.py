"""Scans that cannot be read, before and during a run of ``predict.py`` (``cohort.predict_files``):
every scan is read once before anything is written (``cohort.check_inputs``), and while one scan is
segmented the next is read in a thread (``cohort._read_ahead``), whose error must surface at that
scan's turn as the same one-line error, with the earlier scans' files complete."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from helpers import outputs_under, the_error_line
from ltnet_tf.commands import cli
from ltnet_tf.prediction import cohort

SCANS = 5
BAD = 2  # the third scan


def predict_argv(dataset, images, out):
    return ["predict.py", "--atlas", dataset.atlas, "--atlas_labels", dataset.atlas_labels,
            "--images", str(images), "--output_dir", str(out), "--refine_steps=2",
            "--refine_coarse_steps=3", "--noqc"]


def names():
    return [f"case_{index}" for index in range(SCANS)]


def copy_scans(dataset, folder) -> list:
    """SCANS scans (the session's, repeated) named case_0 ... case_4."""
    folder.mkdir()
    return [str(shutil.copy(dataset.images[index % len(dataset.images)], folder / f"{name}.nii.gz"))
            for index, name in enumerate(names())]


def truncate(path):
    """Keep the first half of the file: the header reads, the voxels end early."""
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:len(content) // 2])


DAMAGE = {"truncated": (truncate, "is truncated"), "deleted": (os.remove, "file not found")}


@pytest.fixture(scope="module")
def complete_run(dataset, tmp_path_factory):
    """The segmentations of the same scans when nothing goes wrong."""
    root = tmp_path_factory.mktemp("complete")
    copy_scans(dataset, root / "images")
    assert cli.predict_main(predict_argv(dataset, root / "images", root / "out")) == 0
    return {name: np.asarray(nib.load(root / "out" / f"{name}_seg.nii.gz").dataobj)
            for name in names()}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_scan_unreadable_from_the_start_stops_the_run_before_anything_is_written(
        damage, dataset, tmp_path, capsys):
    paths = copy_scans(dataset, tmp_path / "images")
    spoil, problem = DAMAGE[damage]
    spoil(paths[BAD])
    out = tmp_path / "out"
    argv = predict_argv(dataset, tmp_path / "images", out)
    if damage == "deleted":  # a missing file among files given one by one
        argv[argv.index("--images") + 1] = ",".join(paths)
    assert cli.predict_main(argv) == 1
    the_error_line(capsys, paths[BAD], problem)
    assert not out.exists()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_scan_that_turns_unreadable_during_the_run_stops_it_at_its_turn(
        damage, complete_run, dataset, tmp_path, monkeypatch, capsys):
    """The third scan is damaged right after the up-front check read it: the two scans before it
    are segmented and written in full (as in a run where nothing went wrong), then the run stops
    with one line naming the file; nothing of the later scans, no temporary file."""
    paths = copy_scans(dataset, tmp_path / "images")
    spoil, problem = DAMAGE[damage]
    check_inputs = cohort.check_inputs

    def check_then_damage(pairs, *args, **kwargs):
        check_inputs(pairs, *args, **kwargs)
        assert [os.path.basename(p) for p, _ in pairs] == [os.path.basename(p) for p in paths]
        spoil(pairs[BAD][0])

    monkeypatch.setattr(cohort, "check_inputs", check_then_damage)
    out = tmp_path / "out"
    assert cli.predict_main(predict_argv(dataset, tmp_path / "images", out)) == 1
    captured = capsys.readouterr()
    assert "[2/5] case_1_seg.nii.gz" in captured.out and "[3/5]" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and captured.err.count("error:") == 1, captured.err
    assert paths[BAD] in lines[0] and problem in lines[0], lines[0]
    assert outputs_under(out) == ["case_0_seg.nii.gz", "case_1_seg.nii.gz"]
    for name in ("case_0", "case_1"):
        written = np.asarray(nib.load(out / f"{name}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(written, complete_run[name])
