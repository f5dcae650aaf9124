"""Whole heads (ltnet_tf.preprocessing): the brain mask's checks, N4, head detection, and
predict.py on a synthetic head (a brain-like blob inside a skull and a scalp) with deepbet's real
networks. The networks run on a 96³ box here (192³ in the product) to keep the test short."""
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ltnet_tf.config import ConfigError
from ltnet_tf.io import plausibility, volumes as data
from ltnet_tf.preprocessing import brain_extraction, preparation
from ltnet_tf.preprocessing.bias import correct_bias

N, MM = 112, 2.0
LABEL_WM, LABEL_CORTEX, LABEL_VENTRICLE = 2, 3, 4


def radius(a, b, c, shift=(0.0, 0.0, 0.0)):
    grid = (np.indices((N,) * 3) - (N - 1) / 2) * MM
    return np.sqrt(((grid[0] - shift[0]) / a) ** 2 + ((grid[1] - shift[1]) / b) ** 2
                   + ((grid[2] - shift[2]) / c) ** 2)


def affine():
    matrix = np.diag([MM, MM, MM, 1.0])
    matrix[:3, 3] = -(N - 1) / 2 * MM
    return matrix


def synthetic_head(shift=(0.0, 0.0, 0.0), seed=0):
    """(head volume 0..~130, its brain's label map, the brain mask): T1-like intensities (white
    110, cortex 75, ventricles 30), a dark skull and a bright scalp, blur and noise."""
    brain = radius(62, 75, 58, shift)
    labels = np.zeros((N,) * 3, np.int32)
    labels[brain < 1] = LABEL_CORTEX
    labels[brain < 0.8] = LABEL_WM
    labels[radius(12, 30, 15, shift) < 1] = LABEL_VENTRICLE
    intensity = np.zeros(LABEL_VENTRICLE + 1, np.float32)
    intensity[[LABEL_WM, LABEL_CORTEX, LABEL_VENTRICLE]] = 110.0, 75.0, 30.0
    image = intensity[labels]
    outer = radius(70, 84, 66, shift)
    image[(outer >= 1) & (outer < 1.08)] = 15.0
    image[(outer >= 1.08) & (outer < 1.18)] = 120.0
    image = ndimage.gaussian_filter(image, 0.7)
    image += np.random.default_rng(seed).normal(0.0, 3.0, image.shape).astype(np.float32)
    return (data.Volume(np.maximum(image, 0).astype(np.float32), affine(), "head.nii.gz"),
            labels, brain < 1)


SMALL_BOX = brain_extraction.BrainExtractionSettings(model_shape=96)


