"""Affine alignment to the atlas (ltnet_tf.registration.alignment) on small synthetic brains with known transforms.

The phantom is head-sized in world units (6 mm voxels on a 24x28x32 grid), so the same size checks
apply as to real scans; the registration grid is 4 mm, so the phantoms are registered at their own
resolution.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from ltnet_tf.commands import synthetic
from ltnet_tf.io import volumes as data
from ltnet_tf.registration import alignment
from ltnet_tf.training import alignment_cache

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
    box = np.zeros(SHAPE, np.float32)
    box[4:20, 4:24, 5:27] = 1.0  # a box of noise: no brain outline, no anatomy
    found = alignment.AtlasAligner(atlas).align(
        data.Volume(noise * box, atlas.affine.copy(), "noise_volume.nii.gz"), force=True)
    assert not found.ok and found.brain_overlap < found.min_brain_overlap
    assert found.diagnosis == "orientation"
    assert found.to_dict()["ok"] is False and found.to_dict()["diagnosis"] == "orientation"
    assert any("noise_volume.nii.gz" in r.getMessage() and "looks wrong" in r.getMessage()
               and "header orientation" in r.getMessage() for r in caplog.records)


def moved_to_scanner_grid(volume: data.Volume, truth: np.ndarray) -> data.Volume:
    affine, shape = scanner_grid()
    return alignment.resample_onto(volume, affine, shape, order=1,
                                   world_transform=np.linalg.inv(truth))


def far_rotated(degrees=8.0, axis=2):
    truth = rotation(degrees, axis)
    truth[:3, 3] = FAR_CENTRE
    return truth


def test_t2_like_scan_is_a_contrast_mismatch_not_an_orientation(tmp_path, caplog):
    atlas = phantom()
    inside = atlas.data > 0
    inverted = np.where(inside, atlas.data.max() - atlas.data + 0.05, 0.0).astype(np.float32)
    truth = far_rotated()
    moved = moved_to_scanner_grid(data.Volume(inverted, atlas.affine, "t2"), truth)
    path = tmp_path / "t2_like.nii.gz"
    data.save_nifti(moved.data, moved.affine, path)
    found = alignment.AtlasAligner(atlas).align(data.load_scan(path))
    assert point_error_mm(found, truth, atlas) < 2.0  # the alignment itself is right
    assert found.brain_overlap >= found.min_brain_overlap and found.correlation < -0.3
    assert found.diagnosis == "contrast" and not found.ok
    assert found.to_dict()["diagnosis"] == "contrast"
    messages = [r.getMessage() for r in caplog.records if "t2_like.nii.gz" in r.getMessage()]
    assert len(messages) == 1 and "anti-correlated with the atlas (r = -0." in messages[0]
    assert "T2-weighted" in messages[0] and "orientation" not in messages[0]


def test_outliers_and_a_negative_background_align_as_the_clean_scan(tmp_path):
    """The phantom x968 as int16 on a scanner grid, then (in the file) 24 background voxels at
    +-32,000, or the background at -1024: the same affine, overlap and correlation."""
    atlas = phantom()
    truth = far_rotated()
    clean = moved_to_scanner_grid(data.Volume(np.round(atlas.data * 968), atlas.affine, "c"), truth)
    clean_values = np.round(clean.data).astype(np.int16)
    background = clean_values == 0
    dirty = clean_values.copy()
    picked = np.random.default_rng(1).choice(np.flatnonzero(background.ravel()), 24, replace=False)
    dirty.ravel()[picked] = np.where(np.arange(24) % 2, 32000, -32000)
    ct_like = np.where(background, -1024, clean_values).astype(np.int16)
    aligner = alignment.AtlasAligner(atlas)
    found = {}
    for name, values in (("clean", clean_values), ("outliers", dirty), ("ct_like", ct_like)):
        path = tmp_path / f"{name}.nii.gz"
        data.save_nifti(values, clean.affine, path, dtype=np.int16)
        scan = data.load_scan(path)
        found[name] = aligner.align(scan)
        found[name].tissue_ml = aligner.check_brain(scan)
    assert found["clean"].ok and point_error_mm(found["clean"], truth, atlas) < 2.0
    for name in ("outliers", "ct_like"):
        np.testing.assert_allclose(found[name].atlas_to_scan_world,
                                   found["clean"].atlas_to_scan_world, atol=1e-6)
        assert found[name].brain_overlap == pytest.approx(found["clean"].brain_overlap, abs=1e-6)
        assert found[name].correlation == pytest.approx(found["clean"].correlation, abs=1e-6)
        assert found[name].tissue_ml == pytest.approx(found["clean"].tissue_ml, rel=1e-6)


def test_sform_that_disagrees_with_the_qform_is_named_when_the_size_check_fails(tmp_path, caplog):
    """The true voxels are 3 x 3 x 6 mm (the qform); the sform says 6 mm, so the brain looks 4x
    too large: the refusal names the disagreement, both voxel sizes, the one used, and the fix."""
    import nibabel as nib

    shape = (SHAPE[0] * 2, SHAPE[1] * 2, SHAPE[2])
    tissues = synthetic.phantom_tissues(shape)
    brain = (synthetic.TISSUE_INTENSITIES[tissues] * (synthetic.TISSUE_LABEL_IDS[tissues] > 0))
    true_affine = synthetic.demo_affine(shape, 1.0) @ np.diag([3.0, 3.0, 6.0, 1.0])
    image = nib.Nifti1Image(brain.astype(np.float32), None)
    image.set_qform(true_affine, code=1)
    image.set_sform(synthetic.demo_affine(shape, 6.0), code=1)
    path = str(tmp_path / "half_mm.nii.gz")
    nib.save(image, path)
    scan = data.load_scan(path)
    data.load_scan(path)  # read twice, warned once
    warnings = [r.getMessage() for r in caplog.records if "sform and qform" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(path)
    with pytest.raises(data.DataError) as refused:
        alignment.AtlasAligner(phantom()).align(scan)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in ("litres of tissue with the voxel sizes of its sform",
                 "sform and qform disagree", "sform 6 x 6 x 6 mm voxels, used",
                 "qform 3 x 3 x 6 mm", "a brain's size", "fslorient -copyqform2sform"):
        assert part in message, part
    # With the qform copied over the sform (the suggested fix) the same scan is accepted.
    image.set_sform(true_affine, code=1)
    nib.save(image, path)
    fixed = data.load_scan(path)
    assert fixed.header_conflict is None
    assert 500 < alignment.AtlasAligner(phantom()).check_brain(fixed) < 2800


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


def test_resampling_gives_the_same_voxels_in_either_memory_order():
    """ITK reads a C-ordered and a Fortran-ordered array without a transposing copy; both give
    scipy's values (linear, prefilter off) away from the edge, and each keeps its memory order."""
    from scipy import ndimage

    values = np.random.default_rng(0).random((20, 24, 28)).astype(np.float32)
    matrix = np.eye(4)
    matrix[:3, :3] = [[0.93, 0.11, 0.0], [-0.05, 1.07, 0.02], [0.03, 0.0, 0.81]]
    matrix[:3, 3] = [1.37, -2.21, 0.73]
    expected = ndimage.affine_transform(values, matrix[:3, :3], offset=matrix[:3, 3],
                                        output_shape=(18, 22, 30), order=1, prefilter=False)
    inside = ndimage.affine_transform(np.ones_like(values), matrix[:3, :3], offset=matrix[:3, 3],
                                      output_shape=(18, 22, 30), order=0, prefilter=False,
                                      cval=0) > 0
    inside = ndimage.binary_erosion(inside, iterations=2)
    assert inside.sum() > 1000
    c_ordered = alignment.resample_voxels(values, matrix, (18, 22, 30), 1)
    f_ordered = alignment.resample_voxels(np.asfortranarray(values), matrix, (18, 22, 30), 1)
    assert c_ordered.flags["C_CONTIGUOUS"] and f_ordered.flags["F_CONTIGUOUS"]
    np.testing.assert_allclose(c_ordered, f_ordered, atol=1e-6)
    np.testing.assert_allclose(c_ordered[inside], expected[inside], atol=1e-5)


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

    first = alignment_cache.align_training_scans(atlas, atlas_path, [native_path, on_grid_path])
    assert first[1] == on_grid_path  # already on the atlas grid: used as it is
    aligned = data.load_scan(first[0])
    assert aligned.shape == SHAPE and np.allclose(aligned.affine, atlas.affine)
    stamp = __import__("os").path.getmtime(first[0])
    second = alignment_cache.align_training_scans(atlas, atlas_path, [native_path, on_grid_path])
    assert second == first and __import__("os").path.getmtime(first[0]) == stamp  # not redone
