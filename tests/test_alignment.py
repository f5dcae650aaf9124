"""Affine alignment to the atlas (ltnet_tf.alignment) on small synthetic brains with known transforms.

The phantom is head-sized in world units (6 mm voxels on a 24x28x32 grid), so the same size checks
apply as to real scans; the registration grid is 4 mm, so the phantoms are registered at their own
resolution.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from ltnet_tf import alignment, data, synthetic

SHAPE = (24, 28, 32)
VOXEL_MM = 6.0


def phantom(seed=0):
    """A brain-like volume (skull-stripped: the non-brain tissues of the demo phantom removed)."""
    tissues = synthetic.phantom_tissues(SHAPE)
    image = synthetic.TISSUE_INTENSITIES[tissues] * (synthetic.TISSUE_LABEL_IDS[tissues] > 0)
    # Anatomy that is not symmetric about any axis (like a cerebellum and a brain stem), so that
    # every rotation is observable.
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    image = np.where(((x - 0.2) ** 2 + (y + 0.5) ** 2 + (z + 0.45) ** 2) < 0.08, 0.95, image)
    image = np.where((np.abs(x + 0.3) < 0.15) & (np.abs(y - 0.3) < 0.3) & (np.abs(z) < 0.2),
                     0.1, image)
    return data.Volume(data=image.astype(np.float32),
                       affine=synthetic.demo_affine(SHAPE, VOXEL_MM), path=f"phantom{seed}")


def rotation(degrees, axis):
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(4)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


# Where the phantom's centre lies in the scan's world: far from the atlas's (as in MICCAI's headers).
FAR_CENTRE = np.array([-80.0, -200.0, -165.0])


def scanner_grid(voxel_sizes=(5.0, 4.5, 6.5), shape=(32, 40, 28)):
    """An RAS grid with anisotropic voxels around ``FAR_CENTRE``."""
    affine = np.diag([*voxel_sizes, 1.0])
    affine[:3, 3] = FAR_CENTRE - (np.asarray(shape) - 1) / 2 * np.asarray(voxel_sizes)
    return affine, shape


def point_error_mm(found: alignment.Alignment, truth_atlas_to_scan: np.ndarray, atlas) -> float:
    """Mean distance between where the found and the true affine take the atlas's brain voxels."""
    voxels = np.argwhere(atlas.data > 0)[::7]
    world = np.c_[voxels, np.ones(len(voxels))] @ atlas.affine.T
    found_points = world @ found.atlas_to_scan_world.T
    true_points = world @ truth_atlas_to_scan.T
    return float(np.linalg.norm(found_points[:, :3] - true_points[:, :3], axis=1).mean())


def test_recovers_a_known_rotation_scaling_and_shift():
    atlas = phantom()
    # scan world = T(atlas world): rotated 12 degrees, scaled 1.1 x 0.95 x 1.0, moved far off
    truth = rotation(12, axis=0) @ np.diag([1.1, 0.95, 1.0, 1.0])
    truth[:3, 3] = FAR_CENTRE
    affine, shape = scanner_grid()
    scan = alignment.resample_onto(atlas, affine, shape, order=1, world_transform=np.linalg.inv(truth))
    found = alignment.AtlasAligner(atlas).align(scan)
    assert found.ok and not found.skipped
    # Tolerance: a third of a voxel of the 6 mm phantom (0.7 mm reached); the shift alone was 270 mm, the rotation and
    # scaling move the phantom's edges by ~15 mm, so an alignment that missed either is far off.
    assert point_error_mm(found, truth, atlas) < 2.0
    aligned = found.resample_scan(scan)
    assert aligned.shape == atlas.shape
    inside = atlas.data > 0
    assert np.corrcoef(aligned.data[inside], atlas.data[inside])[0, 1] > 0.9


def test_scan_on_the_atlas_grid_is_left_as_it_is():
    atlas = phantom()
    scan = data.Volume(atlas.data * 2.0, atlas.affine.copy(), "same_grid")
    found = alignment.AtlasAligner(atlas).align(scan)
    assert found.skipped and found.ok
    assert np.allclose(found.atlas_voxel_to_scan_voxel, np.eye(4))
    assert found.resample_scan(scan) is scan


def test_identical_scan_forced_through_registration_stays_near_identity():
    atlas = phantom()
    found = alignment.AtlasAligner(atlas).align(atlas, force=True)
    assert not found.skipped and found.ok
    assert point_error_mm(found, np.eye(4), atlas) < 1.5  # a quarter voxel


