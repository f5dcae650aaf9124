"""Tests of the synthetic demo data set: files, labels, and misalignment that registration must fix."""
import os

import nibabel as nib
import numpy as np
import pytest

from ltnet_tf.commands import synthetic
from ltnet_tf.io import volumes as data

EXPECTED_LABEL_IDS = [0, 2, 3, 4, 10, 11, 17, 43, 49, 50, 53]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return synthetic.make_demo_dataset(str(tmp_path_factory.mktemp("demo")), n_scans=3)


def mean_dice(labels_a, labels_b, label_ids):
    scores = []
    for label in label_ids:
        a, b = labels_a == label, labels_b == label
        scores.append(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))
    return float(np.mean(scores))


def test_demo_files(demo):
    root = os.path.dirname(demo["atlas"])
    assert demo["atlas"] == os.path.join(root, "atlas.nii.gz")
    assert demo["atlas_labels"] == os.path.join(root, "atlas_labels.nii.gz")
    names = [f"scan_{i:02d}.nii.gz" for i in range(3)]
    assert sorted(os.listdir(os.path.join(root, "images"))) == names
    assert sorted(os.listdir(os.path.join(root, "labels"))) == names
    assert data.list_images(demo["images_dir"]) == demo["images"]
    assert [data.scan_name(p) for p in demo["labels"]] == ["scan_00", "scan_01", "scan_02"]


def test_demo_volumes_load_and_share_a_non_identity_1mm_grid(demo):
    atlas = data.load_scan(demo["atlas"])
    assert atlas.shape == (48, 56, 64)
    assert not np.allclose(atlas.affine, np.eye(4))
    assert np.any(atlas.affine[:3, 3] != 0)
    assert nib.load(demo["atlas"]).header.get_zooms() == (1.0, 1.0, 1.0)
    for path in [demo["atlas_labels"], *demo["images"]]:
        volume = data.load_scan(path)
        data.check_same_grid(atlas, volume, strict=True)
    assert nib.load(demo["atlas_labels"]).get_data_dtype() == np.int16


def test_demo_label_ids(demo):
    atlas_labels = data.load_label_map(demo["atlas_labels"]).data
    assert np.unique(atlas_labels).tolist() == EXPECTED_LABEL_IDS
    assert synthetic.DEMO_LABEL_IDS == EXPECTED_LABEL_IDS
    for path in demo["labels"]:
        assert set(np.unique(data.load_label_map(path).data)) <= set(EXPECTED_LABEL_IDS)


def test_scans_are_misaligned_with_the_atlas(demo):
    """Registration has work to do: Dice without it is clearly below 1 but not hopeless."""
    atlas_labels = data.load_label_map(demo["atlas_labels"]).data
    for path in demo["labels"]:
        dice = mean_dice(data.load_label_map(path).data, atlas_labels, EXPECTED_LABEL_IDS[1:])
        assert 0.3 < dice < 0.9, (path, dice)


def test_scans_have_their_own_contrast(demo):
    """The same tissue has different intensities in the atlas and a scan (so NCC, not MSE)."""
    atlas = data.load_scan(demo["atlas"]).data
    atlas_labels = data.load_label_map(demo["atlas_labels"]).data
    scan = data.load_scan(demo["images"][0]).data
    scan_labels = data.load_label_map(demo["labels"][0]).data
    ratios = [np.median(scan[scan_labels == label]) / np.median(atlas[atlas_labels == label])
              for label in (2, 3, 10)]
    assert max(abs(r - 1) for r in ratios) > 0.03


def test_demo_is_deterministic(tmp_path):
    first = synthetic.make_demo_dataset(str(tmp_path / "a"), n_scans=1, shape=(24, 28, 32), seed=3)
    second = synthetic.make_demo_dataset(str(tmp_path / "b"), n_scans=1, shape=(24, 28, 32), seed=3)
    other = synthetic.make_demo_dataset(str(tmp_path / "c"), n_scans=1, shape=(24, 28, 32), seed=4)
    for key in ("atlas", "atlas_labels"):
        np.testing.assert_array_equal(nib.load(first[key]).get_fdata(), nib.load(second[key]).get_fdata())
    scan_a, scan_b, scan_c = (nib.load(p["images"][0]).get_fdata() for p in (first, second, other))
    np.testing.assert_array_equal(scan_a, scan_b)
    assert not np.allclose(scan_a, scan_c)