# ------------------------------------------------------------------------------- mask checks
def test_a_brain_sized_mask_passes_and_wrong_ones_are_named():
    inside = radius(60, 75, 55) < 1  # about 1.0 L with 2 mm voxels
    mask = brain_extraction.check_mask(inside, affine())
    assert mask.ok and mask.components == 1 and 0.8 < mask.volume_l < 2.0
    two = inside & (np.indices(inside.shape)[0] != N // 2)  # cut in two halves
    assert "2 pieces" in brain_extraction.check_mask(two, affine()).problems
    touching = radius(60, 75, 55, shift=(-60.0, 0.0, 0.0)) < 1  # cut by the i- face
    figures = brain_extraction.check_mask(touching, affine())
    assert figures.faces_touched == ["i-"] and "touches the field of view" in figures.problems
    small = brain_extraction.check_mask(radius(30, 30, 30) < 1, affine())
    assert not small.ok and "outside 0.8-2.0 L" in small.problems[0]
    assert "brain mask looks wrong (volume 0.11 L" in small.describe("x.nii")


# ------------------------------------------------------------------------------- head or brain
def test_a_head_is_told_from_a_stripped_brain_and_from_no_brain():
    head, _, brain = synthetic_head()
    assert plausibility.looks_like_head(head)
    stripped = data.Volume(np.where(brain, head.data, 0).astype(np.float32), head.affine, "b")
    assert not plausibility.looks_like_head(stripped)
    blob = data.Volume((radius(20, 20, 20) < 1).astype(np.float32), head.affine, "blob")
    assert not plausibility.looks_like_head(blob)


# ------------------------------------------------------------------------------- N4
def test_n4_removes_most_of_a_smooth_field_inside_the_mask():
    head, labels, brain = synthetic_head()
    along = (np.indices((N,) * 3)[0] - (N - 1) / 2) * MM / 62.0  # -1..1 across the brain
    field = (1.0 + 0.25 * np.clip(along, -1, 1)).astype(np.float32)  # 0.75 .. 1.25
    stripped = np.where(brain, head.data, 0).astype(np.float32)
    biased = data.Volume(stripped * field, head.affine, "biased")
    corrected, record = correct_bias(biased, brain)
    white = labels == LABEL_WM
    upper, lower = white & (along > 0.2), white & (along < -0.2)

    def imbalance(values):  # white matter's mean on the bright side over the dark side, - 1
        return float(values[upper].mean() / values[lower].mean()) - 1.0

    assert imbalance(biased.data) > 0.2
    assert abs(imbalance(corrected.data)) < 0.35 * imbalance(biased.data)
    assert np.all(corrected.data[~brain] == 0)
    assert record["field_max"] / record["field_min"] > 1.3


# ------------------------------------------------------------------------------- predict.py
@pytest.fixture(scope="module")
def head_files(tmp_path_factory):
    """An atlas (the synthetic brain, stripped, with its labels), a head of the same subject
    shifted by 6 mm on its own grid, and a head whose brain is cut by the field of view."""
    root = tmp_path_factory.mktemp("heads")
    head, labels, brain = synthetic_head()
    atlas = np.where(brain, head.data, 0).astype(np.float32)
    paths = {}
    for name, values in (("atlas", atlas), ("atlas_labels", labels.astype(np.uint8))):
        paths[name] = str(root / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(values, affine()), paths[name])
    os.makedirs(root / "scans")
    os.makedirs(root / "refs")
    moved, moved_labels, _ = synthetic_head(shift=(6.0, -4.0, 0.0), seed=1)
    paths["head"] = str(root / "scans" / "head.nii.gz")
    nib.save(nib.Nifti1Image(moved.data, affine()), paths["head"])
    nib.save(nib.Nifti1Image(moved_labels.astype(np.uint8), affine()),
             str(root / "refs" / "head.nii.gz"))
    cut, _, _ = synthetic_head(shift=(0.0, 0.0, 70.0), seed=2)
    paths["cut"] = str(root / "cut" / "cut.nii.gz")
    os.makedirs(root / "cut")
    nib.save(nib.Nifti1Image(cut.data, affine()), paths["cut"])
    paths["root"] = root
    return paths


def predict(head_files, images, output, labels=None, skull_strip="auto"):
    from ltnet_tf.prediction import cohort

    options = cohort.PredictOptions(preparation=preparation.PreparationOptions(
        skull_strip=skull_strip, extraction=SMALL_BOX))
    return cohort.predict_files(images, str(output), labels, atlas=head_files["atlas"],
                                atlas_labels=head_files["atlas_labels"], options=options)


def test_predict_strips_a_whole_head_and_writes_its_mask(head_files, tmp_path, capsys):
    out = tmp_path / "out"
    result = predict(head_files, head_files["head"], out, str(head_files["root"] / "refs"))
    files = sorted(os.listdir(out))
    assert "head_brainmask.nii.gz" in files and "head_qc.png" in files
    mask = nib.load(str(out / "head_brainmask.nii.gz"))
    assert mask.get_data_dtype() == np.uint8 and mask.shape == (N,) * 3
    record = json.load(open(out / "prediction.json"))
    scan = record["scans"]["head"]
    assert scan["brain_mask"]["ok"] and scan["brain_mask_ok"] and 0.8 < scan["brain_mask"][
        "volume_l"] < 2.0
    assert scan["bias_correction"]["seconds"] >= 0  # auto: N4 on the heads stripped here
    assert record["brain_mask_flagged"] == []
    assert record["preparation"]["skull_strip"] == "auto"
    assert result["dice"]["mean_dice"] > 0.8
    assert "brain mask 1." in capsys.readouterr().out


def test_a_mask_cut_by_the_field_of_view_is_flagged(head_files, tmp_path, capsys):
    out = tmp_path / "out"
    predict(head_files, head_files["cut"], out)
    record = json.load(open(out / "prediction.json"))
    scan = record["scans"]["cut"]
    assert record["brain_mask_flagged"] == ["cut"] and not scan["brain_mask_ok"]
    assert "touches the field of view" in scan["brain_mask"]["problems"]
    assert any("brain mask looks wrong" in w for w in scan["warnings"])
    assert "BRAIN MASK LOOKS WRONG: check cut_brainmask.nii.gz" in capsys.readouterr().out


def test_no_brain_is_still_refused_before_anything_is_written(head_files, tmp_path):
    blob = tmp_path / "blob.nii.gz"  # on another grid than the atlas's (that one is not checked)
    nib.save(nib.Nifti1Image((radius(20, 20, 20) < 1)[:-8].astype(np.float32) * 100, affine()),
             str(blob))
    for mode in ("auto", "yes"):
        with pytest.raises(data.DataError, match=r"blob.nii.gz: does not look like a brain"):
            predict(head_files, str(blob), tmp_path / "out", skull_strip=mode)
        assert not (tmp_path / "out").exists()


def test_a_head_without_deepbet_installed_is_one_clear_error(head_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepbet", None)  # what an environment without it raises
    with pytest.raises(ConfigError, match=r"needs deepbet .*ltnet-tf\[heads\]"):
        predict(head_files, head_files["head"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    other_grid = tmp_path / "head.nii.gz"  # scans on the atlas's grid are not size-checked
    larger = affine() @ np.diag([1.2, 1.2, 1.2, 1.0])  # 2.73 L of tissue at 2 mm: 4.7 L
    nib.save(nib.Nifti1Image(nib.load(head_files["head"]).get_fdata()[:-8].astype(np.float32),
                             larger), str(other_grid))
    with pytest.raises(data.DataError, match="does not look skull-stripped"):
        predict(head_files, str(other_grid), tmp_path / "out", skull_strip="no")


# ------------------------------------------------------------------------------- train.py
def test_training_strips_the_heads_among_its_scans_once(head_files, tmp_path, monkeypatch):
    """train.py's unlabelled scans: a whole head is replaced by its stripped, N4-corrected copy
    (cached: a second run reads it), a stripped brain is used as it is."""
    from ltnet_tf.training import trainer

    monkeypatch.setenv("LTNET_CACHE_DIR", str(tmp_path / "cache"))
    brain = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(nib.load(head_files["atlas"]).get_fdata().astype(np.float32),
                             affine()), str(brain))
    preparing = preparation.ScanPreparation(preparation.PreparationOptions(extraction=SMALL_BOX))
    scans = f"{head_files['head']},{brain}"
    _, _, paths = trainer.check_inputs(head_files["atlas"], head_files["atlas_labels"], scans,
                                       preparation=preparing)
    assert paths[1] == str(brain) and paths[0].startswith(str(tmp_path / "cache"))
    stripped = data.load_scan(paths[0])
    assert not plausibility.looks_like_head(stripped)
    record = json.load(open(paths[0][:-len(".nii.gz")] + ".json"))
    assert record["preparation"]["brain_mask"]["ok"] and record["alignment"] is None
    assert record["preparation"]["bias_correction"] is not None  # auto: N4 on stripped heads
    _, _, again = trainer.check_inputs(head_files["atlas"], head_files["atlas_labels"], scans,
                                       preparation=preparing)
    assert again == paths and os.path.getmtime(again[0]) == os.path.getmtime(paths[0])