def test_a_failed_alignment_is_flagged(caplog):
    atlas = phantom()
    rng = np.random.default_rng(3)
    from scipy import ndimage
    noise = ndimage.gaussian_filter(rng.random(SHAPE).astype(np.float32), 1.5)
    noise = np.where(atlas.data > 0, noise, 0.0).astype(np.float32)  # brain-shaped, no anatomy
    shifted = data.Volume(np.roll(noise, 5, axis=1), atlas.affine.copy(), "noise_volume.nii.gz")
    found = alignment.AtlasAligner(atlas).align(shifted, force=True)
    assert not found.ok
    assert found.to_dict()["ok"] is False
    assert any("noise_volume.nii.gz" in r.getMessage() and "looks wrong" in r.getMessage()
               for r in caplog.records)


def test_scan_that_is_not_skull_stripped_is_refused():
    atlas = phantom()
    tissues = synthetic.phantom_tissues(SHAPE)  # scalp and skull included: a whole head
    head = synthetic.TISSUE_INTENSITIES[tissues].astype(np.float32) + 0.3 * (tissues > 0)
    big = np.pad(head, 6)  # and a field of view that holds the whole head
    affine = synthetic.demo_affine(big.shape, VOXEL_MM * 1.3)
    with pytest.raises(data.DataError, match=r"^head.nii.gz: does not look skull-stripped"):
        alignment.AtlasAligner(atlas).align(data.Volume(big, affine, "head.nii.gz"))


def test_scan_that_is_not_a_brain_is_refused():
    atlas = phantom()
    tiny = np.zeros(SHAPE, np.float32)
    tiny[10:13, 10:13, 10:13] = 1.0  # a 6 ml object
    with pytest.raises(data.DataError, match=r"^knee.nii.gz: does not look like a brain scan"):
        alignment.AtlasAligner(atlas).align(data.Volume(tiny, atlas.affine * 1.01, "knee.nii.gz"))


def test_itk_transform_file_maps_points_as_the_alignment_does(tmp_path):
    atlas = phantom()
    truth = rotation(8, axis=2)
    truth[:3, 3] = [5.0, -3.0, 2.0]
    found = alignment.Alignment(atlas_to_scan_world=truth, atlas_affine=atlas.affine,
                                scan_affine=atlas.affine, atlas_shape=SHAPE, scan_shape=SHAPE)
    path = tmp_path / "affine.txt"
    path.write_text(found.itk_transform_text())
    transform = sitk.ReadTransform(str(path))
    ras_point = np.array([10.0, -20.0, 30.0])
    lps_point = ras_point * [-1, -1, 1]
    moved_lps = np.asarray(transform.TransformPoint(tuple(lps_point)))
    expected_ras = (truth @ [*ras_point, 1.0])[:3]
    assert np.allclose(moved_lps * [-1, -1, 1], expected_ras, atol=1e-6)


def test_labels_resample_by_nearest_label():
    atlas = phantom()
    labels = data.Volume(synthetic.TISSUE_LABEL_IDS[synthetic.phantom_tissues(SHAPE)],
                         atlas.affine, "labels")
    truth = rotation(10, axis=1)
    moved = alignment.resample_onto(labels, atlas.affine, SHAPE, order=0,
                                    world_transform=np.linalg.inv(truth))
    assert set(np.unique(moved.data)) <= set(np.unique(labels.data))
    found = alignment.Alignment(atlas_to_scan_world=truth, atlas_affine=atlas.affine,
                                scan_affine=atlas.affine, atlas_shape=SHAPE, scan_shape=SHAPE)
    back = found.resample_labels(moved)
    agree = np.mean(back.data[labels.data > 0] == labels.data[labels.data > 0])
    assert agree > 0.8


def far_rotation(degrees):
    moved = rotation(degrees, axis=0)
    moved[:3, 3] = FAR_CENTRE
    return moved


def test_training_scans_are_aligned_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LTNET_CACHE_DIR", str(tmp_path / "cache"))
    atlas = phantom()
    atlas_path = str(tmp_path / "atlas.nii.gz")
    data.save_nifti(atlas.data, atlas.affine, atlas_path)
    affine, shape = scanner_grid()
    moved = alignment.resample_onto(atlas, affine, shape, order=1,
                                    world_transform=np.linalg.inv(far_rotation(10)))
    native_path = str(tmp_path / "native.nii.gz")
    data.save_nifti(moved.data, moved.affine, native_path)
    on_grid_path = str(tmp_path / "on_grid.nii.gz")
    data.save_nifti(atlas.data, atlas.affine, on_grid_path)

    first = alignment.align_training_scans(atlas, atlas_path, [native_path, on_grid_path])
    assert first[1] == on_grid_path  # already on the atlas grid: used as it is
    aligned = data.load_scan(first[0])
    assert aligned.shape == SHAPE and np.allclose(aligned.affine, atlas.affine)
    stamp = __import__("os").path.getmtime(first[0])
    second = alignment.align_training_scans(atlas, atlas_path, [native_path, on_grid_path])
    assert second == first and __import__("os").path.getmtime(first[0]) == stamp  # not redone
