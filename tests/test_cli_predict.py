"""Tests of the prediction command line (ltnet_tf.commands.cli.predict_main, predict.py) on tiny NIfTI
files, with the run trained once per session (``trained_run``, conftest.py).
"""
import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from helpers import SHAPE, copy_into, files_under, outputs_under, the_error_line, write_nifti
from ltnet_tf.commands import cli
from ltnet_tf.io.labels import structure_name
from ltnet_tf.prediction import cohort

pytestmark = pytest.mark.slow  # uses the session's trained run (training and export) (CI runs -m slow too)


# ------------------------------------------------------------------------------- end to end
def test_predict_end_to_end(trained_run, dataset, tmp_path, capsys):
    """Segmentations on each scan's own grid and header, atlas label IDs, Dice reports."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    copy_into(images, dataset.images[0])
    copy_into(labels, dataset.labels[0])
    # A scan whose header is shifted, with --align never (the voxel grids are taken to correspond):
    # accepted (warning), its segmentation keeps its own header.
    shifted = dataset.affine.copy()
    shifted[:3, 3] += [5.0, -3.0, 2.0]
    write_nifti(images / "shifted.nii.gz", nib.load(dataset.images[1]).get_fdata(dtype=np.float32),
                shifted)
    write_nifti(labels / "shifted.nii.gz", np.asarray(nib.load(dataset.labels[1]).dataobj), shifted)
    out = tmp_path / "out"
    rc = cli.predict_main(["predict.py", "--model_dir", trained_run.path, "--images", str(images),
                           "--output_dir", str(out), "--labels", str(labels),
                           "--save_warped_atlas", "--save_flow", "--align", "never"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "[1/2] scan_00_seg.nii.gz" in stdout and "[2/2] shifted_seg.nii.gz" in stdout
    assert "2 segmentations written to" in stdout and "mean Dice" in stdout

    for name, affine in (("scan_00", dataset.affine), ("shifted", shifted)):
        segmentation = nib.load(out / f"{name}_seg.nii.gz")
        assert segmentation.shape == SHAPE
        np.testing.assert_allclose(segmentation.affine, affine)
        values = np.asarray(segmentation.dataobj)
        assert values.dtype.kind == "i"
        assert set(np.unique(values).tolist()) <= set(dataset.label_ids)
        assert len(np.unique(values)) > 1
        warped = nib.load(out / f"{name}_warped_atlas.nii.gz")
        assert warped.shape == SHAPE and np.all(np.isfinite(warped.get_fdata()))
        np.testing.assert_allclose(warped.affine, affine)
        assert nib.load(out / f"{name}_flow.nii.gz").shape == (*SHAPE, 3)

    with open(out / "dice.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["scan", "label", "structure", "dice"]
    foreground = [i for i in dataset.label_ids if i != 0]
    assert len(rows) == 2 * (len(foreground) + 1)  # per structure, then the scan's mean
    for row in rows:
        dice = float(row["dice"])
        assert np.isnan(dice) or 0.0 <= dice <= 1.0
        if row["label"] != "mean":
            assert row["structure"] == structure_name(int(row["label"]))
    assert {"scan": "scan_00", "label": "17", "structure": "Left-Hippocampus"}.items() <= \
        next(r for r in rows if r["scan"] == "scan_00" and r["label"] == "17").items()
    assert [r["scan"] for r in rows if r["label"] == "mean"] == ["scan_00", "shifted"]

    with open(out / "dice.json") as f:
        report = json.load(f)  # strict JSON: no NaN
    assert set(report) == {"mean_dice", "mean_over_labels", "scans", "structures"}
    assert set(report["scans"]) == {"scan_00", "shifted"}
    assert report["mean_over_labels"] == foreground
    assert set(report["structures"]) == {str(i) for i in foreground}
    assert report["structures"]["17"]["name"] == "Left-Hippocampus"
    assert 0.0 <= report["mean_dice"] <= 1.0
    for scan in report["scans"].values():
        assert set(scan["dice"]) == {str(i) for i in foreground}
        assert all(v is None or 0.0 <= v <= 1.0 for v in scan["dice"].values())
        assert 0.0 <= scan["mean_dice"] <= 1.0
    with open(out / "prediction.json") as f:
        record = json.load(f)
    assert record["model_dir"] == trained_run.path
    assert record["source"].startswith(trained_run.saved_model_base)
    assert record["mean_dice"] == pytest.approx(report["mean_dice"])


def test_predict_mgz_and_checkpoint_source(trained_run, dataset, tmp_path):
    """A FreeSurfer .mgz scan; --source checkpoint segments as the exported SavedModel does."""
    scan = nib.load(dataset.images[0]).get_fdata(dtype=np.float32)
    mgz_path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(scan, dataset.affine), str(mgz_path))
    mgz_affine = nib.load(mgz_path).affine
    results = {}
    for source in ("saved_model", "checkpoint"):
        out = tmp_path / source
        assert cli.predict_main(["predict.py", "--model_dir", trained_run.path, "--images",
                                 str(mgz_path), "--output_dir", str(out),
                                 "--source", source]) == 0
        segmentation = nib.load(out / "scan_seg.nii.gz")
        assert segmentation.shape == SHAPE
        np.testing.assert_allclose(segmentation.affine, mgz_affine, atol=1e-5)
        results[source] = np.asarray(segmentation.dataobj)
        assert set(np.unique(results[source]).tolist()) <= set(dataset.label_ids)
    assert np.mean(results["saved_model"] == results["checkpoint"]) > 0.999


def test_predict_files_library_call(trained_run, dataset, tmp_path):
    out = tmp_path / "out"
    result = cohort.predict_files(",".join(dataset.images[:2]), str(out),
                                  model_dir=trained_run.path)
    assert set(result["outputs"]) == {"scan_00", "scan_01"} and result["dice"] is None
    assert outputs_under(out) == ["prediction.json", "report.html", "scan_00_qc.png",
                                  "scan_00_seg.nii.gz", "scan_01_qc.png",
                                  "scan_01_seg.nii.gz", "volumes.csv"]


# ------------------------------------------------------------------------------- bad input: predict
def _bad_predict_input(case, trained_run, dataset, tmp_path):
    """(argv changes, the path the error must name) for one bad-input case of predict."""
    affine = dataset.affine
    scan = nib.load(dataset.images[0]).get_fdata(dtype=np.float32)
    images = tmp_path / "images"
    copy_into(images, dataset.images[0])  # a good scan that must not get a segmentation either

    def bad_scan(name, array, file_affine=affine):
        return {"--images": str(images)}, write_nifti(images / name, array, file_affine)

    if case == "missing_file":
        path = str(tmp_path / "missing.nii.gz")
        return {"--images": f"{dataset.images[0]},{path}"}, path
    if case == "empty_folder":
        path = tmp_path / "empty"
        path.mkdir()
        return {"--images": str(path)}, str(path)
    if case == "not_nifti":
        path = tmp_path / "scan.png"
        path.write_bytes(b"\x89PNG")
        return {"--images": str(path)}, str(path)
    if case == "corrupt_nifti":
        path = images / "corrupt.nii"
        path.write_bytes(b"\0" * 100)
        return {"--images": str(images)}, str(path)
    if case == "2d_scan":
        return bad_scan("slice.nii.gz", scan[8])
    if case == "4d_scan":
        return bad_scan("series.nii.gz", np.stack([scan] * 3, -1))
    if case == "nan_scan":
        array = scan.copy()  # more NaN holes than the 0.5 % of the brain set to 0
        array[6:10, 8:12, 10:14] = np.nan
        return bad_scan("nan.nii.gz", array)
    if case == "scan_other_grid":
        changes, path = bad_scan("other_grid.nii.gz", np.pad(scan, 2))
        return {**changes, "--align": "never"}, path
    if case == "single_slice":
        return bad_scan("slice.nii.gz", scan[:, :, 8:9])
    if case == "not_a_brain":  # on another grid, so it would be aligned: far too small a brain
        return bad_scan("not_a_brain.nii.gz", np.pad(scan, 2))
    if case == "duplicate_names":
        other = copy_into(tmp_path / "other", dataset.images[0])
        return ({"--images": f"{images},{other}"},
                os.path.join(other, os.path.basename(dataset.images[0])))
    if case == "labels_not_integer":
        labels = tmp_path / "labels"
        labels.mkdir()
        path = write_nifti(labels / "scan_00.nii.gz", scan, affine)
        return {"--images": str(images), "--labels": str(labels)}, path
    if case == "labels_other_grid":
        labels = tmp_path / "labels"
        labels.mkdir()
        reference = np.asarray(nib.load(dataset.labels[0]).dataobj)[:, :-1]
        path = write_nifti(labels / "scan_00.nii.gz", reference, affine)
        return {"--images": str(images), "--labels": str(labels)}, path
    if case == "model_dir_missing":
        path = str(tmp_path / "no_model")
        return {"--model_dir": path}, path
    if case == "model_dir_not_a_model":
        path = tmp_path / "not_a_model"
        copy_into(path, dataset.atlas)
        return {"--model_dir": str(path)}, str(path)
    if case == "model_dir_without_config":
        path = tmp_path / "run_copy"
        shutil.copytree(trained_run.path, path)
        os.remove(path / "config.json")
        return {"--model_dir": str(path)}, str(path)
    if case == "output_dir_unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        path = str(blocker / "out")
        return {"--output_dir": path}, path
    if case == "output_dir_is_a_file":
        path = tmp_path / "out"
        path.write_text("")
        return {"--output_dir": str(path)}, str(path)
    raise AssertionError(case)


PREDICT_CASES = {
    "missing_file": "file not found",
    "empty_folder": "no NIfTI/MGZ images in folder",
    "not_nifti": "not a NIfTI/MGZ image",
    "corrupt_nifti": "not a NIfTI/MGZ image",
    "2d_scan": "is 2D",
    "4d_scan": "is 4D with 3 frames",
    "nan_scan": "contains 64 NaN/Inf voxels",
    "scan_other_grid": f"differs from the atlas grid {SHAPE}",
    "single_slice": "a 2D image or a single slice",
    "not_a_brain": "does not look like a brain scan",
    "duplicate_names": "same scan name 'scan_00'",
    "labels_not_integer": "label values are not integers",
    "labels_other_grid": "differs from the shape",
    "model_dir_missing": "model folder not found",
    "model_dir_not_a_model": "not an LT-Net model folder",
    "model_dir_without_config": "not an LT-Net model folder",
    "output_dir_unwritable": "cannot create output folder",
    "output_dir_is_a_file": "cannot create output folder",
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_predict_bad_input(case, trained_run, dataset, tmp_path, capsys):
    changes, bad_path = _bad_predict_input(case, trained_run, dataset, tmp_path)
    argv = {"--model_dir": trained_run.path, "--images": str(tmp_path / "images"),
            "--output_dir": str(tmp_path / "out"), **changes}
    assert cli.predict_main(["predict.py", *[x for item in argv.items() for x in item]]) == 1
    the_error_line(capsys, bad_path, PREDICT_CASES[case])
    out = argv["--output_dir"]
    assert not os.path.isdir(out) or outputs_under(out) == []  # nothing half-written
    assert not any(name.endswith("_seg.nii.gz") for name in files_under(tmp_path))


@pytest.mark.parametrize("program", [["predict.py"], []])  # argv[0] may be left out
def test_predict_requires_its_flags(program, tmp_path, capsys):
    assert cli.predict_main([*program, "--images", str(tmp_path)]) == 1
    the_error_line(capsys, "--model_dir is required")
    assert cli.predict_main([*program, "--helpfull"]) == 0
    assert "--model_dir" in capsys.readouterr().out


def test_a_reference_folder_of_the_whole_study(trained_run, dataset, tmp_path, caplog):
    """References of scans not segmented here are ignored (one line says how many); a scan
    without a reference is segmented and left out of Dice."""
    images = copy_into(tmp_path / "images", *dataset.images[:2])
    labels = copy_into(tmp_path / "labels", dataset.labels[1], dataset.labels[2])
    caplog.set_level("INFO")
    out = tmp_path / "out"
    assert cli.predict_main(["predict.py", "--model_dir", trained_run.path, "--images", images,
                             "--labels", labels, "--output_dir", str(out), "--norefine"]) == 0
    assert "1 reference label maps" in caplog.text and "ignored" in caplog.text
    assert "no reference label map for 1 scans (scan_00)" in caplog.text
    assert (out / "scan_00_seg.nii.gz").exists() and (out / "scan_01_seg.nii.gz").exists()
    report = json.loads((out / "dice.json").read_text())
    assert set(report["scans"]) == {"scan_01"}
    prediction = json.loads((out / "prediction.json").read_text())
    assert "mean_dice" not in prediction["scans"]["scan_00"]
    assert prediction["scans"]["scan_01"]["mean_dice"] == pytest.approx(report["mean_dice"])
