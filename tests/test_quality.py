"""The expected Dice (``ltnet_tf.prediction.quality``): predict.py --atlas on the session's tiny
scans and a grossly misregistered twin of one of them (its voxels turned upside down under the
same header, on the atlas grid: no alignment runs, and refinement cannot undo a flip). The
estimate exists for every scan and structure and lies in [0, 1]; the twin is expected lower than
the scan it was made from; ``--min_quality`` between the two flags the twin only (in the scan's
line, prediction.json, report.html); the same scan gives the same bits twice."""
import contextlib
import csv
import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from helpers import write_nifti
from ltnet_tf.commands import cli
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import volumes as data
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.prediction import Predictor, cohort, quality

REFINE_FLAGS = ["--refine_steps=2", "--refine_coarse_steps=3"]
TWIN = "scan_00_misregistered"


@pytest.fixture(scope="module")
def scans(dataset, tmp_path_factory):
    """The session's scans and the misregistered twin of the first, in one folder."""
    folder = tmp_path_factory.mktemp("quality_scans")
    for path in dataset.images:
        shutil.copy(path, folder)
    image = nib.load(dataset.images[0])
    write_nifti(folder / f"{TWIN}.nii.gz", np.asarray(image.dataobj)[:, ::-1, ::-1].copy(),
                image.affine)
    return folder


def predict(dataset, images, out, *extra):
    return cli.predict_main(["predict.py", "--atlas", dataset.atlas, "--atlas_labels",
                             dataset.atlas_labels, "--images", str(images), "--output_dir",
                             str(out), *REFINE_FLAGS, *extra])


@pytest.fixture(scope="module")
def predicted(dataset, scans, tmp_path_factory):
    """(output folder, prediction.json, the scans' lines) of a run flagging every scan."""
    out = tmp_path_factory.mktemp("quality_out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert predict(dataset, scans, out, "--min_quality=0.99") == 0
    with open(out / "prediction.json") as f:
        return out, json.load(f), printed.getvalue().splitlines()


def test_every_scan_and_structure_has_an_expected_dice_in_0_1(predicted, dataset):
    out, prediction, lines = predicted
    foreground = [i for i in dataset.label_ids if i != 0]
    assert len(prediction["scans"]) == len(dataset.images) + 1
    for name, record in prediction["scans"].items():
        found = record["quality"]
        assert 0.0 <= found["expected_dice"] <= 1.0, name
        assert len(found["structures"]) == len(foreground)
        assert all(0.0 <= v <= 1.0 for v in found["structures"].values()), name
        assert found["expected_dice"] == pytest.approx(
            np.mean(list(found["structures"].values())), abs=1e-3)
        assert [entry["structure"] for entry in found["low"]] == sorted(
            found["structures"], key=found["structures"].get)[:len(found["low"])]
    with open(out / "volumes.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["expected_dice"]) for row in rows] == [
        prediction["scans"][row["scan"]]["quality"]["expected_dice"] for row in rows]
    assert prediction["quality"]["sha256"] and prediction["quality"]["min_quality"] == 0.99
    for name, record in prediction["scans"].items():  # each scan's line says it
        line = next(line for line in lines if f"{name}_seg.nii.gz" in line)
        assert f"expected Dice {record['quality']['expected_dice']:.2f}" in line
        assert "QUALITY BELOW 0.99: check this scan" in line


def test_a_misregistered_twin_is_expected_lower_than_its_scan(predicted):
    _, prediction, _ = predicted
    scans = prediction["scans"]
    clean, twin = (scans[name]["quality"]["expected_dice"] for name in ("scan_00", TWIN))
    assert twin < clean - 0.05, (clean, twin)


def test_min_quality_flags_the_twin_only(predicted, dataset, scans):
    """The same command again with --min_quality between the two: the scans are kept from the
    first run (not segmented again), flagged against the new threshold."""
    out, prediction, _ = predicted
    clean, twin = (prediction["scans"][n]["quality"]["expected_dice"] for n in ("scan_00", TWIN))
    threshold = round((clean + twin) / 2, 4)
    assert predict(dataset, scans, out, f"--min_quality={threshold}") == 0
    with open(out / "prediction.json") as f:
        again = json.load(f)
    flagged = [n for n, r in again["scans"].items() if r["quality"]["below_min_quality"]]
    assert TWIN in flagged and "scan_00" not in flagged
    assert again["quality_flagged"] == flagged and again["quality"]["min_quality"] == threshold
    page = (out / "report.html").read_text()
    assert f"expected Dice {twin:.2f} below {threshold:.2f}" in page
    first = page[page.index('id="scan-0"'):page.index('id="scan-1"')]
    assert TWIN in first  # the flagged scan's section comes first


def test_out_of_range_min_quality_is_refused(dataset, scans, tmp_path, capsys):
    assert predict(dataset, scans, tmp_path / "out", "--min_quality=1.5") != 0
    assert not (tmp_path / "out").exists()


def test_the_same_scan_gives_the_same_bits(predicted, dataset):
    """Twice in one Predictor and once more in the command's run: equal to the last digit."""
    _, prediction, _ = predicted
    atlases, _ = cohort.load_atlases(None, dataset.atlas, dataset.atlas_labels)
    predictor = Predictor(atlases, None, refinement=RefinementSettings(steps=2, coarse_steps=3))
    scan = data.load_scan(dataset.images[1])
    first, second = (predictor.segment(scan)["quality"] for _ in range(2))
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    record = quality.scan_record(first, LabelNames.freesurfer().name, None)
    assert record["expected_dice"] == prediction["scans"]["scan_01"]["quality"]["expected_dice"]
    assert record["structures"] == prediction["scans"]["scan_01"]["quality"]["structures"]
